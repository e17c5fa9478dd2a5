"""SAE metrics over the positions a model really computes: the covered-position eval.

SAELens' ``run_evals`` builds its masks from the token batch and ignores ``seqpos_slice``.
Under the ``prefix_lm`` convention half of each stack's positions are zeros (the encoder
does not read the continuation, the decoder does not read the prefix), so ``run_evals``
would average those zero rows into explained variance, MSE and L0, and average zero
losses into CE and KL. :func:`evaluate_sae` computes the same metrics over covered
positions only:

- **reconstruction** (EV, MSE, cosine, L0, dead and dense fractions) over the positions
  whose state the SAE's stack computes from a token of the batch
  (:meth:`~sae_lens_t5gemma.model.hooked.HookedT5Gemma2.covered_mask`), special tokens excluded
  as SAELens excludes them;
- **downstream** (CE with and without the SAE and with the site zero-ablated, CE-loss
  score, KL score, CE increase) over the predictions of continuation tokens only: under
  ``prefix_lm`` the targets ``tokens[:, p:]`` that the encoder never saw; under
  ``reconstruct`` every next token (a copy task: the encoder has read the target).

The SAE is spliced in (or the site ablated) at the covered, non-special positions only, as
SAELens' ``run_evals`` does with its mask. Models without ``covered_mask`` (TransformerLens'
Gemma 3) count every position, and ``score_from`` restricts their CE/KL to the same
continuation targets as T5Gemma 2's, so both are scored on one task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import to_model, to_sae


def _stack_of(model: Any, hook_name: str) -> str | None:
    if not hasattr(model, "covered_mask"):
        return None
    return sites_mod.resolve(model.canonical_name(hook_name)).stack


def special_token_ids(tokenizer: Any) -> list[int]:
    """BOS/EOS/PAD and other special ids, as SAELens finds them."""
    from sae_lens.util import get_special_token_ids

    return list(get_special_token_ids(tokenizer))


def position_masks(
    model: Any,
    tokens: torch.Tensor,
    hook_name: str,
    special_ids: list[int],
    score_from: int | None = None,
    site_span: tuple[int | None, int | None] | None = None,
    definitions: Literal["covered", "saelens"] = "covered",
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sae_mask [batch, n], prediction_mask [batch, n - 1])`` for one token batch.

    ``sae_mask`` marks the positions the SAE is evaluated and spliced at. ``prediction_mask[:, t]``
    marks the predictions of token ``t + 1`` that count for CE/KL: continuation targets that
    are not special tokens (``definitions="saelens"``: continuation targets predicted *from* a
    token that is not special, SAELens' ``mask[:, :-1]``). ``site_span = (start, end)`` further
    restricts ``sae_mask`` to positions ``start <= t < end`` (e.g. Gemma 3 spliced only where
    T5Gemma 2's encoder reads). ``attention_mask`` (0 at padding): padded positions and targets
    never count, and each row is split at its own length (``covered_mask``).
    """
    special = torch.isin(tokens, torch.tensor(special_ids, device=tokens.device))
    if attention_mask is not None:
        special = special | (attention_mask.to(tokens.device) == 0)
    stack = _stack_of(model, hook_name)
    if stack is None:
        covered = torch.ones_like(tokens, dtype=torch.bool)
        target_ok = torch.ones_like(tokens, dtype=torch.bool)
        if score_from is not None:
            target_ok[:, :score_from] = False
    else:
        covered = model.covered_mask(tokens, stack, attention_mask)
        target_ok = model.covered_mask(tokens, "decoder", attention_mask)
    if site_span is not None:
        in_span = torch.zeros_like(covered)
        in_span[:, slice(*site_span)] = True
        covered = covered & in_span
    if definitions == "saelens":
        real_target = (
            torch.ones_like(special) if attention_mask is None else attention_mask.to(tokens.device) != 0
        )
        return covered & ~special, target_ok[:, 1:] & ~special[:, :-1] & real_target[:, 1:]
    return covered & ~special, (target_ok & ~special)[:, 1:]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:2], -1) if x.ndim > 3 else x


