"""Converter for the mindchain T5Gemma 2 SAE checkpoints, in SAELens' three layers.

``mindchain/t5gemma2-sae-all-layers`` holds 36 torch pickles (``encoder/sae_encoder_05.pt``,
``decoder/sae_decoder_17.pt``, ...), each a dict with ``W_enc [d_in, d_sae]``, ``b_enc``,
``W_dec [d_sae, d_in]``, ``b_dec``, the fields ``model_name``, ``layer_type``,
``layer_idx``, ``d_in``, ``d_sae`` and a training ``history``. Their forward pass is
``relu(x @ W_enc + b_enc) @ W_dec + b_dec`` with nothing subtracted from the input, which
is SAELens' ``StandardSAE`` with ``apply_b_dec_to_input=False``.

As SAELens does for its own formats (``sae_lens/loading/pretrained_sae_loaders.py``):

- :func:`get_mindchain_config_from_hf` builds the config dict (a
  ``PretrainedSaeConfigHuggingfaceLoader``);
- :func:`mindchain_disk_loader` reads one local ``.pt`` file (a ``PretrainedSaeDiskLoader``,
  usable as ``SAE.load_from_disk(path, converter=mindchain_disk_loader)``);
- :func:`mindchain_huggingface_loader` downloads, then calls the disk loader (a
  ``PretrainedSaeHuggingfaceLoader``).

Every check of the file happens in :func:`read_checkpoint`, so each of the three layers
gives the same clear errors. The training history is kept in
``sae.cfg.metadata.training_history``; :func:`training_history` reads it back.
"""

from __future__ import annotations

import math
import numbers
import pickle
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.sites import STACKS, Site, site

MINDCHAIN_LOADER = "mindchain_t5gemma2"
"""Name of this converter in SAELens' loader tables and in ``conversion_func``."""
MINDCHAIN_REPO = "mindchain/t5gemma2-sae-all-layers"
T5GEMMA2_MODEL = "google/t5gemma-2-270m-270m"

# The card gives no sequence length. 128 tokens is what the card's training recipe
# (1,500 short text samples, batch size 2) suggests; override it with cfg_overrides.
CONTEXT_SIZE = 128
# T5Gemma 2's tokenizer, like Gemma's, prepends <bos>.
PREPEND_BOS = True

TENSOR_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
REQUIRED_KEYS = ("layer_type", "layer_idx", "d_in", "d_sae", *TENSOR_KEYS)

_FILENAME_RE = re.compile(r"^sae_(encoder|decoder)_(\d+)\.pt$")


class MindchainCheckpointError(ValueError):
    """A mindchain checkpoint file is unreadable or inconsistent; the message names the file."""


@dataclass
class MindchainCheckpoint:
    """One validated mindchain checkpoint."""

    path: Path
    """The file it was read from."""
    model_name: str
    layer_type: str
    """``encoder`` or ``decoder``."""
    layer_idx: int
    d_in: int
    d_sae: int
    tensors: dict[str, torch.Tensor]
    """``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` exactly as stored."""
    history: dict[str, Any] = field(default_factory=dict)
    """The training history (``loss`` and ``l0`` lists), JSON-safe."""

    @property
    def site(self) -> Site:
        """The hook site: the o_proj output of this layer."""
        return site(self.layer_type, self.layer_idx, "attn_out")


def mindchain_filename(stack: str, layer: int) -> str:
    """Repo path of one mindchain checkpoint, e.g. ``encoder/sae_encoder_05.pt``."""
    return f"{stack}/sae_{stack}_{layer:02d}.pt"


def site_for_filename(path: str | Path) -> Site | None:
    """The site a mindchain file name stands for (``sae_decoder_03.pt`` -> decoder layer 3), if any."""
    m = _FILENAME_RE.match(Path(path).name)
    return site(m.group(1), int(m.group(2)), "attn_out") if m else None


def _fail(path: Path, problem: str) -> MindchainCheckpointError:
    return MindchainCheckpointError(f"{path}: {problem}")


