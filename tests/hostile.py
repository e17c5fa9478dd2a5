"""Helpers shared by the hostile-input tests (``tests/*/test_*_hostile.py``)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from sae_lens_t5gemma.loading import convert as convert
from sae_lens_t5gemma.loading.mindchain import MindchainCheckpointError, mindchain_disk_loader
from sae_lens_t5gemma.stand_in import synthetic as synthetic

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]


def _tree(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` (symlinks not followed) with the sha256 of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link->" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _good(d_in: int = 8, d_sae: int = 16) -> dict:
    return synthetic.mindchain_checkpoint("encoder", 3, d_in=d_in, d_sae=d_sae, seed=3)


def _save(obj, folder: Path, name: str = "sae_encoder_03.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / name)
    return folder / name


def _refused(path: Path, message: str) -> None:
    """The file is refused with exactly ``message`` and its folder is unchanged."""
    before = _tree(path.parent)
    with pytest.raises(MindchainCheckpointError) as e:
        SAE.load_from_disk(path, converter=mindchain_disk_loader)
    assert str(e.value) == f"{path}: {message}"
    assert _tree(path.parent) == before


def _shared(ck: dict) -> dict:
    buf = torch.randn(8 * 16)
    ck["W_enc"], ck["W_dec"] = buf.view(8, 16), buf.view(16, 8)
    return ck
