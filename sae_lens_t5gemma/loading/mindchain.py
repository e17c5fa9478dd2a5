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
``sae.cfg.metadata.training_history`` (bounded by :mod:`.mindchain_history`, whose
:func:`~.mindchain_history.training_history` reads it back).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.loading.hub import download
from sae_lens_t5gemma.loading.mindchain_history import bounded_history
from sae_lens_t5gemma.loading.untrusted import short_repr, structural_problem
from sae_lens_t5gemma.model.sites import STACKS, Site, site
from sae_lens_t5gemma.model.sizes import T5GEMMA2_MODEL

MINDCHAIN_LOADER = "mindchain_t5gemma2"
"""Name of this converter in SAELens' loader tables and in ``conversion_func``."""

# The card gives no sequence length. 128 tokens is what the card's training recipe
# (1,500 short text samples, batch size 2) suggests; override it with cfg_overrides.
CONTEXT_SIZE = 128
# T5Gemma 2's tokenizer, like Gemma's, prepends <bos>.
PREPEND_BOS = True
ASSUMED = {
    "context_size": "guess: the card gives no sequence length; 128 from its recipe (short texts)",
    "prepend_bos": "guess: T5Gemma 2's tokenizer prepends <bos>",
    "exclude_special_tokens": "guess: the card does not say whether special-token positions were trained on",
    "training_convention": "unknown: the card does not say how the decoder was fed (see issue 8)",
    "dataset_path": "unknown: the card names no dataset (1,500 short text samples)",
}
"""What the metadata of a mindchain SAE assumes rather than knows (``metadata.assumed``)."""
# The precision the card's activations were harvested in.
MODEL_FROM_PRETRAINED_KWARGS = {"dtype": "float16"}

TENSOR_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_LAYER = 999
MAX_WIDTH = 2**24
MAX_PICKLE_BYTES = 16 * 2**20
"""Largest pickle record (the non-tensor part of a file) that is unpickled."""

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
    """``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` with the stored values (contiguous, own storage)."""
    history: dict[str, Any] = field(default_factory=dict)
    """The training history (``loss`` and ``l0`` lists), bounded, standard JSON."""
    history_summary: dict[str, Any] = field(default_factory=dict)
    """Count/first/last/min/max/mean of each history sequence that was cut."""
    known_from: dict[str, str] = field(default_factory=dict)
    """Where ``layer_type``, ``layer_idx``, ``d_in``, ``d_sae`` came from (checkpoint, file name, shapes)."""

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


