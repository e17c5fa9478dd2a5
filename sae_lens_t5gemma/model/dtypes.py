"""The dtype contract: which dtype a model loads in, and how SAE and model tensors meet.

**Defaults.** Every analysis entry point (``load_t5gemma2``, ``HookedT5Gemma2.from_pretrained``,
``compare``, ``diagnose``, ``dashboard``, ``find-features``, ``demo``) loads the model in
**float32**, as TransformerLens and SAELens' ``HookedSAETransformer`` do, so the same code gives
the same numbers on every machine. ``train`` harvests with ``model_dtype="auto"``: bfloat16
where the device runs it natively (every CUDA GPU with bf16; CPUs with ``avx512_bf16`` or
``amx_bf16``), float32 elsewhere. Harvesting is where the time goes and bf16 runs it about
1.8x faster there; the SAEs still train in float32 on activations cast to float32.

Two environment variables make the choice explicit, for users and for CI:

- ``SAE_LENS_T5GEMMA_DTYPE`` (float32, bfloat16, float16 or auto) replaces both defaults;
- ``SAE_LENS_T5GEMMA_FAST_BF16`` (1 or 0) forces the ``auto`` decision, whatever the hardware,
  so both of its branches can be run on any machine.

**Boundaries.** Wherever an SAE (or transcoder, or steering edit) meets the model, the SAE
computes in its own dtype and device (:func:`to_sae`) and what flows back into the model is in
the model's dtype and device (:func:`to_model`). Float16 has a largest finite value of 65504:
an SAE output beyond it would reach the model as ``inf``, so :func:`to_model` raises instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

DTYPE_ENV = "SAE_LENS_T5GEMMA_DTYPE"
FAST_BF16_ENV = "SAE_LENS_T5GEMMA_FAST_BF16"
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")

# CPU flags of native bfloat16 arithmetic (AVX512-BF16 dot products, AMX tiles). Without them
# oneDNN emulates bf16 matmuls, which measured about 0.3x the float32 speed on an AVX-512 Xeon.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def default_dtype(purpose: Literal["analysis", "training"] = "analysis") -> str:
    """The model dtype an entry point uses when none is given (see the module docstring)."""
    value = os.environ.get(DTYPE_ENV, "").strip()
    if value:
        if value not in DTYPE_CHOICES:
            raise ValueError(f"{DTYPE_ENV}={value!r}: expected one of {', '.join(DTYPE_CHOICES)}")
        return value
    return "auto" if purpose == "training" else "float32"


def cpu_has_fast_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU's flags (``/proc/cpuinfo``) include native bfloat16 arithmetic.

    False where the file cannot be read (not Linux): no evidence, no bfloat16.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(f in flags for f in _CPU_BF16_FLAGS)
    return False


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``), for benchmark records; ``"unknown"`` elsewhere."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 fast: CUDA with ``torch.cuda.is_bf16_supported()``, or a
    CPU with native bf16 instructions (:func:`cpu_has_fast_bf16`). ``SAE_LENS_T5GEMMA_FAST_BF16``
    (1 or 0) overrides the check on every device."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{FAST_BF16_ENV}={forced!r}: expected 1 (bfloat16) or 0 (float32)")
        return forced == "1"
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_has_fast_bf16()
    return False


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The ``auto`` model dtype: bfloat16 where ``device`` runs it fast, float32 elsewhere."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def resolve_dtype(
    dtype: torch.dtype | str | None,
    device: str | torch.device = "cpu",
    purpose: Literal["analysis", "training"] = "analysis",
) -> torch.dtype:
    """A torch dtype from a dtype, its name, ``"auto"`` or ``None`` (the :func:`default_dtype`)."""
    if dtype is None:
        dtype = default_dtype(purpose)
    if isinstance(dtype, torch.dtype):
        value: Any = dtype
    elif dtype == "auto":
        return auto_dtype(device)
    else:
        value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype {dtype!r} is not a torch floating dtype (float32, bfloat16, float16) or 'auto'"
        )
    return value


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (for reports and metadata)."""
    return str(dtype).removeprefix("torch.")


def sae_dtype(sae: Any) -> torch.dtype:
    """The dtype an SAELens SAE computes in (its parameters')."""
    return sae.W_dec.dtype


def to_sae(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """A model activation as ``sae`` computes on it: on the SAE's device, in its dtype."""
    return x.to(device=sae.W_dec.device, dtype=sae_dtype(sae))


def to_model(y: torch.Tensor, like: torch.Tensor, where: str) -> torch.Tensor:
    """An SAE-side tensor handed back to the model: ``like``'s dtype and device.

    Raises:
        OverflowError: ``like`` is float16 and ``y`` holds finite values beyond float16's range
            (they would become ``inf`` in the model); ``where`` names the hook.
    """
    if y.dtype == like.dtype and y.device == like.device:
        return y
    if like.dtype == torch.float16 and y.dtype != torch.float16:
        limit = torch.finfo(torch.float16).max
        peak = float(y.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if y.numel() else 0.0
        if peak > limit:
            raise OverflowError(
                f"{where}: the SAE's output reaches |x| = {peak:.4g}, beyond float16's largest value "
                f"({limit:.0f}); the float16 model would receive inf. Load the model in bfloat16 or "
                "float32 (dtype='bfloat16')."
            )
    return y.to(device=like.device, dtype=like.dtype)
