"""Search by concept: the features that fire more on one set of texts than on another.

Each text is read as a prompt, under the model's convention (``find-features``); each feature's
peak activation over the counted positions of a text is compared between the two sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.analysis.activations import feature_acts
from sae_lens_t5gemma.analysis.corpus import pad_batch, pad_id, tokenize_row
from sae_lens_t5gemma.model import sites as sites_mod

if TYPE_CHECKING:
    from sae_lens import SAE

    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2


@dataclass
class FeatureMatch:
    """One row of :func:`find_features`."""

    feature: int
    score: float
    """``mean_with - mean_without``: the mean over texts of the feature's peak activation."""
    mean_with: float
    mean_without: float
    frac_with: float
    """Fraction of ``texts_with`` on which the feature fires anywhere."""
    frac_without: float


@torch.no_grad()
def text_peaks(model: HookedT5Gemma2, sae: SAE[Any], texts: Sequence[str], batch_size: int = 16,
               encoder_reads_whole_text: bool = False) -> torch.Tensor:  # fmt: skip
    """``[len(texts), d_sae]``: each feature's peak activation on each text (counted positions only).

    Args:
        encoder_reads_whole_text: for an encoder SAE, let the encoder read the whole text (the
            decoder does not run), rather than the prefix the convention gives it (the default,
            as every call reads a prompt).
    """
    from sae_lens_t5gemma.model.sae_fit import check_sae_fits

    if not texts:
        raise ValueError("No texts given")
    stack = sites_mod.resolve(check_sae_fits(model, sae)).stack
    # An encoder SAE may let the encoder read the whole text: under reconstruct it reads the row.
    whole = stack == "encoder" and encoder_reads_whole_text
    pad = pad_id(model.tokenizer)
    peaks = []
    with model.fed("reconstruct" if whole else None):
        for i in range(0, len(texts), batch_size):
            rows = [tokenize_row(model.tokenizer, t, model.cfg.n_ctx) for t in texts[i : i + batch_size]]
            tokens, mask = pad_batch(rows, pad, model.cfg.device)
            (acts,), _, _ = feature_acts(model, [sae], tokens, mask)
            peaks.append(acts.amax(1))
    return torch.cat(peaks)


def find_features(model: HookedT5Gemma2, sae: SAE[Any], texts_with: Sequence[str], texts_without: Sequence[str],
                  k: int = 20, encoder_reads_whole_text: bool = False) -> list[FeatureMatch]:  # fmt: skip
    """Features that fire more on ``texts_with`` than on ``texts_without``, best first.

    The score is the mean over texts of the feature's peak activation on ``texts_with`` minus
    the same on ``texts_without``; ties are broken by how often it fires on each set.
    """
    a = text_peaks(model, sae, texts_with, encoder_reads_whole_text=encoder_reads_whole_text)
    b = text_peaks(model, sae, texts_without, encoder_reads_whole_text=encoder_reads_whole_text)
    mean_a, mean_b = a.mean(0), b.mean(0)
    frac_a, frac_b = (a > 0).float().mean(0), (b > 0).float().mean(0)
    score = mean_a - mean_b
    order = sorted(range(score.numel()), key=lambda f: (-float(score[f]), -float(frac_a[f] - frac_b[f]), f))[
        :k
    ]
    return [
        FeatureMatch(
            f, float(score[f]), float(mean_a[f]), float(mean_b[f]), float(frac_a[f]), float(frac_b[f])
        )
        for f in order
    ]
