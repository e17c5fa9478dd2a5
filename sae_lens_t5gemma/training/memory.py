"""Memory estimates of a run: the activation store, one SAE step, the SAEs' state, the budget."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class StoreSizing:
    """How one runner's activation store is sized (see :meth:`TrainingPlan.store_sizing`)."""

    store_batch_size_prompts: int
    n_batches_in_buffer: int
    width: int
    """Total width of the runner's hooks (floats per token)."""
    budget_bytes: int
    estimate_bytes: int
    """The store's estimated peak (:func:`store_bytes`), within ``budget_bytes``."""
    n_batches_for_norm_estimate: int
    buffer_bytes: int = 0
    """The filled mixing buffer (one copy): alive while the SAEs step."""
    step_bytes: int = 0
    """One SAE step's transient tensors (:func:`sae_step_bytes`); the SAEs step one at a time."""
    sae_state_bytes: int = 0
    """The runner's SAEs with their gradients and Adam moments (:func:`sae_state_bytes`)."""

    @property
    def activation_bytes(self) -> int:
        """Estimated peak of the activation path: the store's peak while harvesting and mixing,
        or the filled buffer plus one SAE step, whichever is larger (they do not overlap)."""
        return max(self.estimate_bytes, self.buffer_bytes + self.step_bytes)

    @property
    def peak_bytes(self) -> int:
        """Estimated peak above the model's weights: the activation path plus the SAEs' state."""
        return self.activation_bytes + self.sae_state_bytes


# Checked against per-phase peaks (VmHWM reset at each phase boundary) of a real 18-hook runner
# in benchmarks/bench_training.py (worker mem36): the mixing buffer's peak matched
# _BUFFER_COPIES, once glibc returns freed tensors at once (training._return_freed_memory_to_the_os).
#
# Copies of one forward's activations alive at once in SAELens' multi-hook path: the hook cache,
# the device move/reshape of the sliced view, the special-token mask, and the per-hook concatenation.
_FORWARD_COPIES = 4
# The mixing buffer: torch.cat([kept, new]) and the shuffled copy both exist next to the old buffer.
_BUFFER_COPIES = 2
# The model's own transient activations per token of a forward (float32 MLP and attention
# intermediates of one layer, T5Gemma 2 270m widths), bytes: small next to many hooks' caches.
_MODEL_BYTES_PER_TOKEN = 64 * 1024


def store_bytes(width: int, prompts: int, context: int, covered: int, buffer_tokens: int, batch: int) -> int:
    """Estimated peak bytes of SAELens' activation path for hooks of total ``width`` floats per token.

    ``prompts`` x ``context`` tokens per forward (``covered`` of each row kept), a mixing buffer
    of ``buffer_tokens``, SAE batches of ``batch`` tokens; activations in float32 (4 bytes).
    Checked against measured peaks by ``benchmarks/bench_training.py``.
    """
    forward = prompts * context
    kept = prompts * covered
    acts = 4 * width * (_FORWARD_COPIES * forward + _BUFFER_COPIES * (buffer_tokens + kept) + batch)
    return acts + _MODEL_BYTES_PER_TOKEN * forward


# One BatchTopK step (SAELens' TrainingSAE forward and backward, Adam) holds about this many
# batch x d_sae float32 tensors at its peak (hidden_pre, the top-k mask and values,
# feature_acts and their gradients): measured 8.6 at d_sae 4096 and 10.2 at d_sae 16384
# (batch 4096; benchmarks/bench_training.py, workers mem36 and mem1).
_STEP_COPIES = 10


def sae_step_bytes(batch: int, d_sae: int, d_in: int) -> int:
    """Estimated transient bytes of one SAE training step on ``batch`` tokens (float32)."""
    return 4 * batch * (_STEP_COPIES * d_sae + 4 * d_in)


def sae_state_bytes(d_in: int, d_sae: int) -> int:
    """Bytes of one SAE in training: float32 weights, gradients and two Adam moments (16 B/parameter)."""
    return 16 * (2 * d_in * d_sae + 2 * d_sae + d_in)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def memory_budget(max_memory: int | str | None) -> int:
    """``max_memory`` in bytes; None: 1/16 of the machine's RAM, at least 512 MiB.

    Raises:
        ValueError: not a positive byte count or a size like ``"1.5GiB"``.
    """
    if max_memory is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 * 2**30  # no sysconf (not POSIX): assume a small machine
        return max(512 * 2**20, total // 16)
    if isinstance(max_memory, bool):
        raise ValueError(f"max_memory must be a byte count or a size like '1.5GiB', got {max_memory!r}")
    if isinstance(max_memory, (int, float)):
        value = float(max_memory)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]i?[bB]|[bB]|)\s*", str(max_memory))
        if not m:
            raise ValueError(f"max_memory must be a byte count or a size like '1.5GiB', got {max_memory!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value >= 1:
        raise ValueError(f"max_memory must be positive, got {max_memory!r}")
    return int(value)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 2**20
"""Allocations from this size up are mapped and unmapped on their own during training (glibc)."""


def _return_freed_memory_to_the_os() -> bool:
    """Make glibc give freed activation buffers back to the OS at once (Linux/glibc; process-wide).

    glibc serves allocations below a threshold that it raises at run time, up to 32 MiB,
    from its heap, and a heap hole is returned to the OS only if nothing live lies above
    it. A training run interleaves long-lived 10 MiB tensors (gradients, Adam moments)
    with transient ones of the same size (per-hook batches, per-forward copies), so freed
    memory stays resident: 0.56 GiB above the live tensors of an 18-hook runner (SAELens'
    path at the real widths, fed by a stand-in for the model's forward), and the package's
    store estimate could not hold; with the setting, ``benchmarks/bench_training.py``
    (worker ``mem36``) measured the estimate exactly. A fixed 1 MiB threshold maps every larger tensor separately. The cost is
    a fresh mapping (page faults) per such allocation, small next to an SAE step.

    Returns:
        Whether the setting was applied (False off glibc).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
