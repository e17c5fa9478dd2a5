"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``) on disk, checked before SAELens reads them.

:func:`check_cfg_json` refuses a config SAELens would misread; :func:`read_saelens_folder` is
SAELens' own disk loader with errors that name the file and a refusal of NaN/Inf weights.
:func:`local_loader` and :func:`get_local_config` are the SAELens loader pair of local
releases (``repo_id`` a folder): a SAELens folder, or a mindchain ``.pt`` file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.loading import mindchain as mindchain
from sae_lens_t5gemma.loading.release_yaml import RegistrationError
from sae_lens_t5gemma.loading.untrusted import short_repr

MAX_CFG_JSON_BYTES = 4 * 2**20
"""Largest ``cfg.json`` read from a local release folder."""


def _local_path(repo_id: str, folder_name: str) -> Path:
    path = Path(repo_id) / folder_name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such SAE file or folder in local release folder {repo_id}")
    return path


_CFG_BOOLS = ("apply_b_dec_to_input",)
_CFG_INTS = ("d_in", "d_sae")
_CFG_CHOICES = {
    "dtype": (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "torch.float32",
        "torch.float16",
        "torch.bfloat16",
        "torch.float64",
    ),
    "normalize_activations": (
        "none",
        "expected_average_only_in",
        "constant_norm_rescale",
        "layer_norm",
        "covariance_whitening",
    ),
    "reshape_activations": ("none", "hook_z"),
}


def check_cfg_json(folder: str | Path) -> dict[str, Any]:
    """Read and check a SAELens folder's ``cfg.json`` before SAELens builds from it.

    Raises:
        RegistrationError: (a ``ValueError``) the file is too large, not UTF-8, not JSON,
            not an object, or a field has a value SAELens would misread
            (``apply_b_dec_to_input: "yes"``, ``dtype: "torch.float128"``, a non-integer
            width); the message names the file and the field.
    """
    path = Path(folder) / "cfg.json"
    size = path.stat().st_size
    if size > MAX_CFG_JSON_BYTES:
        raise RegistrationError(
            f"{path}: {size:,} bytes, more than the {MAX_CFG_JSON_BYTES:,} read for a config"
        )
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise RegistrationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise RegistrationError(f"{path}: not valid JSON ({str(e)[:200]})") from e
    if not isinstance(cfg, dict):
        raise RegistrationError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    for key in _CFG_BOOLS:
        if key in cfg and not isinstance(cfg[key], bool):
            raise RegistrationError(f"{path}: {key} is {short_repr(cfg[key])}, expected true or false")
    for key in _CFG_INTS:
        v = cfg.get(key)
        if key in cfg and (
            not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= mindchain.MAX_WIDTH
        ):
            raise RegistrationError(
                f"{path}: {key} is {short_repr(v)}, expected an integer in 1..{mindchain.MAX_WIDTH}"
            )
    for key, allowed in _CFG_CHOICES.items():
        if key in cfg and cfg[key] is not None and cfg[key] not in allowed:
            raise RegistrationError(
                f"{path}: {key} is {short_repr(cfg[key])}, expected one of {list(allowed)}"
            )
    return cfg


def read_saelens_folder(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens' own disk loader, with safetensors' errors naming the file.

    Raises:
        RegistrationError: the weights file is corrupt, its header lies about shapes or
            offsets, or a tensor holds NaN or Inf (the message names the file and the tensor).
    """
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader
    from safetensors import SafetensorError

    weights = Path(path) / "sae_weights.safetensors"
    try:
        cfg, state = sae_lens_disk_loader(path, device, cfg_overrides)
    except SafetensorError as e:
        raise RegistrationError(f"{weights}: not a valid safetensors file ({str(e)[:300]})") from e
    # Every local SAELens folder the package loads comes through here (inspect, local releases);
    # a NaN or Inf weight would make every activation, score and page silently NaN.
    for name, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise RegistrationError(
                f"{weights}: tensor {name} holds {n_nan} NaN and {n_inf} Inf values (of {t.numel()})"
            )
    return cfg, state


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def get_local_config(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Config getter for local releases: a SAELens folder (``cfg.json``) or a mindchain ``.pt``."""
    from sae_lens.loading.pretrained_sae_loaders import get_sae_lens_config_from_disk

    path = _local_path(repo_id, folder_name)
    if path.is_file():
        return mindchain.get_mindchain_config_from_disk(path, device, cfg_overrides)
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"{path}: neither a mindchain .pt file nor a SAELens folder with cfg.json")
    check_cfg_json(path)
    return get_sae_lens_config_from_disk(path, device, cfg_overrides)


def local_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """Loader for local releases: ``repo_id`` is a folder, ``folder_name`` an SAE in it.

    A ``.pt`` file goes through the mindchain converter; a folder with ``cfg.json`` and
    ``sae_weights.safetensors`` (what ``SAE.save_model`` and SAELens' trainers write)
    through SAELens' own disk loader, with its ``sparsity.safetensors`` if present.
    """
    from sae_lens.constants import SPARSITY_FILENAME
    from safetensors import safe_open

    path = _local_path(repo_id, folder_name)
    if path.is_file():
        cfg, state = mindchain.mindchain_disk_loader(path, device, cfg_overrides)
        return cfg, state, None
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"{path}: neither a mindchain .pt file nor a SAELens folder with cfg.json")
    check_cfg_json(path)
    cfg, state = read_saelens_folder(path, device, cfg_overrides)
    log_sparsity = None
    if (path / SPARSITY_FILENAME).is_file():
        with safe_open(path / SPARSITY_FILENAME, framework="pt", device=device) as f:  # type: ignore[no-untyped-call]
            log_sparsity = f.get_tensor("sparsity")
    return cfg, state, log_sparsity
