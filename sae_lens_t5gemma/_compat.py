"""Every reach into another library's internals, in one place.

SAELens, transformers and huggingface_hub offer no public hook for a few things this package
needs (SAELens has no plugin mechanism for releases, for instance). Each function here does one
such thing, says the version it was checked against and why it exists, and checks the installed
version first (:func:`check_version`): another minor version warns
(:class:`UncheckedVersionWarning`), another major version, or a missing internal, is a
:class:`CompatError` that names the package and the patch. Nothing is patched on import of this
module; each patch runs when its caller needs it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKED",
    "CompatError",
    "UncheckedVersionWarning",
    "check_version",
    "hub_settings",
    "install_saelens_entries",
    "read_gemma_scope_shapes_from_cache",
    "register_attention",
    "saelens_exclusion_mask",
    "saelens_release_directory",
    "saelens_loader_tables",
    "saelens_sae_wrapper",
]

CHECKED: dict[str, str] = {
    "sae-lens": "6.54",
    "transformers": "5.23",
    "huggingface_hub": "2.4",
}
"""The release series (major.minor) each patch was checked against."""


class CompatError(RuntimeError):
    """An installed library is outside what a patch was checked against, or lacks the internal it patches."""


class UncheckedVersionWarning(UserWarning):
    """An installed library's minor version differs from the one a patch was checked against."""


def _installed(package: str) -> str:
    return importlib.metadata.version(package)


def _series(version: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in version.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


_WARNED: set[tuple[str, str]] = set()


def check_version(package: str, checked: str, patch: str) -> None:
    """Check the installed ``package`` against the series ``checked`` (``"6.54"``) for ``patch``.

    Raises:
        CompatError: another major version (the internals a patch relies on are likely gone).

    Warns:
        UncheckedVersionWarning: the same major but another minor version (once per patch).
    """
    installed = _installed(package)
    have, want = _series(installed), _series(checked)
    if have[0] != want[0]:
        raise CompatError(
            f"sae_lens_t5gemma's {patch} was checked against {package} {checked}.x; {installed} is "
            f"installed. Install {package}=={checked}.* (see constraints.txt)."
        )
    if have != want and (package, patch) not in _WARNED:
        _WARNED.add((package, patch))
        warnings.warn(
            f"sae_lens_t5gemma's {patch} was checked against {package} {checked}.x; {installed} is "
            "installed. It may work; if it fails, install the checked version (see constraints.txt).",
            UncheckedVersionWarning,
            stacklevel=3,
        )


def _internal(module: Any, name: str, package: str, patch: str) -> Any:
    if not hasattr(module, name):
        raise CompatError(
            f"sae_lens_t5gemma's {patch} needs {module.__name__}.{name}, which {package} "
            f"{_installed(package)} does not have (checked against {CHECKED[package]}.x)."
        )
    return getattr(module, name)


# ------------------------------------------------------------------- SAELens: the release tables


def saelens_loader_tables() -> tuple[dict[str, Callable[..., Any]], dict[str, Callable[..., Any]]]:
    """SAELens' ``NAMED_PRETRAINED_SAE_LOADERS`` and ``NAMED_PRETRAINED_SAE_CONFIG_GETTERS``.

    Checked against SAELens 6.54.x. Why: SAELens 6 has no plugin mechanism; ``SAE.from_pretrained``
    looks a release's ``conversion_func`` up in these two module-level dicts, so a loader of
    ours must be an entry in them.
    """
    patch = "registration of loaders with SAELens"
    check_version("sae-lens", CHECKED["sae-lens"], patch)
    from sae_lens.loading import pretrained_sae_loaders as loaders

    return (
        _internal(loaders, "NAMED_PRETRAINED_SAE_LOADERS", "sae-lens", patch),
        _internal(loaders, "NAMED_PRETRAINED_SAE_CONFIG_GETTERS", "sae-lens", patch),
    )


def saelens_release_directory() -> dict[str, Any]:
    """The dict of releases that ``SAE.from_pretrained`` reads (name -> ``PretrainedSAELookup``).

    Checked against SAELens 6.54.x. Why: ``get_pretrained_saes_directory()`` is
    ``functools.cache``-d and reads SAELens' own YAML only; it returns the same dict on every
    call, so a release added to it is found by ``SAE.from_pretrained``.
    """
    patch = "registration of releases with SAELens"
    check_version("sae-lens", CHECKED["sae-lens"], patch)
    from sae_lens.loading import pretrained_saes_directory as directory

    return _internal(directory, "get_pretrained_saes_directory", "sae-lens", patch)()


def install_saelens_entries(
    releases: dict[str, Any], loaders: dict[str, tuple[Callable[..., Any], Callable[..., Any]]]
) -> None:
    """Write releases and loaders into SAELens' tables: the only place that does.

    Callers have checked every name (see ``loading.registration``), so this cannot fail halfway.
    """
    named_loaders, named_getters = saelens_loader_tables()
    directory = saelens_release_directory()
    for name, (loader, getter) in loaders.items():
        named_loaders[name] = loader
        named_getters[name] = getter
    for name, lookup in releases.items():
        directory[name] = lookup


# ------------------------------------------------------ SAELens: Gemma Scope 2 shapes, offline


def _local_safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def read_gemma_scope_shapes_from_cache() -> None:
    """Make SAELens' ``get_safetensors_tensor_shapes`` read a locally cached file first.

    Checked against SAELens 6.54.x. Why: SAELens' Gemma 3 config getter (Gemma Scope 2) calls
    it to learn ``d_in``/``d_sae`` before it downloads the same file, and the original sends
    HTTP range requests with ``requests`` directly, so it fails offline even with the file in
    the hub cache. SAELens has no hook for this, so the module attribute is replaced (the
    getter looks it up at call time): a cached file is read locally; otherwise, offline, a
    clear error names the missing file; online, the original runs unchanged. Idempotent;
    called by the code that loads Gemma Scope 2 SAEs, not on import.
    """
    patch = "offline Gemma Scope 2 shapes"
    check_version("sae-lens", CHECKED["sae-lens"], patch)
    from huggingface_hub import constants, try_to_load_from_cache
    from sae_lens.loading import pretrained_sae_loaders as loaders

    original = _internal(loaders, "get_safetensors_tensor_shapes", "sae-lens", patch)
    if getattr(original, "_reads_local_cache", False):
        return

    @functools.wraps(original)
    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return _local_safetensors_shapes(cached)
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"{repo_id}/{filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                "and HF_HUB_OFFLINE is set, so its tensor shapes cannot be read."
            )
        return original(repo_id, filename)

    shapes._reads_local_cache = True  # type: ignore[attr-defined]
    loaders.get_safetensors_tensor_shapes = shapes


