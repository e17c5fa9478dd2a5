"""Registration of this package's releases and loaders with SAELens.

SAELens 6 has no plugin mechanism: ``SAE.from_pretrained(release=...)`` looks releases up
in the dict returned by the ``functools.cache``-d ``get_pretrained_saes_directory()``
(read from SAELens' own YAML only) and loaders up in ``NAMED_PRETRAINED_SAE_LOADERS`` and
``NAMED_PRETRAINED_SAE_CONFIG_GETTERS``. So registering means adding entries to those
three tables, which :func:`_install` does, in one place. Entries are only ever added:
a name that SAELens (or anyone else) already uses is a :class:`RegistrationError`.

- :func:`register` (called by ``import sae_lens_t5gemma``, idempotent) adds the
  ``mindchain_t5gemma2`` and ``sae_lens_t5gemma_local`` loaders and the package's
  ``pretrained_saes.yaml`` (release ``t5gemma2-270m-attn_out``).
- :func:`register_release_yaml` adds the releases of any YAML file in SAELens' schema,
  from the hub or from a local folder (``local_root=``, e.g. SAEs trained or converted
  here), so they load with ``SAE.from_pretrained`` too.
- :func:`release_yaml` writes such a YAML block.

Registration lives in the running process only; a fresh interpreter needs the import again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml
from sae_lens.loading import pretrained_sae_loaders as _loaders
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

from sae_lens_t5gemma.loading import mindchain as mindchain
from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.loading.mindchain import short_repr

LOCAL_LOADER = "sae_lens_t5gemma_local"
"""Loader for releases whose files lie in a local folder (``repo_id`` is that folder)."""
PACKAGE_RELEASE = "t5gemma2-270m-attn_out"

Loader = Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]]
ConfigGetter = Callable[..., dict[str, Any]]


class RegistrationError(ValueError):
    """A release or loader name is taken, or a release YAML is malformed."""


# What this package added, so that repeating a registration is a no-op and only our own
# entries may ever be replaced.
_OUR_RELEASES: dict[str, PretrainedSAELookup] = {}
_OUR_LOADERS: dict[str, tuple[Loader, ConfigGetter]] = {}
# The package's own releases (from its pretrained_saes.yaml): never replaceable, so no
# user YAML can hijack ``t5gemma2-270m-attn_out``.
_PACKAGE_RELEASES: set[str] = set()

MAX_YAML_BYTES = 2 * 2**20
"""Largest release YAML read (SAELens' whole directory of ~500 releases is 1.5 MB)."""
MAX_CFG_JSON_BYTES = 4 * 2**20
"""Largest ``cfg.json`` read from a local release folder."""


# ----------------------------------------------------------------------- local releases


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
            raise RegistrationError(
                f"{path}: {key} is {mindchain.short_repr(cfg[key])}, expected true or false"
            )
    for key in _CFG_INTS:
        v = cfg.get(key)
        if key in cfg and (
            not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= mindchain.MAX_WIDTH
        ):
            raise RegistrationError(
                f"{path}: {key} is {mindchain.short_repr(v)}, expected an integer in 1..{mindchain.MAX_WIDTH}"
            )
    for key, allowed in _CFG_CHOICES.items():
        if key in cfg and cfg[key] is not None and cfg[key] not in allowed:
            raise RegistrationError(
                f"{path}: {key} is {mindchain.short_repr(cfg[key])}, expected one of {list(allowed)}"
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


# ----------------------------------------------------------------------------- the tables


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    # A reloaded module makes new function objects for the same code; treat them as ours.
    return a is b or (
        getattr(a, "__module__", None) == getattr(b, "__module__", None)
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
    )


def _install(
    releases: dict[str, PretrainedSAELookup], loaders: dict[str, tuple[Loader, ConfigGetter]]
) -> None:
    """The one place that writes into SAELens' tables (SAELens has no plugin mechanism).

    Callers have already checked every name, so this cannot fail halfway.
    """
    directory = get_pretrained_saes_directory()  # the cached dict SAE.from_pretrained reads
    for name, (loader, getter) in loaders.items():
        _loaders.NAMED_PRETRAINED_SAE_LOADERS[name] = loader  # type: ignore[assignment]
        _loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS[name] = getter  # type: ignore[assignment]
        _OUR_LOADERS[name] = (loader, getter)
    for name, lookup in releases.items():
        directory[name] = lookup
        _OUR_RELEASES[name] = lookup


def _check_loader(name: str, loader: Loader, getter: ConfigGetter, replace: bool) -> bool:
    """True if the loader must be installed, False if it already is; error on a clash."""
    have = _loaders.NAMED_PRETRAINED_SAE_LOADERS.get(name)
    have_getter = _loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS.get(name)
    if have is None and have_getter is None:
        return True
    if (
        have is not None
        and _same_function(have, loader)
        and have_getter is not None
        and _same_function(have_getter, getter)
    ):
        return False
    if name not in _OUR_LOADERS:
        raise RegistrationError(
            f"Loader name {name!r} is already used by SAELens (or another package); "
            "refusing to overwrite it. Register under another name."
        )
    if not replace:
        raise RegistrationError(
            f"Loader {name!r} was registered earlier with other functions; pass replace=True to replace it."
        )
    return True


def register_loader(name: str, loader: Loader, config_getter: ConfigGetter, replace: bool = False) -> None:
    """Add a loader and its config getter to SAELens' tables under ``name``.

    Args:
        name: the ``conversion_func`` that releases name.
        loader: a ``PretrainedSaeHuggingfaceLoader``.
        config_getter: a ``PretrainedSaeConfigHuggingfaceLoader``.
        replace: allow replacing a loader this package registered before (never SAELens' own).

    Raises:
        RegistrationError: ``name`` is taken by SAELens or someone else, or by other
            functions of ours without ``replace``.
    """
    if _check_loader(name, loader, config_getter, replace):
        _install({}, {name: (loader, config_getter)})


def _check_release(lookup: PretrainedSAELookup, replace: bool) -> bool:
    have = get_pretrained_saes_directory().get(lookup.release)
    if have is None:
        return True
    if have == lookup:
        # Identical contents (e.g. after importlib.reload): nothing to do.
        return False
    if lookup.release in _PACKAGE_RELEASES:
        raise RegistrationError(
            f"Release {lookup.release!r} is one of sae_lens_t5gemma's own releases "
            f"(repo_id {have.repo_id!r}); it cannot be replaced. Use another release name."
        )
    if lookup.release not in _OUR_RELEASES:
        raise RegistrationError(
            f"Release {lookup.release!r} already exists in SAELens' pretrained SAE directory "
            f"(repo_id {have.repo_id!r}); refusing to overwrite it. Use another release name."
        )
    if not replace:
        raise RegistrationError(
            f"Release {lookup.release!r} was registered earlier with other contents "
            f"(repo_id {have.repo_id!r}); pass replace=True to replace it."
        )
    return True


def register_release(lookup: PretrainedSAELookup, replace: bool = False) -> bool:
    """Add one release to SAELens' directory.

    Returns:
        True if added, False if the identical release was already registered.

    Raises:
        RegistrationError: the name is one of SAELens' own (or someone else's) releases,
            or ours with other contents and no ``replace``; or its loader is unknown.
    """
    _check_conversion_func(lookup.release, lookup.conversion_func, "<register_release>")
    if not _check_release(lookup, replace):
        return False
    _install({lookup.release: lookup}, {})
    return True


def _check_conversion_func(release: str, conversion_func: str | None, where: str) -> None:
    name = conversion_func or "sae_lens"
    if name not in _loaders.NAMED_PRETRAINED_SAE_LOADERS:
        known = sorted(_loaders.NAMED_PRETRAINED_SAE_LOADERS)
        raise RegistrationError(
            f"{where}: release {release!r} uses conversion_func {name!r}, which is no registered loader (known: {known})"
        )


# --------------------------------------------------------------------------- YAML files


def _number(where: str, release: str, sae_id: str, key: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistrationError(
            f"{where}: release {release!r}: SAE {sae_id!r}: {key} is {short_repr(value)}, expected a finite number"
        )
    return float(value)


def _check_overrides(where: str, release: str, value: Any) -> dict[str, Any] | None:
    # SAELens copies these into every SAE's config (and its cfg.json): only flat scalars,
    # or one level of them (e.g. model_from_pretrained_kwargs).
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 64:
        raise RegistrationError(
            f"{where}: release {release!r}: config_overrides must be a mapping of at most 64 fields, "
            f"found {short_repr(value)}"
        )
    scalar = (str, int, float, bool, type(None))
    for key, v in value.items():
        flat = isinstance(v, scalar) or (
            isinstance(v, dict) and len(v) <= 64 and all(isinstance(x, scalar) for x in v.values())
        )
        if not isinstance(key, str) or not flat:
            raise RegistrationError(
                f"{where}: release {release!r}: config_overrides[{short_repr(key)}] is {short_repr(v)}, "
                "expected a number, string, boolean or a flat mapping of them"
            )
    return value


def _check_rel_path(where: str, release: str, sae_id: str, rel: str, allow_outside_root: bool) -> None:
    p = PurePosixPath(rel.replace("\\", "/"))
    if allow_outside_root:
        return
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise RegistrationError(
            f"{where}: release {release!r}: SAE {sae_id!r} has path {rel!r}, which leaves the release folder; "
            "refused (pass allow_outside_root=True if you trust this file)"
        )


def lookup_from_yaml(
    release: str, value: Any, where: str = "<yaml>", allow_outside_root: bool = False
) -> PretrainedSAELookup:
    """Parse one release entry of SAELens' ``pretrained_saes.yaml`` schema, as SAELens does.

    Args:
        allow_outside_root: accept SAE paths that are absolute or contain ``..``.

    Raises:
        RegistrationError: a required field is missing or malformed, or a path leaves the
            release folder; names ``where``.
    """
    if not isinstance(value, dict):
        raise RegistrationError(
            f"{where}: release {release!r} must be a mapping, found {type(value).__name__}"
        )
    for key in ("repo_id", "model", "saes"):
        if key not in value:
            raise RegistrationError(f"{where}: release {release!r} has no {key!r} field")
    for key in ("repo_id", "model"):
        if not isinstance(value[key], str) or not value[key] or len(value[key]) > 1000:
            raise RegistrationError(
                f"{where}: release {release!r}: {key} is {short_repr(value[key])}, expected a string"
            )
    if value.get("conversion_func") is not None and not isinstance(value["conversion_func"], str):
        raise RegistrationError(
            f"{where}: release {release!r}: conversion_func is {short_repr(value['conversion_func'])}, "
            "expected a loader name"
        )
    if not isinstance(value["saes"], list) or not value["saes"]:
        raise RegistrationError(f"{where}: release {release!r}: 'saes' must be a non-empty list")
    saes_map: dict[str, str] = {}
    var_explained: dict[str, float] = {}
    l0: dict[str, float] = {}
    neuronpedia: dict[str, str] = {}
    norm_scaling: dict[str, float] = {}
    for i, info in enumerate(value["saes"]):
        if not isinstance(info, dict) or "id" not in info or "path" not in info:
            raise RegistrationError(
                f"{where}: release {release!r}: saes[{i}] needs 'id' and 'path', found {short_repr(info)}"
            )
        for key in ("id", "path"):
            if (
                not isinstance(info[key], (str, int))
                or isinstance(info[key], bool)
                or len(str(info[key])) > 1000
            ):
                raise RegistrationError(
                    f"{where}: release {release!r}: saes[{i}].{key} is {short_repr(info[key])}, expected a string"
                )
        sae_id = str(info["id"])
        if sae_id in saes_map:
            raise RegistrationError(f"{where}: release {release!r}: duplicate SAE id {sae_id!r}")
        _check_rel_path(where, release, sae_id, str(info["path"]), allow_outside_root)
        saes_map[sae_id] = str(info["path"])
        var_explained[sae_id] = _number(
            where, release, sae_id, "variance_explained", info.get("variance_explained"), 1.00
        )
        l0[sae_id] = _number(where, release, sae_id, "l0", info.get("l0"), 0.00)
        np_id = info.get("neuronpedia")
        if np_id is not None and not isinstance(np_id, str):
            raise RegistrationError(
                f"{where}: release {release!r}: SAE {sae_id!r}: neuronpedia is {short_repr(np_id)}, expected a string"
            )
        neuronpedia[sae_id] = np_id  # type: ignore[assignment]
        if "norm_scaling_factor" in info:
            norm_scaling[sae_id] = _number(
                where, release, sae_id, "norm_scaling_factor", info["norm_scaling_factor"], 1.0
            )
    return PretrainedSAELookup(
        release=release,
        repo_id=str(value["repo_id"]),
        model=str(value["model"]),
        conversion_func=value.get("conversion_func"),
        saes_map=saes_map,
        expected_var_explained=var_explained,
        expected_l0=l0,
        neuronpedia_id=neuronpedia,
        norm_scaling_factor=norm_scaling,
        config_overrides=_check_overrides(where, release, value.get("config_overrides")),
    )


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors/aliases: an alias bomb (a 1 KB file that expands
    to gigabytes wherever it is walked) cannot be built. SAELens' own YAML uses none."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"YAML aliases (*{event.anchor}) are not accepted in a release file",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _read_yaml_text(path: str | Path | Traversable) -> tuple[str, Any]:
    if isinstance(path, str):
        path = Path(path)
    where = str(path)
    try:
        if isinstance(path, Path):
            size = path.stat().st_size
            if size > MAX_YAML_BYTES:
                raise RegistrationError(
                    f"{where}: {size:,} bytes, more than the {MAX_YAML_BYTES:,} read for a release YAML"
                )
        raw = path.read_bytes()[: MAX_YAML_BYTES + 1]
        if len(raw) > MAX_YAML_BYTES:
            raise RegistrationError(
                f"{where}: more than the {MAX_YAML_BYTES:,} bytes read for a release YAML"
            )
        return where, yaml.load(raw.decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: no such release YAML file") from e
    except UnicodeDecodeError as e:
        raise RegistrationError(
            f"{where}: cannot read release YAML: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from e
    except RecursionError as e:
        raise RegistrationError(f"{where}: cannot read release YAML: nested too deeply") from e
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = str(e.problem or e.context or type(e).__name__)[:300]
        raise RegistrationError(f"{where}: cannot read release YAML: {problem}{at}") from e
    except (OSError, yaml.YAMLError) as e:
        raise RegistrationError(f"{where}: cannot read release YAML: {str(e)[:500]}") from e


def read_release_yaml(
    path: str | Path | Traversable,
    loader: str | None = None,
    local_root: str | Path | None = None,
    allow_outside_root: bool = False,
) -> list[PretrainedSAELookup]:
    """Parse every release of a YAML file in SAELens' schema, registering nothing.

    The file is read with a safe loader that also refuses aliases, and at most
    :data:`MAX_YAML_BYTES` of it.

    Args:
        path: the YAML file.
        loader: a registered loader name that replaces every release's ``conversion_func``.
        local_root: the folder the releases' ``path``s are relative to. If given, the
            releases load from there through ``sae_lens_t5gemma_local`` and their
            ``repo_id`` becomes that folder.
        allow_outside_root: accept ``path``s that are absolute, contain ``..`` or (with
            ``local_root``) resolve outside it through a symlink. Off by default.
    """
    where, data = _read_yaml_text(path)
    if not isinstance(data, dict) or not data:
        raise RegistrationError(f"{where}: expected a mapping of release names to releases")
    root: Path | None = None
    if local_root is not None:
        root = Path(local_root).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"{where}: local_root {root} is not a folder")
    lookups = []
    for release, value in data.items():
        if not isinstance(release, (str, int)) or isinstance(release, bool) or len(str(release)) > 200:
            raise RegistrationError(f"{where}: release name {short_repr(release)} is not a short string")
        lookup = lookup_from_yaml(str(release), value, where, allow_outside_root)
        if root is not None:
            lookup.repo_id, lookup.conversion_func = str(root), LOCAL_LOADER
            for sae_id, rel in lookup.saes_map.items():
                target = root / rel
                if not target.exists():
                    raise FileNotFoundError(
                        f"{where}: SAE {sae_id!r} of release {release!r}: {target} does not exist"
                    )
                if not allow_outside_root and not target.resolve().is_relative_to(root):
                    raise RegistrationError(
                        f"{where}: release {release!r}: SAE {sae_id!r} resolves to {target.resolve()}, outside "
                        f"the release folder {root}; refused (pass allow_outside_root=True if you trust it)"
                    )
        if loader is not None:
            lookup.conversion_func = loader
        _check_conversion_func(lookup.release, lookup.conversion_func, where)
        lookups.append(lookup)
    return lookups


def register_release_yaml(
    path: str | Path | Traversable,
    loader: str | None = None,
    local_root: str | Path | None = None,
    replace: bool = False,
    allow_outside_root: bool = False,
) -> list[str]:
    """Register every release of a YAML file in SAELens' schema (all or none).

    For locally trained or converted SAEs: write a YAML (see :func:`release_yaml`) whose
    ``path``s are folders with ``cfg.json`` (or mindchain ``.pt`` files) below a folder,
    then ``register_release_yaml(yaml_path, local_root=folder)``; after that
    ``SAE.from_pretrained(release=..., sae_id=...)`` loads them from that folder.

    Args:
        path: the YAML file.
        loader: a registered loader name replacing every release's ``conversion_func``.
        local_root: load the releases from this local folder (see :func:`read_release_yaml`).
        replace: allow replacing a release registered earlier from a user's YAML. SAELens'
            releases and this package's own can never be replaced.
        allow_outside_root: accept SAE paths that leave the release folder (absolute,
            ``..``, symlinks out of ``local_root``).

    Returns:
        The release names.

    Raises:
        RegistrationError: malformed YAML (aliases, unsafe tags, bad fields, paths that
            leave the folder, over :data:`MAX_YAML_BYTES`), an unknown loader, or a
            release name that is taken (nothing is registered then).
    """
    lookups = read_release_yaml(path, loader, local_root, allow_outside_root)
    names = [lk.release for lk in lookups]
    if len(set(names)) != len(names):
        raise RegistrationError(f"{path}: a release name appears twice")
    todo = {lk.release: lk for lk in lookups if _check_release(lk, replace)}
    _install(todo, {})
    return names


def register() -> list[str]:
    """Register the package's loaders and its release ``t5gemma2-270m-attn_out``. Idempotent.

    Also lets SAELens' Gemma Scope 2 loader read tensor shapes from the local hub cache
    (see :func:`sae_lens_t5gemma.loading.gemma_scope.install_local_safetensors_shapes`).

    Returns:
        The package's release names.
    """
    wanted = {
        mindchain.MINDCHAIN_LOADER: (
            mindchain.mindchain_huggingface_loader,
            mindchain.get_mindchain_config_from_hf,
        ),
        LOCAL_LOADER: (local_loader, get_local_config),
    }
    # Check everything before touching SAELens, so a clash leaves it as it was.
    todo = {name: pair for name, pair in wanted.items() if _check_loader(name, *pair, replace=True)}
    _install({}, todo)
    for name, pair in wanted.items():
        _OUR_LOADERS.setdefault(name, pair)
    # Gemma Scope 2 (the comparison suite) must load from the local cache offline too.
    from sae_lens_t5gemma.loading.gemma_scope import install_local_safetensors_shapes

    install_local_safetensors_shapes()
    lookups = read_release_yaml(files("sae_lens_t5gemma").joinpath("pretrained_saes.yaml"))
    directory = get_pretrained_saes_directory()
    for lk in lookups:
        if lk.release not in _PACKAGE_RELEASES and directory.get(lk.release) not in (None, lk):
            raise RegistrationError(
                f"Release {lk.release!r} of sae_lens_t5gemma is already taken in SAELens' directory "
                f"(repo_id {directory[lk.release].repo_id!r})"
            )
    _install({lk.release: lk for lk in lookups if directory.get(lk.release) != lk}, {})
    for lk in lookups:
        _OUR_RELEASES.setdefault(lk.release, directory[lk.release])
    _PACKAGE_RELEASES.update(lk.release for lk in lookups)
    return [lk.release for lk in lookups]


def register_local_release(path: str | Path, replace: bool = False) -> str:
    """Register a release YAML whose SAE folders lie next to it (as ``train`` writes it).

    Returns:
        The (last) release name in the file.

    Raises:
        RegistrationError: see :func:`register_release_yaml`; a release registered before
            with other contents needs ``replace=True``, and SAELens' and this package's
            releases are never replaced.
    """
    path = Path(path)
    return register_release_yaml(path, local_root=path.parent, replace=replace)[-1]


def release_yaml(
    release: str,
    repo_id: str,
    model: str,
    saes: list[dict[str, Any]],
    conversion_func: str | None = None,
    links: dict[str, str] | None = None,
    header: str | None = None,
) -> str:
    """A release block in SAELens' ``pretrained_saes.yaml`` schema.

    Args:
        saes: entries with ``id`` and ``path`` and optionally ``l0``,
            ``variance_explained``, ``neuronpedia``.
        conversion_func: omit for SAELens-native folders (SAELens' default loader).
        header: comment lines put above the block.
    """
    body: dict[str, Any] = {}
    if conversion_func:
        body["conversion_func"] = conversion_func
    if links:
        body["links"] = links
    body["model"] = model
    body["repo_id"] = repo_id
    body["saes"] = saes
    text = yaml.safe_dump({release: body}, sort_keys=False, width=120)
    lookup_from_yaml(release, yaml.safe_load(text)[release])  # what we write must parse back
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return text


# ------------------------------------------------------------------------------ queries


def ours() -> list[str]:
    """Names of the releases this package registered in this process."""
    return list(_OUR_RELEASES)


def valid_sae_ids(release: str) -> list[str]:
    """Every SAE id of a registered release.

    Raises:
        ValueError: unknown release; the message lists close release names.
    """
    directory = get_pretrained_saes_directory()
    if release not in directory:
        import difflib

        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.5)
        raise ValueError(f"unknown SAE release {release!r}" + (f"; close matches: {close}" if close else ""))
    return list(directory[release].saes_map)


def check_sae_id(release: str, sae_id: str) -> None:
    """Raise a ``ValueError`` listing all valid ids if ``sae_id`` is not in ``release``.

    ``SAE.from_pretrained`` shows only the first five valid ids; this shows them all.
    """
    ids = valid_sae_ids(release)
    if sae_id not in ids:
        raise ValueError(
            f"SAE id {sae_id!r} is not in release {release!r}. Valid ids ({len(ids)}): {', '.join(ids)}"
        )


def hook_names(release: str, sae_id: str) -> tuple[str | None, str | None]:
    """``(hook_name, hf_hook_name)`` of an SAE of one of our releases, without downloading.

    Known for mindchain releases (from the file name) and local releases (read from
    ``cfg.json``); ``(None, None)`` where only a download would tell.
    """
    lookup = get_pretrained_saes_directory()[release]
    path = lookup.saes_map[sae_id]
    if lookup.conversion_func == mindchain.MINDCHAIN_LOADER:
        s = mindchain.site_for_filename(path)
        return (s.hook_name, s.hf_module) if s else (None, None)
    if lookup.conversion_func == LOCAL_LOADER:
        cfg_file = Path(lookup.repo_id) / path / "cfg.json"
        if cfg_file.is_file():
            # A listing must not fail on one broken folder: an unreadable cfg.json names no hook.
            try:
                meta = json.loads(cfg_file.read_text(encoding="utf-8")).get("metadata", {})
                return meta.get("hook_name"), meta.get("hf_hook_name")
            except (ValueError, AttributeError):
                return None, None
        s = mindchain.site_for_filename(path)
        return (s.hook_name, s.hf_module) if s else (None, None)
    return None, None


def format_releases(include_all: bool = False) -> str:
    """Text for ``sae-lens-t5gemma list``: our releases with ids and hook names.

    Args:
        include_all: also list SAELens' other releases (name, repo, model, loader, count).
    """
    directory = get_pretrained_saes_directory()
    lines: list[str] = []
    for name in ours():
        lk = directory[name]
        lines.append(
            f"{name}  (repo {lk.repo_id}, model {lk.model}, loader {lk.conversion_func or 'sae_lens'}, {len(lk.saes_map)} SAEs)"
        )
        rows = [("id", "path", "hook_name", "hf_hook_name")]
        for sae_id, path in lk.saes_map.items():
            hook, hf = hook_names(name, sae_id)
            rows.append((sae_id, path, hook or "?", hf or "?"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
            for r in rows
        ]
        lines += sites_mod.merged_attention_line([r[2] for r in rows[1:]])
    if include_all:
        others = [n for n in directory if n not in _OUR_RELEASES]
        lines.append(f"\nSAELens' other releases ({len(others)}):")
        for n in others:
            lk = directory[n]
            lines.append(
                f"  {n}  repo {lk.repo_id}  model {lk.model}  loader {lk.conversion_func or 'sae_lens'}  {len(lk.saes_map)} SAEs"
            )
    return "\n".join(lines)
