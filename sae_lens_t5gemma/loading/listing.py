"""The text of ``sae-lens-t5gemma list``: one block per release, with ids, paths and hook names.

:func:`format_release` lays out one release; :func:`registration.format_releases` uses it for
every registered release. ``list`` must answer at once, and importing SAELens takes seconds,
so :func:`format_package_releases` gives the package's own releases from its
``pretrained_saes.yaml`` alone (no torch, no SAELens), naming each SAE's hook from its
mindchain file name with :mod:`sites`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import PurePosixPath

import yaml

from sae_lens_t5gemma.model.sites import merged_attention_line, site

# The mindchain naming, as in ``mindchain.site_for_filename`` (which imports torch).
_MINDCHAIN_FILE = re.compile(r"^sae_(encoder|decoder)_(\d+)\.pt$")
_MINDCHAIN_LOADER = "mindchain_t5gemma2"


def format_release(
    name: str,
    repo_id: str,
    model: str,
    loader: str | None,
    saes: Sequence[tuple[str, str, str | None, str | None]],
) -> list[str]:
    """Lines of one release: a header, then ``id path hook_name hf_hook_name`` per SAE.

    Args:
        saes: ``(id, path, hook_name, hf_hook_name)``; an unknown hook name (None) shows as ``?``.
    """
    lines = [f"{name}  (repo {repo_id}, model {model}, loader {loader or 'sae_lens'}, {len(saes)} SAEs)"]
    rows = [("id", "path", "hook_name", "hf_hook_name")]
    rows += [(sae_id, path, hook or "?", hf or "?") for sae_id, path, hook, hf in saes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows
    ]
    return lines + merged_attention_line([r[2] for r in rows[1:]])


def _hooks(conversion_func: str | None, path: str) -> tuple[str | None, str | None]:
    m = _MINDCHAIN_FILE.match(PurePosixPath(path).name)
    if conversion_func != _MINDCHAIN_LOADER or not m:
        return None, None
    s = site(m.group(1), int(m.group(2)), "attn_out")
    return s.hook_name, s.hf_module


def format_package_releases() -> str:
    """One block per release of the package's ``pretrained_saes.yaml``: ids, paths, hook names."""
    releases = yaml.safe_load(files("sae_lens_t5gemma").joinpath("pretrained_saes.yaml").read_text())
    lines: list[str] = []
    for name, rel in releases.items():
        loader = rel.get("conversion_func")
        saes = [(s["id"], s["path"], *_hooks(loader, s["path"])) for s in rel.get("saes", [])]
        lines += format_release(name, rel["repo_id"], rel["model"], loader, saes)
    return "\n".join(lines)
