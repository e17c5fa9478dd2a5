"""Helpers for reading untrusted files: bounded reprs and metadata-only tensor checks.

A checkpoint, config or YAML from elsewhere may hold deeply nested or huge values, or tensors
that lie about their size; these helpers describe such values in error messages without
recursing, flooding the message or allocating the tensor.
"""

from __future__ import annotations

import reprlib
from typing import Any

import torch

# Values from a file go into error messages through this: bounded depth and length, so a
# deeply nested or huge value can neither recurse nor flood the message.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 3, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def short_repr(value: Any) -> str:
    """``repr`` bounded in depth and length (for error messages about file contents)."""
    return _REPR.repr(value)


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` address the same element (stride 0, or a self-overlapping view)."""
    span = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        if stride < span:
            return True
        span = stride * size
    return False


def structural_problem(t: torch.Tensor) -> str | None:
    """Why a tensor cannot be read safely (from its metadata alone), or None.

    Nothing here touches the tensor's data, so it allocates nothing.
    """
    if t.layout != torch.strided:
        return (
            f"is a {str(t.layout).removeprefix('torch.')} tensor; only dense (strided) tensors are accepted"
        )
    if t.device.type != "cpu":
        extra = " (a tensor without data)" if t.device.type == "meta" else ""
        return f"is on device {t.device}{extra}; only tensors stored in the file are accepted"
    zero = [d for d, (s, n) in enumerate(zip(t.stride(), t.shape, strict=True)) if s == 0 and n > 1]
    if zero:
        return (
            f"has stride 0 along dim {zero[0]} (an expanded view: {t.untyped_storage().nbytes():,} stored bytes "
            f"posing as {t.numel():,} elements); refused before allocating it"
        )
    if _overlaps(t):
        return f"is a view whose elements overlap (strides {list(t.stride())}, shape {list(t.shape)})"
    return None