def _numpy_data_globals() -> list[Any]:
    """numpy's scalar/array reconstructors and dtypes: data, not code.

    A training script easily records ``np.float64`` values in the history; with only
    torch's default allowlist such a file would be refused although it runs no code.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def _load_pickle(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mindchain checkpoint file")
    try:
        # weights_only=True: tensors, numbers, strings, lists, dicts (and numpy scalars and
        # arrays) only; a pickle that wants to import or call anything else is refused
        # instead of executed.
        with torch.serialization.safe_globals(_numpy_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e):
            detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), first)
            detail = detail.removeprefix("WeightsUnpickler error: ").split(". Please use")[0]
            raise _fail(
                path,
                "the pickle needs to run code to load, which is refused (torch.load(weights_only=True) "
                f"failed: {detail}). A mindchain checkpoint holds only tensors, numbers, strings, "
                "lists and dicts; re-save it as such if you trust its source.",
            ) from e
        raise _fail(path, f"cannot be unpickled (corrupt file?): {first}") from e
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, AttributeError) as e:
        # torch reports truncation as a bare RuntimeError/OSError/EOFError naming no file.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        raise _fail(
            path, f"cannot be read, the file is truncated or corrupt ({type(e).__name__}: {msg})"
        ) from e


def _jsonable(value: Any) -> Any:
    """History values as plain JSON types (tensors become numbers or lists)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()  # numpy scalars and arrays
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _is_int(value: Any) -> bool:
    # numbers.Integral also admits numpy integers, which a training script may store.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_shapes(path: Path, tensors: dict[str, torch.Tensor], d_in: int, d_sae: int) -> None:
    def expected(di: int, ds: int) -> dict[str, tuple[int, ...]]:
        return {"W_enc": (di, ds), "b_enc": (ds,), "W_dec": (ds, di), "b_dec": (di,)}

    want = expected(d_in, d_sae)
    bad = [k for k in TENSOR_KEYS if tuple(tensors[k].shape) != want[k]]
    if not bad:
        return
    # The biases cannot be transposed, so they tell the dimensions the tensors agree on.
    b_enc, b_dec = tensors["b_enc"], tensors["b_dec"]
    if b_enc.ndim == 1 and b_dec.ndim == 1:
        t_in, t_sae = b_dec.shape[0], b_enc.shape[0]
        if (t_in, t_sae) != (d_in, d_sae) and all(
            tuple(tensors[k].shape) == s for k, s in expected(t_in, t_sae).items()
        ):
            raise _fail(
                path,
                f"the fields d_in={d_in}, d_sae={d_sae} disagree with the tensors, which have "
                f"d_in={t_in}, d_sae={t_sae} (W_enc {_shape(tensors['W_enc'])}, W_dec {_shape(tensors['W_dec'])})",
            )
    names = {"W_enc": "[d_in, d_sae]", "b_enc": "[d_sae]", "W_dec": "[d_sae, d_in]", "b_dec": "[d_in]"}
    problems = []
    for k in bad:
        got = tuple(tensors[k].shape)
        note = " (transposed?)" if len(got) == 2 and got[::-1] == want[k] and got != want[k] else ""
        problems.append(f"{k} has shape {list(got)}, expected {list(want[k])} = {names[k]}{note}")
    raise _fail(path, f"wrong tensor shapes for d_in={d_in}, d_sae={d_sae}: " + "; ".join(problems))


