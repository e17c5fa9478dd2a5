"""SAE features on one token batch: one forward for every SAE, the positions that count, segments.

Only positions the SAE's stack really computes count (``model.covered_mask``), and BOS/EOS/PAD
positions are excluded as SAELens excludes them. Segment codes say what reads each token
(:data:`~sae_lens_t5gemma.analysis.stats_state.SEGMENTS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.analysis.stats_state import SAEInfo
from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import to_sae

if TYPE_CHECKING:
    from sae_lens import SAE

    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2


def sae_info(model: HookedT5Gemma2, sae: SAE[Any], key: str | None = None, source: str = "",
             synthetic: bool = False) -> SAEInfo:  # fmt: skip
    """The :class:`SAEInfo` of ``sae`` on ``model`` (checks that it fits its hook)."""
    from sae_lens_t5gemma.model.sae_fit import check_sae_fits

    name = check_sae_fits(model, sae)
    s = sites_mod.resolve(name)
    return SAEInfo(
        key=key or s.friendly,
        hook_name=name,
        stack=s.stack,
        layer=s.layer,
        kind=s.kind.friendly,
        d_in=int(sae.cfg.d_in),
        d_sae=int(sae.cfg.d_sae),
        source=source,
        synthetic=synthetic,
        neuronpedia_id=getattr(sae.cfg.metadata, "neuronpedia_id", None),
    )


def special_ids(model: HookedT5Gemma2) -> list[int]:
    """BOS/EOS/PAD and other special ids, as SAELens finds them."""
    from sae_lens_t5gemma.analysis.evaluation import special_token_ids

    return special_token_ids(model.tokenizer)


def segment_codes(model: HookedT5Gemma2, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, n]`` uint8: 1 encoder input, 2 decoder continuation, 3 both, 0 padding."""
    real = attention_mask.bool()
    enc = model.covered_mask(tokens, "encoder", attention_mask) & real
    dec = model.covered_mask(tokens, "decoder", attention_mask) & real
    return (enc.to(torch.uint8) + 2 * dec.to(torch.uint8)).cpu()


@torch.no_grad()
def feature_acts(
    model: HookedT5Gemma2,
    saes: Sequence[SAE[Any]],
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """SAE feature activations on one token batch, one forward for all SAEs.

    Returns:
        ``(acts, valid, split)``: per SAE ``[batch, n, d_sae]`` float32 (on CPU) and the
        ``[batch, n]`` bool mask of positions that count (covered by the SAE's stack, real,
        not special); ``split`` is each row's prefix_lm split ``p`` in this forward, ``[batch]``
        (None under reconstruct).
    """
    from sae_lens_t5gemma.model.sae_fit import check_sae_fits, sae_input

    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    names = [check_sae_fits(model, sae) for sae in saes]
    _, cache = model.run_with_cache(
        tokens, attention_mask=mask, names_filter=list(dict.fromkeys(names)), return_type=None
    )
    split = model.last_splits.cpu() if model.convention == "prefix_lm" else None
    special = torch.isin(tokens, torch.tensor(special_ids(model), device=tokens.device)) | (mask == 0)
    out, valid = [], []
    for sae, name in zip(saes, names, strict=True):
        stack = sites_mod.resolve(name).stack
        x = to_sae(sae, sae_input(sae, cache[name]))
        f = sae.encode(x).float().cpu()
        v = (model.covered_mask(tokens, stack, mask) & ~special).cpu()
        out.append(f.masked_fill(~v[..., None], 0.0))
        valid.append(v)
    return out, valid, split