# ------------------------------------------------------------ huggingface_hub: cache and offline


@contextlib.contextmanager
def hub_settings(cache_dir: str | Path, offline: bool) -> Iterator[Path]:
    """Point huggingface_hub at ``cache_dir``, online or offline, for a block; then restore.

    Checked against huggingface_hub 2.4.x. Why: huggingface_hub reads ``HF_HUB_CACHE`` and
    ``HF_HUB_OFFLINE`` once, at import, into ``huggingface_hub.constants``; the environment
    variables alone do not reach a running process. This sets both the variables (for
    subprocesses) and the module constants (for this process).
    """
    patch = "hub cache and offline switch"
    check_version("huggingface_hub", CHECKED["huggingface_hub"], patch)
    from huggingface_hub import constants

    cache_dir = Path(cache_dir)
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    saved = (
        _internal(constants, "HF_HUB_CACHE", "huggingface_hub", patch),
        _internal(constants, "HF_HUB_OFFLINE", "huggingface_hub", patch),
    )
    os.environ["HF_HUB_CACHE"] = str(cache_dir)
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache_dir), offline
    try:
        yield cache_dir
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------ SAELens: HookedSAETransformer's splicing


def saelens_sae_wrapper() -> type:
    """SAELens' private ``_SAEWrapper`` (``sae_lens.analysis.hooked_sae_transformer``), to subclass.

    Checked against SAELens 6.54.x. Why: it is how ``HookedSAETransformer`` splices an SAE (the
    error term, the ``hook_sae_*`` points, the special-token bypass); ``model.splicing`` subclasses
    it so that an SAE spliced into ``HookedT5Gemma2`` behaves and caches exactly as there. SAELens
    exports no public wrapper.
    """
    patch = "SAE splicing (SAELens' _SAEWrapper)"
    check_version("sae-lens", CHECKED["sae-lens"], patch)
    from sae_lens.analysis import hooked_sae_transformer

    return _internal(hooked_sae_transformer, "_SAEWrapper", "sae-lens", patch)


def saelens_exclusion_mask(model: Any, ids: Any, exclude_special_tokens: bool | list[int]) -> Any:
    """``HookedSAETransformer._compute_exclusion_mask`` (private) on ``model``'s tokenizer: the
    ``[batch, pos]`` mask of positions whose id is special (or in the given list).

    Checked against SAELens 6.54.x. Why: ``exclude_special_tokens=True`` must pick the same
    special tokens as SAELens does; the method reads only ``model.tokenizer``, so it runs
    unbound on a ``HookedT5Gemma2``.
    """
    patch = "exclude_special_tokens (HookedSAETransformer._compute_exclusion_mask)"
    check_version("sae-lens", CHECKED["sae-lens"], patch)
    from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer

    compute = _internal(HookedSAETransformer, "_compute_exclusion_mask", "sae-lens", patch)
    return compute(model, ids, exclude_special_tokens)


# ------------------------------------------------------------- transformers: attention registry

_REGISTERED_ATTENTION: set[str] = set()


def register_attention(name: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as transformers attention implementation ``name`` (idempotent).

    Checked against transformers 5.23.x. Why: the decoder's merged attention computes
    ``softmax([q k_dec | q k_enc]) @ [v_dec | v_enc]`` inside one transformers call; to hook its
    self and cross parts and the patterns, ``model.routing`` gives a routed attention module a
    config copy whose ``_attn_implementation`` names ``fn``, and transformers looks it up in the
    process-wide ``AttentionInterface`` registry. ``AttentionInterface.register`` is public, but
    it adds to a global table, so it runs the first time routing needs it, not on import.
    """
    if name in _REGISTERED_ATTENTION:
        return
    patch = "hooks inside the decoder's merged attention (AttentionInterface)"
    check_version("transformers", CHECKED["transformers"], patch)
    import transformers

    _internal(transformers, "AttentionInterface", "transformers", patch).register(name, fn)
    _REGISTERED_ATTENTION.add(name)
