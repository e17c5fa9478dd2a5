"""What a feature does to the output: logit effects (decoder sites) and ablation effects (encoder sites).

:func:`logit_effects` maps a decoder row through the decoder's direct path to the vocabulary
(the approximations are stated in :func:`logit_effect_vectors`); :func:`ablation_effects`
runs each example's row again with the feature set to 0 and reports the change in the decoder's
next-token distribution. :func:`rows_by_index` re-reads the corpus rows the examples came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.analysis.activations import special_ids
from sae_lens_t5gemma.analysis.corpus import iter_rows, pad_batch, pad_id, tokenize_row
from sae_lens_t5gemma.model import sites as sites_mod

if TYPE_CHECKING:
    from sae_lens import SAE

    from sae_lens_t5gemma.analysis.feature_stats import Example
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2


@dataclass
class TokenEffect:
    token: str
    token_id: int
    value: float


@dataclass
class FeatureEffect:
    """What a feature does to the output. ``kind`` is ``logit`` (decoder sites) or ``ablation`` (encoder)."""

    kind: str
    top: list[TokenEffect]
    bottom: list[TokenEffect]
    approximation: str
    mean_kl: float | None = None
    n_predictions: int = 0
    values: list[float] = field(default_factory=list)
    """All the effect values over the vocabulary, for a histogram (logit effects only)."""


def _gemma_norm_gain(norm: torch.nn.Module) -> torch.Tensor:
    # Gemma's RMSNorm multiplies by (1 + weight).
    return 1.0 + norm.weight.detach().float()


def logit_effect_vectors(model: HookedT5Gemma2, sae: SAE[Any]) -> tuple[torch.Tensor, str]:
    """``[d_sae, d_model]``: each decoder row mapped to the residual-stream direction it writes,
    times the final norm's gain, ready for ``@ W_U``; and a sentence saying what is approximated.

    Raises:
        ValueError: an encoder site, or a site with no linear path to the residual stream.
    """
    from sae_lens_t5gemma.model.sae_fit import check_sae_fits

    name = check_sae_fits(model, sae)
    s = sites_mod.resolve(name)
    if s.stack != "decoder":
        raise ValueError(
            f"{name} is an encoder site: its effect on the output is measured by ablation, not logits"
        )
    layer = model.hf_model.get_submodule(f"{sites_mod.HF_LAYERS['decoder']}.{s.layer}")
    w = sae.W_dec.detach().float().cpu()
    kind = s.kind.friendly
    notes = []
    if kind in ("attn_z", "z_self", "z_cross"):
        w = w @ layer.self_attn.o_proj.weight.detach().float().cpu().T
        notes.append("through o_proj")
        kind = "attn_out"
    if kind == "mlp_post":
        w = w @ layer.mlp.down_proj.weight.detach().float().cpu().T
        notes.append("through down_proj")
        kind = "mlp_out"
    if kind == "attn_out":
        w = w * _gemma_norm_gain(layer.post_self_attn_layernorm).cpu()
        notes.append("post_self_attn_layernorm taken as its gain (1 + w) only, its 1/rms scale dropped")
    elif kind == "mlp_out":
        w = w * _gemma_norm_gain(layer.post_feedforward_layernorm).cpu()
        notes.append("post_feedforward_layernorm taken as its gain (1 + w) only, its 1/rms scale dropped")
    elif kind not in ("attn_out_normed", "mlp_out_normed", "resid_pre", "resid_mid", "resid_post"):
        raise ValueError(
            f"No logit effect for site kind {kind!r} ({name}): it does not write to the residual stream"
        )
    w = w * _gemma_norm_gain(model.hf_model.model.decoder.norm).cpu()
    text = (
        "Direct path only: W_dec[f] " + (", ".join(notes) + ", " if notes else "")
        + "then the final norm's gain (1 + w), then W_U. Approximated: later layers are skipped; every RMSNorm's "
        "1/rms scale (a positive number per position) is dropped; the final tanh soft-cap is not applied. "
        "Positive scales and the monotone soft-cap do not change which tokens rank top or bottom."
    )  # fmt: skip
    return w, text


@torch.no_grad()
def decoder_logit_vectors(
    model: HookedT5Gemma2, sae: SAE[Any], stack: str
) -> tuple[torch.Tensor, str] | None:
    """:func:`logit_effect_vectors` for a decoder site, or None where there are none (encoder
    sites, and sites with no linear path to the residual stream)."""
    if stack != "decoder":
        return None
    try:
        return logit_effect_vectors(model, sae)
    except ValueError:
        return None


def logit_effects(
    model: HookedT5Gemma2,
    sae: SAE[Any],
    feature: int,
    k: int = 10,
    vectors: tuple[torch.Tensor, str] | None = None,
) -> FeatureEffect:
    """Top and bottom logit effects of ``W_dec[feature]`` through the decoder's output path (decoder sites).

    See :func:`logit_effect_vectors` for what is approximated; pass its result as ``vectors``
    to reuse it across features.
    """
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"Feature {feature} out of range: the SAE has {sae.cfg.d_sae} features")
    w, text = vectors if vectors is not None else logit_effect_vectors(model, sae)
    effect = w[feature] @ model.W_U.detach().float().cpu()
    return _effect_tables("logit", effect, model, k, text, values=effect.tolist())


def _effect_tables(
    kind: str, effect: torch.Tensor, model: HookedT5Gemma2, k: int, text: str, **extra: Any
) -> FeatureEffect:
    k = min(k, effect.numel())
    top = effect.topk(k)
    bottom = (-effect).topk(k)

    def rows(vals: torch.Tensor, idx: torch.Tensor, sign: float) -> list[TokenEffect]:
        return [
            TokenEffect(model.tokenizer.decode([i]), i, sign * v)
            for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
        ]

    return FeatureEffect(
        kind, rows(top.values, top.indices, 1.0), rows(bottom.values, bottom.indices, -1.0), text, **extra
    )


def rows_by_index(model: HookedT5Gemma2, dataset: str | Path | None, wanted: Iterable[int], context_size: int,
                  texts: Sequence[str] | None = None, split: str = "train") -> dict[int, list[int]]:  # fmt: skip
    """Re-read the given corpus rows (as :func:`~sae_lens_t5gemma.analysis.feature_stats.corpus_stats` tokenised them)."""
    wanted = set(wanted)
    found: dict[int, list[int]] = {}
    source = iter_rows(dataset, split) if dataset is not None else iter(texts or [])
    for i, row in enumerate(source):
        if i in wanted:
            found[i] = tokenize_row(model.tokenizer, row, context_size)
            if len(found) == len(wanted):
                break
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(
            f"Rows {missing[:5]} are not in the corpus {dataset!r}: is it the one the statistics were made on?"
        )
    return found


@torch.no_grad()
def ablation_effects(model: HookedT5Gemma2, sae: SAE[Any], feature: int, examples: Sequence[Example],
                     rows: Mapping[int, list[int]], k: int = 10) -> FeatureEffect:  # fmt: skip
    """Change in the decoder's next-token distribution when ``feature`` is ablated (encoder sites).

    Each example's row is run again under the split it was seen with; the feature is set to 0
    at every position of the row (the SAE's reconstruction error is kept, see ``model.steer``).
    Over the predictions of continuation tokens (non-special targets) it reports the mean
    KL(clean || ablated), and per vocabulary token the mean of log p_clean - log p_ablated:
    positive values are tokens the feature promotes, negative ones tokens it suppresses.
    """
    from sae_lens_t5gemma.analysis.evaluation import position_masks

    if not examples:
        return FeatureEffect("ablation", [], [], "no examples: the feature never fired", None, 0)
    total = None
    kl_sum, n_pred = 0.0, 0
    pad = pad_id(model.tokenizer)
    specials = special_ids(model)
    by_split: dict[int | None, list[int]] = {}
    for e in examples:
        by_split.setdefault(e.split, []).append(e.row)
    for split, row_ids in by_split.items():
        # Each example was counted under its row's split: score it under the same one.
        with model.fed(prefix_len=split if model.convention == "prefix_lm" else model.prefix_len):
            row_ids = list(dict.fromkeys(row_ids))
            tokens, mask = pad_batch([rows[r] for r in row_ids], pad, model.cfg.device)
            clean = model(tokens, attention_mask=mask)
            with model.steer(sae, feature, ablate=True):
                ablated = model(tokens, attention_mask=mask)
            _, pred = position_masks(model, tokens, sae.cfg.metadata.hook_name, specials, attention_mask=mask)
            lp = clean[:, :-1].float().log_softmax(-1)[pred]
            lq = ablated[:, :-1].float().log_softmax(-1)[pred]
            if not len(lp):
                continue
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            n_pred += lp.shape[0]
            diff = (lp - lq).sum(0).cpu()
            total = diff if total is None else total + diff
    text = (
        f"Feature {feature} set to 0 at every position of each top example's row (error term kept); mean over "
        f"{n_pred} continuation predictions of log p(clean) - log p(ablated). Positive: the feature promotes the token."
    )
    if total is None:
        return FeatureEffect(
            "ablation", [], [], text + " No continuation predictions were available.", None, 0
        )
    effect = total / n_pred
    return _effect_tables("ablation", effect, model, k, text, mean_kl=kl_sum / n_pred, n_predictions=n_pred)