@functools.cache
def _numpy_data_globals() -> tuple[Any, ...]:
    """numpy's scalar/array reconstructors and dtypes: data, not code.

    A training script easily records ``np.float64`` values in the history; with only
    torch's default allowlist such a file would be refused although it runs no code.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return (core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes)


def _pickle_size(path: Path) -> int | None:
    """Size of the pickle record (``*/data.pkl``) of a zip checkpoint; None for legacy files.

    The pickle is the part that expands into Python objects (the tensors' bytes are
    separate records), so bounding it bounds what unpickling can allocate.
    """
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None
    try:
        with zipfile.ZipFile(path) as z:
            return max((i.file_size for i in z.infolist() if i.filename.endswith("/data.pkl")), default=0)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        raise _fail(
            path, f"cannot be read, the file is truncated or corrupt ({type(e).__name__}: {msg})"
        ) from e


def _load_pickle(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mindchain checkpoint file")
    pkl = _pickle_size(path)
    if pkl is not None and pkl > MAX_PICKLE_BYTES:
        raise _fail(
            path,
            f"its pickled fields (data.pkl) take {pkl:,} bytes, more than the {MAX_PICKLE_BYTES:,} read; "
            "a mindchain checkpoint holds four tensors and a short history (store long histories as tensors)",
        )
    try:
        # weights_only=True: tensors, numbers, strings, lists, dicts (and numpy scalars and
        # arrays) only; a pickle that wants to import or call anything else is refused
        # instead of executed. mmap=True: the tensors stay in the (page-cached) file until
        # read, so nothing is allocated before the checks below, and a clean file is never
        # copied. Legacy (non-zip) files cannot be mapped and are read whole.
        with torch.serialization.safe_globals(list(_numpy_data_globals())):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=pkl is not None)
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
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        AttributeError,
        MemoryError,
    ) as e:
        # torch reports truncation as a bare RuntimeError/OSError/EOFError naming no file.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        raise _fail(
            path, f"cannot be read, the file is truncated or corrupt ({type(e).__name__}: {msg[:300]})"
        ) from e


# ------------------------------------------------------------------------ the tensors


def _is_int(value: Any) -> bool:
    # numbers.Integral also admits numpy integers, which a training script may store.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_tensor(path: Path, key: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _fail(path, f"{key} is a {type(t).__name__}, expected a floating-point tensor")
    problem = structural_problem(t)
    if problem is not None:
        raise _fail(path, f"{key} {problem}")
    if not t.is_floating_point():
        raise _fail(path, f"{key} is a {t.dtype} tensor, expected a floating-point tensor")
    if t.dtype not in ALLOWED_DTYPES:
        raise _fail(
            path,
            f"{key} has dtype {t.dtype}; accepted: float32, float16, bfloat16 "
            "(converted to the dtype asked for when loading, float32 by default)",
        )
    used = t.numel() * t.element_size()
    stored = t.untyped_storage().nbytes()
    if stored > 2 * used + 4096:
        raise _fail(
            path,
            f"{key} is a view of {used:,} bytes into a storage of {stored:,} bytes; refused "
            "(re-save the tensor on its own, e.g. with .clone())",
        )
    return t


def _check_shared(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    seen: dict[int, str] = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            raise _fail(
                path,
                f"{seen[ptr]} and {k} share one storage (views of one buffer, e.g. tied weights); "
                "save them as separate tensors",
            )
        seen[ptr] = k


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
                f"d_in={t_in}, d_sae={t_sae} (W_enc {list(tensors['W_enc'].shape)}, W_dec {list(tensors['W_dec'].shape)})",
            )
    names = {"W_enc": "[d_in, d_sae]", "b_enc": "[d_sae]", "W_dec": "[d_sae, d_in]", "b_dec": "[d_in]"}
    problems = []
    for k in bad:
        got = tuple(tensors[k].shape)
        note = " (transposed?)" if len(got) == 2 and got[::-1] == want[k] and got != want[k] else ""
        problems.append(f"{k} has shape {list(got)}, expected {list(want[k])} = {names[k]}{note}")
    raise _fail(path, f"wrong tensor shapes for d_in={d_in}, d_sae={d_sae}: " + "; ".join(problems))


def _widths_from_tensors(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    # The biases cannot be transposed, so they give the widths; else W_enc's shape does.
    b_enc, b_dec, w_enc = tensors["b_enc"], tensors["b_dec"], tensors["W_enc"]
    d_in = b_dec.shape[0] if b_dec.ndim == 1 else (w_enc.shape[0] if w_enc.ndim == 2 else 0)
    d_sae = b_enc.shape[0] if b_enc.ndim == 1 else (w_enc.shape[1] if w_enc.ndim == 2 else 0)
    return d_in, d_sae


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's CPU ops on the calling thread only, for the duration.

    A sum is bound by memory bandwidth, so a second thread gains little when the machine
    is idle. When it is busy, a parallel region waits for its slowest thread to be
    scheduled: ``benchmarks/bench_load.py`` measured the finiteness sums of the 36
    mindchain SAEs at 0.42 s with 2 threads against 0.10 s with 1 on a shared 2-core machine.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with _one_thread():
        sums = [float(t.sum()) for t in tensors.values()]
    for (k, t), total in zip(tensors.items(), sums, strict=True):
        # One sum is finite iff every element is (bar overflow, which the exact count
        # below then clears); the exact count runs only when the sum is not finite.
        if math.isfinite(total):
            continue
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if n_nan or n_inf:
            raise _fail(path, f"{k} has {n_nan} NaN and {n_inf} Inf values (of {t.numel()})")


def _field(path: Path, data: dict[str, Any], name: str, low: int, high: int) -> int | None:
    if name not in data:
        return None
    value = data[name]
    if not _is_int(value) or value < low:
        raise _fail(path, f"{name} is {short_repr(value)}, expected an integer >= {low}")
    if value > high:
        raise _fail(path, f"{name} is {short_repr(value)}, more than the largest accepted value {high}")
    return int(value)


def read_checkpoint(path: str | Path) -> MindchainCheckpoint:
    """Load and validate one mindchain ``.pt`` file, running no pickle code.

    Only ``W_enc``, ``b_enc``, ``W_dec`` and ``b_dec`` are required (the card's quick start
    shows no more): the stack and layer come from the file name
    (``encoder/sae_encoder_05.pt``), the widths from the shapes. The fields
    ``layer_type``, ``layer_idx``, ``d_in`` and ``d_sae``, where present, are cross-checks.
    Every tensor is checked from its metadata (layout, device, dtype, strides, storage
    size, shared storage) before any of its data is read, so a hostile file cannot make
    this allocate more than the file holds.

    Raises:
        FileNotFoundError: the file does not exist.
        MindchainCheckpointError: (a ``ValueError``) the file needs code to unpickle, is
            truncated or corrupt, lacks tensors, has unsafe or unsupported tensors, wrong
            or transposed shapes, fields that disagree with the tensors or the file name,
            or NaN or Inf values. The message starts with the file's path.
    """
    path = Path(path)
    data = _load_pickle(path)
    if not isinstance(data, dict):
        raise _fail(path, f"expected a dict of tensors and fields, found a {type(data).__name__}")
    missing = [k for k in TENSOR_KEYS if k not in data]
    if missing:
        keys = sorted(short_repr(k) if not isinstance(k, str) else k for k in list(data)[:50])
        raise _fail(path, f"missing keys {missing}; the file has {keys}")

    named = site_for_filename(path)
    layer_type = data.get("layer_type")
    if "layer_type" in data and layer_type not in STACKS:
        raise _fail(path, f"layer_type is {short_repr(layer_type)}, expected one of {list(STACKS)}")
    layer_idx = _field(path, data, "layer_idx", 0, MAX_LAYER)
    d_in_field = _field(path, data, "d_in", 1, MAX_WIDTH)
    d_sae_field = _field(path, data, "d_sae", 1, MAX_WIDTH)
    if named is not None and named.layer > MAX_LAYER:
        raise _fail(
            path, f"the file name says layer {named.layer}, more than the largest accepted {MAX_LAYER}"
        )
    if named is None and (layer_type is None or layer_idx is None):
        raise _fail(
            path,
            "cannot tell the stack and layer: the file name is not sae_<encoder|decoder>_<NN>.pt "
            "and the file has no layer_type and layer_idx fields",
        )
    if named is not None and (layer_type or named.stack, named.layer if layer_idx is None else layer_idx) != (
        named.stack,
        named.layer,
    ):
        raise _fail(
            path,
            f"the file name says {named.stack} layer {named.layer}, but the checkpoint says "
            f"layer_type={layer_type!r}, layer_idx={layer_idx}",
        )
    stack = named.stack if named is not None else str(layer_type)
    layer = named.layer if named is not None else int(layer_idx)  # type: ignore[arg-type]
    model_name = data.get("model_name", T5GEMMA2_MODEL)
    if not isinstance(model_name, str) or len(model_name) > 200:
        raise _fail(path, f"model_name is {short_repr(model_name)}, expected a string (a hub model id)")

    tensors = {k: _check_tensor(path, k, data[k]) for k in TENSOR_KEYS}
    _check_shared(path, tensors)
    t_in, t_sae = _widths_from_tensors(tensors)
    d_in = t_in if d_in_field is None else d_in_field
    d_sae = t_sae if d_sae_field is None else d_sae_field
    _check_shapes(path, tensors, d_in, d_sae)
    _check_finite(path, tensors)

    dtypes = {k: t.dtype for k, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        # Never a silent downcast: mixed precisions all become float32.
        listed = ", ".join(f"{k} {str(d).removeprefix('torch.')}" for k, d in dtypes.items())
        warnings.warn(f"{path}: mixed dtypes ({listed}); all four upcast to float32", stacklevel=2)
        tensors = {k: t.float() for k, t in tensors.items()}
    for k, t in tensors.items():
        # Keep exactly the SAE: a view into a larger (or shared) storage becomes its own copy.
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            tensors[k] = t.clone(memory_format=torch.contiguous_format)

    history, summary = bounded_history(data.get("history", {}), path)
    known = {
        "layer_type": "checkpoint" if "layer_type" in data else "file name",
        "layer_idx": "checkpoint" if "layer_idx" in data else "file name",
        "d_in": "checkpoint" if d_in_field is not None else "tensor shapes",
        "d_sae": "checkpoint" if d_sae_field is not None else "tensor shapes",
    }
    return MindchainCheckpoint(path, model_name, stack, layer, d_in, d_sae, tensors, history, summary, known)


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
        "model_class_name": "HookedT5Gemma2",
        "model_from_pretrained_kwargs": dict(MODEL_FROM_PRETRAINED_KWARGS),
        "context_size": CONTEXT_SIZE,
        "prepend_bos": PREPEND_BOS,
        "exclude_special_tokens": False,
        "dataset_path": None,
        "training_convention": "unknown",
        "assumed": dict(ASSUMED),
        "layer_type": ckpt.layer_type,
        "layer_idx": ckpt.layer_idx,
        "fields_from": dict(ckpt.known_from),
        "training_history": ckpt.history,
        "source_format": "mindchain",
        "source_file": _source_file(ckpt.path),
        **(source or {}),
    }
    if ckpt.history_summary:
        metadata["training_history_summary"] = ckpt.history_summary
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


def converter_for(ckpt: MindchainCheckpoint) -> Any:
    """A ``SAE.load_from_disk`` converter over an already read checkpoint (no second read).

    It returns what :func:`mindchain_disk_loader` would return for ``ckpt.path``.
    """

    def converter(
        path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg = config_from_checkpoint(ckpt, device, cfg_overrides)
        return cfg, _state_dict(ckpt, cfg)

    return converter


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
