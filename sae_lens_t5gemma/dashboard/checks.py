"""Checks on what a dashboard or export is asked to show: feature indices, non-finite features."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae_lens_t5gemma.analysis.feature_stats import FeatureStats


def nonfinite_features(stats: FeatureStats, key: str) -> list[int]:
    """Features whose activations held NaN or Inf somewhere in the corpus pass.

    A NaN activation never counts as firing, so such a feature's density can be 0: it is
    broken, not dead. Read from the activation sum and maximum, which any NaN/Inf reaches.
    """
    ok = stats.max_activation(key).isfinite() & stats.mean_activation(key).isfinite()
    return [int(f) for f in (~ok).nonzero().flatten().tolist()]


def check_features(
    features: Sequence[int] | None, d_sae: int | None, what: str = "the SAE"
) -> list[int] | None:
    """Feature indices as ints, each in ``[0, d_sae)`` (``d_sae`` None: only ``>= 0``).

    Raises:
        ValueError: a feature out of range or not an integer (named, with the width).
    """
    if features is None:
        return None
    out = []
    for f in features:
        try:
            i = operator.index(f) if not isinstance(f, bool) else None
        except TypeError:
            i = None
        if i is None or i < 0:
            raise ValueError(f"Feature {f!r}: feature indices are integers >= 0")
        if d_sae is not None and i >= d_sae:
            raise ValueError(f"Feature {i} out of range: {what} has {d_sae} features (0-{d_sae - 1})")
        out.append(i)
    return out
