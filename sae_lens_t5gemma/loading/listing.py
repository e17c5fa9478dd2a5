"""The package's own releases as text, from its YAML alone: no torch, no SAELens.

``sae-lens-t5gemma list`` must answer at once, and importing SAELens takes seconds. This
module reads ``pretrained_saes.yaml`` (the file :func:`registration.register` registers) and
names each SAE's hook from its mindchain file name, with :mod:`sites`. The text is the same
as :func:`registration.format_releases` gives for these releases (a test checks it).
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import PurePosixPath

import yaml

from sae_lens_t5gemma.model.sites import merged_attention_line, site

# The mindchain naming, as in ``mindchain.site_for_filename`` (which imports torch).
_MINDCHAIN_FILE = re.compile(r"^sae_(encoder|decoder)_(\d+)\.pt$")
_MINDCHAIN_LOADER = "mindchain_t5gemma2"


def _hooks(conversion_func: str | None, path: str) -> tuple[str, str]:
    m = _MINDCHAIN_FILE.match(PurePosixPath(path).name)
    if conversion_func != _MINDCHAIN_LOADER or not m:
        return "?", "?"
    s = site(m.group(1), int(m.group(2)), "attn_out")
    return s.hook_name, s.hf_module


def format_package_releases() -> str:
    """One block per release of the package's ``pretrained_saes.yaml``: ids, paths, hook names."""
    releases = yaml.safe_load(files("sae_lens_t5gemma").joinpath("pretrained_saes.yaml").read_text())
    lines: list[str] = []
    for name, rel in releases.items():
        loader = rel.get("conversion_func")
        saes = rel.get("saes", [])
        lines.append(
            f"{name}  (repo {rel['repo_id']}, model {rel['model']}, loader {loader or 'sae_lens'}, {len(saes)} SAEs)"
        )
        rows = [("id", "path", "hook_name", "hf_hook_name")]
        rows += [(s["id"], s["path"], *_hooks(loader, s["path"])) for s in saes]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
            for r in rows
        ]
        lines += merged_attention_line([r[2] for r in rows[1:]])
    return "\n".join(lines)
