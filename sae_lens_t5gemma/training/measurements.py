"""Measurements on a trained SAE: activations at hooks for texts, and the reconstruction error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.model.dtypes import to_sae

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens.hook_points import HookedRootModule


@torch.no_grad()
def collect_activations(
    model: HookedRootModule, texts: Sequence[str], hook_names: Sequence[str], context_size: int = 128
) -> dict[str, torch.Tensor]:
    """Activations at ``hook_names`` for ``texts`` (one sequence each), flattened to ``[tokens, d]``.

    Padding positions, and positions the hook's stack does not compute under the model's
    convention, are dropped, so each row is a real token's activation.
    """
    from sae_lens_t5gemma.model import sites as sites_mod

    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    # Right padding whatever the tokenizer's own side: rows start at position 0 (the position
    # contract), and each row is split at its own length.
    batch = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=context_size,
        padding_side="right",
    )  # fmt: skip
    tokens = batch["input_ids"].to(model.cfg.device)  # type: ignore[attr-defined]
    mask = batch["attention_mask"].to(tokens.device)
    real = mask.bool()
    if hasattr(model, "covered_mask"):
        _, cache = model.run_with_cache(tokens, names_filter=list(hook_names), attention_mask=mask)
    else:
        _, cache = model.run_with_cache(tokens, names_filter=list(hook_names), prepend_bos=False)
    out = {}
    for h in hook_names:
        keep = real
        if hasattr(model, "covered_mask"):
            keep = real & model.covered_mask(tokens, sites_mod.resolve(model.canonical_name(h)).stack, mask)
        out[h] = cache[h].reshape(*tokens.shape, -1)[keep].float().cpu()
    return out


@torch.no_grad()
def reconstruction_mse(sae: SAE[Any], activations: torch.Tensor) -> float:
    """Mean squared reconstruction error per element of ``sae`` on ``[tokens, d_in]`` activations."""
    x = to_sae(sae, activations)
    was_training = sae.training
    sae.eval()
    try:
        recon = sae.decode(sae.encode(x))
    finally:
        sae.train(was_training)
    return float((recon.float() - x.float()).pow(2).mean())


# --------------------------------------------------------------------------- release