def read_checkpoint(path: str | Path) -> MindchainCheckpoint:
    """Load and validate one mindchain ``.pt`` file, running no pickle code.

    Raises:
        FileNotFoundError: the file does not exist.
        MindchainCheckpointError: (a ``ValueError``) the file needs code to unpickle, is
            truncated or corrupt, lacks keys, has wrong or transposed shapes, ``d_in`` /
            ``d_sae`` fields that disagree with the tensors, NaN or Inf values, or a
            ``layer_type``/``layer_idx`` that disagrees with its file name. The message
            starts with the file's path.
    """
    path = Path(path)
    data = _load_pickle(path)
    if not isinstance(data, dict):
        raise _fail(path, f"expected a dict of tensors and fields, found a {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise _fail(path, f"missing keys {missing}; the file has {sorted(map(str, data))}")

    layer_type, layer_idx, d_in, d_sae = (data[k] for k in ("layer_type", "layer_idx", "d_in", "d_sae"))
    if layer_type not in STACKS:
        raise _fail(path, f"layer_type is {layer_type!r}, expected one of {list(STACKS)}")
    for name, value, low in (("layer_idx", layer_idx, 0), ("d_in", d_in, 1), ("d_sae", d_sae, 1)):
        if not _is_int(value) or value < low:
            raise _fail(path, f"{name} is {value!r}, expected an integer >= {low}")
    layer_idx, d_in, d_sae = int(layer_idx), int(d_in), int(d_sae)
    model_name = data.get("model_name", T5GEMMA2_MODEL)
    if not isinstance(model_name, str):
        raise _fail(path, f"model_name is {model_name!r}, expected a string")

    named = site_for_filename(path)
    if named is not None and (named.stack, named.layer) != (layer_type, layer_idx):
        raise _fail(
            path,
            f"the file name says {named.stack} layer {named.layer}, but the checkpoint says "
            f"layer_type={layer_type!r}, layer_idx={layer_idx}",
        )

    tensors: dict[str, torch.Tensor] = {}
    for k in TENSOR_KEYS:
        t = data[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise _fail(path, f"{k} is {what}, expected a floating-point tensor")
        tensors[k] = t
    _check_shapes(path, tensors, d_in, d_sae)
    for k, t in tensors.items():
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if n_nan or n_inf:
            raise _fail(path, f"{k} has {n_nan} NaN and {n_inf} Inf values (of {t.numel()})")

    history = data.get("history", {})
    history = _jsonable(history) if isinstance(history, dict) else {"raw": _jsonable(history)}
    return MindchainCheckpoint(path, model_name, layer_type, layer_idx, d_in, d_sae, tensors, history)


def _source_file(path: Path) -> str:
    # Repo-relative spelling (``encoder/sae_encoder_05.pt``) when the layout is the repo's,
    # so converted configs carry no local paths.
    return f"{path.parent.name}/{path.name}" if path.parent.name in STACKS else path.name


def config_from_checkpoint(
    ckpt: MindchainCheckpoint,
    device: str | None = None,
    cfg_overrides: dict[str, Any] | None = None,
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The SAELens 6.x config dict of a checkpoint.

    The config has a 6.x ``sae_lens_version`` inside ``metadata``, so SAELens skips its
    pre-6 defaulting (which would turn ``apply_b_dec_to_input`` on and drop metadata).
    Overrides that are ``StandardSAEConfig`` fields (``device``, ``dtype``, ...) apply at
    the top level; every other override key (e.g. ``neuronpedia_id``, ``context_size``)
    goes into ``metadata``, where SAELens 6 keeps such fields.
    """
    import sae_lens
    from sae_lens import StandardSAEConfig

    s = ckpt.site
    metadata: dict[str, Any] = {
        "sae_lens_version": sae_lens.__version__,
        # Trained outside SAELens (mindchain's own script).
        "sae_lens_training_version": None,
        "model_name": ckpt.model_name,
        "hook_name": s.hook_name,
        "hook_head_index": None,
        "hf_hook_name": s.hf_module,
        "hf_hook_name_legacy": s.hf_module_legacy,
        "context_size": CONTEXT_SIZE,
        "prepend_bos": PREPEND_BOS,
        "layer_type": ckpt.layer_type,
        "layer_idx": ckpt.layer_idx,
        "training_history": ckpt.history,
        "source_format": "mindchain",
        "source_file": _source_file(ckpt.path),
        **(source or {}),
    }
    stored = ckpt.tensors["W_enc"].dtype
    cfg: dict[str, Any] = {
        "architecture": "standard",
        "d_in": ckpt.d_in,
        "d_sae": ckpt.d_sae,
        "dtype": str(stored).removeprefix("torch."),
        "device": device or "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    top_level = {f.name for f in fields(StandardSAEConfig)} | {"architecture"}
    for key, value in (cfg_overrides or {}).items():
        if key == "metadata" and isinstance(value, dict):
            metadata.update(value)
        elif key in top_level:
            cfg[key] = value
        else:
            metadata[key] = value
    return cfg


def _state_dict(ckpt: MindchainCheckpoint, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    from sae_lens.util import str_to_dtype

    # SAELens loads with load_state_dict(assign=True): these tensors become the parameters,
    # so they must already have the requested dtype and device. .to() returns the very
    # tensor when nothing changes, keeping the weights bit-identical.
    dtype = str_to_dtype(cfg["dtype"])
    return {k: t.to(device=cfg["device"], dtype=dtype).contiguous() for k, t in ckpt.tensors.items()}


def get_mindchain_config_from_disk(
    path: str | Path, device: str | None = None, cfg_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """SAELens config dict of a local mindchain ``.pt`` file (a ``PretrainedSaeConfigDiskLoader``)."""
    return config_from_checkpoint(read_checkpoint(path), device, cfg_overrides)


def mindchain_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a local mindchain ``.pt`` file as a SAELens config and state dict.

    Usable as ``SAE.load_from_disk(path, converter=mindchain_disk_loader)``.

    Args:
        path: the ``.pt`` file.
        device: where the weights go.
        cfg_overrides: config overrides, e.g. ``{"dtype": "float16"}``.

    Returns:
        ``(cfg_dict, state_dict)`` for a ``StandardSAE``.
    """
    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, device, cfg_overrides)
    return cfg, _state_dict(ckpt, cfg)


def download(repo_id: str, filename: str, force_download: bool = False) -> Path:
    """``hf_hub_download`` with an error that says how to fix a missing file.

    Raises:
        FileNotFoundError: offline (or the hub is unreachable) and the file is not in the
            local cache, or the repo has no such file.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, force_download=force_download))
    except LocalEntryNotFoundError as e:
        why = (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub cannot be reached"
        )
        raise FileNotFoundError(
            f"{repo_id}/{filename}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{why}. To fix: go online (unset HF_HUB_OFFLINE) and retry; or on a machine with network "
            f"run `hf download {repo_id}` and point HF_HUB_CACHE at that cache."
        ) from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id}: the repo has no file {filename!r}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id}: no such Hugging Face repo (or it is private)") from e


def get_mindchain_config_from_hf(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SAELens config dict of one mindchain SAE on the hub (a ``PretrainedSaeConfigHuggingfaceLoader``).

    The format keeps its fields inside the weights pickle, so this downloads the ``.pt`` file.

    Args:
        repo_id: e.g. ``mindchain/t5gemma2-sae-all-layers``.
        folder_name: the file in the repo, e.g. ``encoder/sae_encoder_05.pt``.
    """
    ckpt = read_checkpoint(download(repo_id, folder_name, force_download))
    source = {"source_repo_id": repo_id, "source_file": folder_name}
    return config_from_checkpoint(ckpt, device, cfg_overrides, source)


def mindchain_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """Download one mindchain SAE and convert it (a ``PretrainedSaeHuggingfaceLoader``).

    Returns:
        ``(cfg_dict, state_dict, None)``: the format has no sparsity statistics.
    """
    path = download(repo_id, folder_name, force_download)
    ckpt = read_checkpoint(path)
    source = {"source_repo_id": repo_id, "source_file": folder_name}
    cfg = config_from_checkpoint(ckpt, device, cfg_overrides, source)
    return cfg, _state_dict(ckpt, cfg), None


def training_history(sae_or_cfg: Any) -> dict[str, Any]:
    """The mindchain training history (``{"loss": [...], "l0": [...]}``) of a loaded SAE.

    Accepts an ``SAE``, its ``cfg``, or a config dict (as returned by
    ``SAE.from_pretrained_with_cfg_and_sparsity``). Empty if the SAE carries none.
    """
    cfg = getattr(sae_or_cfg, "cfg", sae_or_cfg)
    metadata = cfg.get("metadata", {}) if isinstance(cfg, dict) else cfg.metadata
    history = metadata.get("training_history") if metadata is not None else None
    return dict(history) if history else {}


def final_l0(history: dict[str, Any]) -> float | None:
    """The last recorded L0 of a training history, if it has one."""
    l0 = history.get("l0")
    if isinstance(l0, list) and l0 and isinstance(l0[-1], (int, float)) and math.isfinite(l0[-1]):
        return float(l0[-1])
    return None
