"""The training history inside a mindchain checkpoint, as bounded, standard JSON.

mindchain's files carry a ``history`` (``loss`` and ``l0`` lists, possibly long, possibly
numpy values or NaN). :func:`bounded_history` turns it into small JSON that fits in a SAELens
config's metadata (``metadata.training_history``); :func:`training_history` reads it back from
a loaded SAE and :func:`final_l0` takes its last L0.
"""

from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.loading.untrusted import short_repr, structural_problem

HISTORY_KEEP = 1000
"""Values kept at the end of each history sequence (the rest is summarised)."""
HISTORY_MAX_DEPTH = 8
HISTORY_MAX_KEYS = 64
HISTORY_MAX_ITEMS = 20_000


class _Trimmer:
    """Turns a training history into bounded, standard JSON (no NaN/Infinity), with notes.

    Long sequences keep their last :data:`HISTORY_KEEP` values plus a summary; values
    nested deeper than :data:`HISTORY_MAX_DEPTH` and anything past :data:`HISTORY_MAX_ITEMS`
    scalars are dropped. Nothing here recurses deeper than the depth bound.
    """

    def __init__(self) -> None:
        self.items = 0
        self.notes: list[str] = []
        self.summary: dict[str, Any] = {}

    def note(self, text: str) -> None:
        if len(self.notes) < 10:
            self.notes.append(text)

    def scalar(self, v: Any, where: str) -> Any:
        self.items += 1
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, numbers.Integral):
            v = int(v)
            return v if abs(v) < 2**63 else float(v) if abs(v) < 10**300 else None
        if isinstance(v, numbers.Real):
            f = float(v)
            if not math.isfinite(f):
                self.note(f"{where}: non-finite value written as null")
                return None
            return f
        if isinstance(v, str):
            return v if len(v) <= 1000 else v[:1000] + "..."
        return short_repr(v)

    def sequence(self, values: list[Any] | torch.Tensor, where: str, depth: int) -> list[Any]:
        n = len(values) if not isinstance(values, torch.Tensor) else values.numel()
        if n > HISTORY_KEEP:
            self.summary[where] = self.summarise(values)
            self.note(f"{where}: {n} values, kept the last {HISTORY_KEEP} and a summary")
        tail = values[-HISTORY_KEEP:] if n > HISTORY_KEEP else values
        if isinstance(tail, torch.Tensor):
            tail = tail.tolist()
        return [self.value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(tail)]

    @staticmethod
    def summarise(values: list[Any] | torch.Tensor) -> dict[str, Any]:
        if isinstance(values, torch.Tensor):
            t = values.detach().reshape(-1)
        else:
            nums = [float(v) for v in values if isinstance(v, numbers.Real) and not isinstance(v, bool)]
            t = torch.tensor(nums, dtype=torch.float64)
        fin = t[torch.isfinite(t)] if t.is_floating_point() else t
        out: dict[str, Any] = {"count": int(t.numel()), "non_finite": int(t.numel() - fin.numel())}
        if fin.numel():
            out |= {
                "first": float(fin[0]),
                "last": float(fin[-1]),
                "min": float(fin.min()),
                "max": float(fin.max()),
                "mean": float(fin.double().mean()),
            }
        return out

    def tensor(self, t: torch.Tensor, where: str, depth: int) -> Any:
        problem = structural_problem(t)
        if problem is not None:
            self.note(f"{where}: dropped a tensor that {problem}")
            return None
        if t.numel() == 1:
            return self.scalar(t.item(), where)
        return self.sequence(t.reshape(-1) if t.ndim != 1 else t, where, depth)

    def value(self, v: Any, where: str, depth: int = 0) -> Any:
        if self.items >= HISTORY_MAX_ITEMS:
            if self.items == HISTORY_MAX_ITEMS:
                self.note(f"more than {HISTORY_MAX_ITEMS} values; the rest from {where} on dropped")
                self.items += 1
            return None
        if depth > HISTORY_MAX_DEPTH:
            self.note(f"{where}: nested deeper than {HISTORY_MAX_DEPTH} levels, dropped")
            return None
        if isinstance(v, torch.Tensor):
            return self.tensor(v, where, depth)
        if hasattr(v, "tolist") and type(v).__module__ == "numpy":
            if getattr(v, "ndim", 0) == 0:
                return self.scalar(v.item(), where)
            return self.sequence(
                torch.from_numpy(v.reshape(-1)) if v.dtype.kind in "fiub" else list(v), where, depth
            )
        if isinstance(v, dict):
            out = {}
            for i, (k, item) in enumerate(v.items()):
                if i >= HISTORY_MAX_KEYS:
                    self.note(f"{where}: more than {HISTORY_MAX_KEYS} keys, the rest dropped")
                    break
                key = str(k) if isinstance(k, (str, int, float, bool)) else short_repr(k)
                out[key[:200]] = self.value(item, f"{where}.{key[:40]}" if where else key[:40], depth + 1)
            return out
        if isinstance(v, (list, tuple)):
            return self.sequence(list(v), where, depth)
        return self.scalar(v, where)


def bounded_history(history: Any, path: Path | str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """A training history as small, standard JSON, and a summary of what was trimmed.

    Returns:
        ``(history, summary)``: the history (dict; a non-dict history goes under ``raw``)
        with long sequences cut to their last values and non-finite numbers as ``null``;
        ``summary`` maps each cut sequence to its count, first/last/min/max/mean. A
        ``UserWarning`` naming ``path`` says what was dropped, if anything.
    """
    trim = _Trimmer()
    out = trim.value(history if isinstance(history, dict) else {"raw": history}, "")
    if trim.notes:
        warnings.warn(f"{path}: training history trimmed: " + "; ".join(trim.notes), stacklevel=3)
    return out, trim.summary


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