def _kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) per position, in float32."""
    logp, logq = F.log_softmax(clean.float(), -1), F.log_softmax(other.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def evaluate_sae(
    model: Any,
    sae: Any,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    hook_name: str | None = None,
    exclude_special_tokens: bool = True,
    dense_threshold: float = 0.1,
    score_from: int | None = None,
    compute_downstream: bool = True,
    progress: bool = False,
    activation_scaler: Any = None,
    site_span: tuple[int | None, int | None] | None = None,
    definitions: Literal["covered", "saelens"] = "covered",
) -> dict[str, Any]:
    """Reconstruction and downstream metrics of ``sae`` over covered positions only.

    The default (``definitions="covered"``) departs from SAELens' ``run_evals`` in two ways, so
    that uncovered and special positions say nothing: zero-ablation is applied only at the
    covered, non-special positions where the SAE is spliced (SAELens zeroes every position), and
    CE/KL leave out predictions *of* special tokens (SAELens leaves out predictions *from* them,
    ``mask[:, :-1]``). ``definitions="saelens"`` uses SAELens' two rules, for numbers to set beside
    published SAELens / Gemma Scope evaluations; reconstruction metrics are the same in both.

    Args:
        model: a ``HookedT5Gemma2`` (its convention applies) or a TransformerLens model.
        sae: a SAELens SAE whose ``d_in`` fits the hook.
        batches: token batches ``[batch, n]``, or ``(tokens, attention_mask)`` pairs for padded
            rows (right padding; each row is split at its own length, padding never counts).
        hook_name: where to read and splice (default ``sae.cfg.metadata.hook_name``).
        exclude_special_tokens: leave BOS/EOS/PAD positions and targets out, as SAELens does.
        dense_threshold: a feature firing on more than this fraction of tokens counts as dense.
        score_from: for models without ``covered_mask``: score only targets at positions
            ``>= score_from`` (the continuation of a ``prefix_lm`` split).
        compute_downstream: also run the model with the SAE spliced in and with the site
            ablated (CE, KL); otherwise only reconstruction metrics.
        progress: show a progress bar.
        activation_scaler: SAELens' ``ActivationScaler`` of an SAE in training (inputs scaled
            before encoding, reconstructions unscaled), as ``run_evals`` takes it.
        site_span: ``(start, end)``: evaluate and splice the SAE only at positions
            ``start <= t < end`` (of the covered ones), e.g. to match another model's site.
        definitions: ``"covered"`` (the default) or ``"saelens"``, see above.

    Returns:
        ``explained_variance`` (1 - Σ‖x - x̂‖² / Σ‖x - x̄‖² over all covered tokens), ``mse``
        (‖x - x̂‖² per token, SAELens' definition), ``cossim``, ``l0``, ``l1``, ``l2_ratio``,
        ``dead_frac``, ``dense_frac``, ``n_tokens``; with downstream also ``ce_loss_without_sae``,
        ``ce_loss_with_sae``, ``ce_loss_with_ablation``, ``ce_loss_score``, ``ce_increase``,
        ``kl_div_with_sae``, ``kl_div_with_ablation``, ``kl_div_score`` and ``n_predictions``.
    """
    if definitions not in ("covered", "saelens"):
        raise ValueError(f"definitions must be 'covered' or 'saelens', not {definitions!r}")
    hook = hook_name or sae.cfg.metadata.hook_name
    special = special_token_ids(model.tokenizer) if exclude_special_tokens else []
    recon_stats = ReconStats()
    down = dict(n=0, clean=0.0, sae=0.0, abl=0.0, kl_sae=0.0, kl_abl=0.0)
    for batch in tqdm(batches, desc=f"eval {hook}", disable=not progress, leave=False):
        tokens, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        tokens = tokens.to(model.cfg.device)
        mask = None if mask is None else mask.to(tokens.device)
        fed = {} if mask is None else {"attention_mask": mask}
        # A random prefix_lm split is drawn once per batch and held for its masks and every forward.
        held = model.held_split(tokens, mask) if hasattr(model, "held_split") else contextlib.nullcontext()
        with held:
            sae_mask, pred_mask = position_masks(
                model, tokens, hook, special, score_from, site_span, definitions, mask
            )
            if compute_downstream:
                (clean_logits, clean_loss), cache = model.run_with_cache(
                    tokens, names_filter=[hook], return_type="both", loss_per_token=True, **fed
                )
            else:
                _, cache = model.run_with_cache(tokens, names_filter=[hook], return_type=None, **fed)
            x_full = cache[hook]
            # hook_z arrives as [batch, n, heads, d_head]: flatten it unless the SAE does so itself.
            x_in = x_full if getattr(sae, "hook_z_reshaping_mode", False) else _flat(x_full)
            scale = activation_scaler.scale if activation_scaler is not None else (lambda a: a)
            unscale = activation_scaler.unscale if activation_scaler is not None else (lambda a: a)
            # The SAE computes in its own dtype; the statistics compare it with the activation as
            # the model computed it (both read in float32 by ReconStats).
            x_sae = to_sae(sae, x_in)
            feats = sae.encode(scale(x_sae))
            recon_sae = unscale(sae.decode(feats)).reshape(x_full.shape)
            sel = sae_mask.to(x_sae.device)
            recon_stats.add(_flat(x_sae)[sel], _flat(recon_sae)[sel], _flat(feats)[sel])
            recon_full = to_model(recon_sae, x_full, f"evaluate_sae at {hook}")
            sel = sel.to(x_full.device)
            if not compute_downstream:
                continue
            mask_b = sel.view(*sel.shape, *([1] * (x_full.ndim - 2)))
            every = torch.ones_like(mask_b) if definitions == "saelens" else mask_b

            def splice(act: torch.Tensor, new: torch.Tensor, m: torch.Tensor = mask_b) -> torch.Tensor:
                return torch.where(m, new, act)

            sae_logits, sae_loss = model.run_with_hooks(
                tokens,
                fwd_hooks=[(hook, lambda a, hook, r=recon_full: splice(a, r))],
                return_type="both",
                loss_per_token=True,
                **fed,
            )
            abl_logits, abl_loss = model.run_with_hooks(
                tokens,
                # SAELens zeroes every position; the default only where the SAE is spliced.
                fwd_hooks=[(hook, lambda a, hook, e=every: splice(a, torch.zeros_like(a), m=e))],
                return_type="both",
                loss_per_token=True,
                **fed,
            )
            pm = pred_mask.to(clean_loss.device)
            down["n"] += int(pm.sum())
            down["clean"] += float(clean_loss[pm].sum())
            down["sae"] += float(sae_loss[pm].sum())
            down["abl"] += float(abl_loss[pm].sum())
            down["kl_sae"] += float(_kl(clean_logits[:, :-1][pm], sae_logits[:, :-1][pm]).sum())
            down["kl_abl"] += float(_kl(clean_logits[:, :-1][pm], abl_logits[:, :-1][pm]).sum())
    out = recon_stats.summary(sae.cfg.d_sae, dense_threshold)
    if compute_downstream:
        out.update(_downstream(down))
    return out


class ReconStats:
    """Streaming sums for SAELens' reconstruction metrics over any number of token rows.

    ``add(x, recon, feats)`` takes ``[tokens, d_in]`` inputs and reconstructions and
    ``[tokens, d_sae]`` feature activations; :meth:`summary` gives explained variance
    (1 - Σ‖x - x̂‖² / Σ‖x - x̄‖², over all tokens added), MSE per token, cosine, L0, L1,
    L2 ratio and the dead / dense fractions. Memory does not grow with the token count.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum_x: torch.Tensor | None = None
        self.sum_x2 = self.sse = self.cos = self.l0 = self.l1 = self.l2r = 0.0
        self.fires: torch.Tensor | None = None

    def add(self, x: torch.Tensor, recon: torch.Tensor, f: torch.Tensor) -> None:
        """Add rows (any float dtype; accumulated in float32 / Python floats)."""
        if not x.shape[0]:
            return
        x, recon, f = x.float(), recon.float(), f.float()
        self.n += x.shape[0]
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_x2 += float((x**2).sum())
        self.sse += float(((x - recon) ** 2).sum())
        self.cos += float(F.cosine_similarity(x, recon, dim=-1).sum())
        self.l0 += float((f > 0).sum())
        self.l1 += float(f.abs().sum())
        self.l2r += float((recon.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum())
        fires = (f > 0).sum(0)
        self.fires = fires if self.fires is None else self.fires + fires

    def summary(self, d_sae: int, dense_threshold: float = 0.1) -> dict[str, Any]:
        """The metrics; ValueError when no row was added."""
        n = self.n
        if n == 0 or self.sum_x is None or self.fires is None:
            raise ValueError("No covered, non-special token in the batches: nothing to evaluate.")
        mean = self.sum_x / n
        total_var = self.sum_x2 - n * float((mean**2).sum())
        density = self.fires.float() / n
        return {
            "n_tokens": n,
            "explained_variance": 1.0 - self.sse / total_var if total_var > 0 else float("nan"),
            "mse": self.sse / n,
            "cossim": self.cos / n,
            "l0": self.l0 / n,
            "l1": self.l1 / n,
            "l2_ratio": self.l2r / n,
            "dead_frac": float((density == 0).float().mean()),
            "dense_frac": float((density > dense_threshold).float().mean()),
        }


def _downstream(down: dict[str, Any]) -> dict[str, Any]:
    m = down["n"]
    if m == 0:
        raise ValueError("No continuation target in the batches: nothing to score CE/KL on.")
    clean, with_sae, abl = down["clean"] / m, down["sae"] / m, down["abl"] / m
    kl_sae, kl_abl = down["kl_sae"] / m, down["kl_abl"] / m
    return dict(
        n_predictions=m,
        ce_loss_without_sae=clean,
        ce_loss_with_sae=with_sae,
        ce_loss_with_ablation=abl,
        ce_loss_score=(abl - with_sae) / (abl - clean) if abl != clean else float("nan"),
        ce_increase=with_sae - clean,
        kl_div_with_sae=kl_sae,
        kl_div_with_ablation=kl_abl,
        kl_div_score=(kl_abl - kl_sae) / kl_abl if kl_abl > 0 else float("nan"),
    )
