"""Registration of this package's releases and loaders with SAELens.

SAELens 6 has no plugin mechanism: ``SAE.from_pretrained(release=...)`` looks releases up
in the dict returned by the ``functools.cache``-d ``get_pretrained_saes_directory()``
(read from SAELens' own YAML only) and loaders up in ``NAMED_PRETRAINED_SAE_LOADERS`` and
``NAMED_PRETRAINED_SAE_CONFIG_GETTERS``. So registering means adding entries to those
three tables, which :func:`sae_lens_t5gemma._compat.install_saelens_entries` does, in one
place (with the SAELens version it was checked against). Entries are only ever added: a name
that SAELens (or anyone else) already uses is a :class:`RegistrationError`.

- :func:`register` (called by ``import sae_lens_t5gemma``, idempotent) adds the
  ``mindchain_t5gemma2`` and ``sae_lens_t5gemma_local`` loaders and the package's
  ``pretrained_saes.yaml`` (release ``t5gemma2-270m-attn_out``).
- :func:`register_release_yaml` adds the releases of any YAML file in SAELens' schema,
  from the hub or from a local folder (``local_root=``, e.g. SAEs trained or converted
  here), so they load with ``SAE.from_pretrained`` too; :func:`register_local_release` one
  whose SAE folders lie next to it; :func:`register_release_lookup` one parsed release.
- Reading and writing the YAML is :mod:`.release_yaml`'s job, the local loaders
  :mod:`.saelens_folder`'s.

Registration lives in the running process only; a fresh interpreter needs the import again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

from sae_lens_t5gemma import _compat
from sae_lens_t5gemma.loading import mindchain as mindchain
from sae_lens_t5gemma.loading.listing import format_release
from sae_lens_t5gemma.loading.release_yaml import RegistrationError, lookup_from_yaml, read_yaml_file
from sae_lens_t5gemma.loading.saelens_folder import get_local_config, local_loader
from sae_lens_t5gemma.loading.untrusted import short_repr

LOCAL_LOADER = "sae_lens_t5gemma_local"
"""Loader for releases whose files lie in a local folder (``repo_id`` is that folder)."""
PACKAGE_RELEASE = "t5gemma2-270m-attn_out"

Loader = Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]]
ConfigGetter = Callable[..., dict[str, Any]]

# What this package added, so that repeating a registration is a no-op and only our own
# entries may ever be replaced.
_OUR_RELEASES: dict[str, PretrainedSAELookup] = {}
_OUR_LOADERS: dict[str, tuple[Loader, ConfigGetter]] = {}
# The package's own releases (from its pretrained_saes.yaml): never replaceable, so no
# user YAML can hijack ``t5gemma2-270m-attn_out``.
_PACKAGE_RELEASES: set[str] = set()


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
    """Install entries checked by the callers (so this cannot fail halfway) and remember them as ours."""
    _compat.install_saelens_entries(releases, loaders)
    _OUR_LOADERS.update(loaders)
    _OUR_RELEASES.update(releases)


def _check_loader(name: str, loader: Loader, getter: ConfigGetter, replace: bool) -> bool:
    """True if the loader must be installed, False if it already is; error on a clash."""
    named_loaders, named_getters = _compat.saelens_loader_tables()
    have = named_loaders.get(name)
    have_getter = named_getters.get(name)
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
    have = _compat.saelens_release_directory().get(lookup.release)
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


def register_release_lookup(lookup: PretrainedSAELookup, replace: bool = False) -> bool:
    """Add one parsed release (a ``PretrainedSAELookup``) to SAELens' directory.

    Returns:
        True if added, False if the identical release was already registered.

    Raises:
        RegistrationError: the name is one of SAELens' own (or someone else's) releases,
            or ours with other contents and no ``replace``; or its loader is unknown.
    """
    _check_conversion_func(lookup.release, lookup.conversion_func, "<register_release_lookup>")
    if not _check_release(lookup, replace):
        return False
    _install({lookup.release: lookup}, {})
    return True


def _check_conversion_func(release: str, conversion_func: str | None, where: str) -> None:
    name = conversion_func or "sae_lens"
    named_loaders = _compat.saelens_loader_tables()[0]
    if name not in named_loaders:
        known = sorted(named_loaders)
        raise RegistrationError(
            f"{where}: release {release!r} uses conversion_func {name!r}, which is no registered loader (known: {known})"
        )


def read_release_yaml(
    path: str | Path | Traversable,
    loader: str | None = None,
    local_root: str | Path | None = None,
    allow_outside_root: bool = False,
) -> list[PretrainedSAELookup]:
    """Parse every release of a YAML file in SAELens' schema, registering nothing.

    The file is read with a safe loader that also refuses aliases, and at most
    :data:`~.release_yaml.MAX_YAML_BYTES` of it.

    Args:
        path: the YAML file.
        loader: a registered loader name that replaces every release's ``conversion_func``.
        local_root: the folder the releases' ``path``s are relative to. If given, the
            releases load from there through ``sae_lens_t5gemma_local`` and their
            ``repo_id`` becomes that folder.
        allow_outside_root: accept ``path``s that are absolute, contain ``..`` or (with
            ``local_root``) resolve outside it through a symlink. Off by default.
    """
    where, data = read_yaml_file(path)
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

    For locally trained or converted SAEs: write a YAML (see :func:`~.release_yaml.release_yaml`) whose
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
            leave the folder, over :data:`~.release_yaml.MAX_YAML_BYTES`), an unknown loader, or a
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
    lookups = read_release_yaml(files("sae_lens_t5gemma").joinpath("pretrained_saes.yaml"))
    directory = _compat.saelens_release_directory()
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


# ------------------------------------------------------------------------------ queries


def ours() -> list[str]:
    """Names of the releases this package registered in this process."""
    return list(_OUR_RELEASES)


def valid_sae_ids(release: str) -> list[str]:
    """Every SAE id of a registered release.

    Raises:
        ValueError: unknown release; the message lists close release names.
    """
    directory = _compat.saelens_release_directory()
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
    lookup = _compat.saelens_release_directory()[release]
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
    directory = _compat.saelens_release_directory()
    lines: list[str] = []
    for name in ours():
        lk = directory[name]
        rows = [(sae_id, path, *hook_names(name, sae_id)) for sae_id, path in lk.saes_map.items()]
        lines += format_release(name, lk.repo_id, lk.model, lk.conversion_func, rows)
    if include_all:
        others = [n for n in directory if n not in _OUR_RELEASES]
        lines.append(f"\nSAELens' other releases ({len(others)}):")
        for n in others:
            lk = directory[n]
            lines.append(
                f"  {n}  repo {lk.repo_id}  model {lk.model}  loader {lk.conversion_func or 'sae_lens'}  {len(lk.saes_map)} SAEs"
            )
    return "\n".join(lines)
