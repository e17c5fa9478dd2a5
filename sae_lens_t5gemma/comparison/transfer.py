"""Feature-level transfer of an SAE from Gemma 3 to T5Gemma 2, with the controls that explain it.

T5Gemma 2 was initialised from Gemma 3 270M, and the two share a tokenizer. So an SAE trained
on Gemma 3 (Gemma Scope 2) can be read on both models at *identical token positions*:

- **feature correlation**: for each SAE feature, the Pearson correlation over positions between
  its activation on Gemma 3 and on T5Gemma 2 (streamed sums, float64). Reported as a
  distribution (median, fraction above 0.5 and 0.9) with the best and worst carried features.
  A feature is scored when it fires at least ``min_fires`` times on Gemma 3; one that never
  fires on T5Gemma 2 counts as correlation 0 (nothing carried).
- **reconstruction on the same positions**: explained variance and L0 on each model, and the
  *explained variance kept*, ``EV_t5 / EV_g3`` (unclipped: above 1, T5Gemma 2 is explained better), defined
  only where ``EV_g3 >= MIN_HOME_EV`` (a ratio of two small numbers says nothing).
- **norm-matched control**: the T5Gemma 2 activation rescaled by ``mean‖x_g3‖ / mean‖x_t5‖`` at
  the site before encoding, with the norm ratio reported. JumpReLU thresholds are absolute, so a
  drift in activation norm alone moves L0 and EV; this control separates scale from direction.
- **architecture control** (encoder targets): T5Gemma 2's encoder run with a causal mask
  (:func:`causal_encoder`). Gemma 3 is causal, T5Gemma 2's encoder bidirectional; the causal
  run keeps T5Gemma 2's weights and takes away only the bidirectional attention, so what it
  recovers is attributable to attention direction and what remains to weight drift. (On the
  stand-in, whose Gemma 3 carries the T5Gemma 2 encoder's weights, the causal run equals Gemma 3
  to float precision: the tests check it.)

Positions: those the target stack computes under the model's convention
(:meth:`~sae_lens_t5gemma.model.hooked.HookedT5Gemma2.covered_mask`: under ``prefix_lm`` the prefix
``t < p`` for the encoder, the continuation ``t >= p`` for the decoder), special tokens excluded.
Gemma 3 position ``t`` has read ``tokens[:t+1]``; the encoder's position ``t`` has read the whole
prefix; the decoder's has read the prefix (through cross-attention) and ``tokens[p:t+1]``.

Cost: per batch, one Gemma 3 forward and two T5Gemma 2 forwards (three for encoder targets, the
causal one included), each stopped after the hooked layer; memory does not grow with tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_lens_t5gemma.analysis.evaluation import ReconStats, _flat, special_token_ids
from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import to_sae

MIN_HOME_EV = 0.1
"""ev_kept is reported only where the SAE explains at least this much variance on its home model."""


# ------------------------------------------------------------------------ causal encoder


@contextlib.contextmanager
def causal_encoder(model: Any) -> Iterator[Any]:
    """Run T5Gemma 2's text encoder with a causal mask (global and sliding-window layers).

    transformers' ``T5Gemma2TextEncoder.forward`` builds bidirectional masks unless it is
    handed a mask dict (``{"full_attention": ..., "sliding_attention": ...}``), and T5Gemma 2's
    encoder passes its ``attention_mask`` straight through. A forward pre-hook replaces it with
    causal masks from transformers' own ``create_causal_mask`` /
    ``create_sliding_window_causal_mask`` (padding from the 2-D mask kept). The decoder and its
    cross-attention are untouched. Works on a ``HookedT5Gemma2`` or a bare transformers model.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    hf = getattr(model, "hf_model", model)
    text_model = hf.model.encoder.text_model

    def to_causal(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if isinstance(kwargs.get("attention_mask"), dict):
            return args, kwargs  # the caller built its own masks
        emb = kwargs["inputs_embeds"]
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(emb.shape[1], device=emb.device).unsqueeze(0)
        mask_kwargs = dict(
            config=module.config,
            inputs_embeds=emb,
            attention_mask=kwargs.get("attention_mask"),
            past_key_values=None,
            position_ids=pos,
            allow_is_causal_skip=False,
        )
        kwargs["attention_mask"] = {
            "full_attention": create_causal_mask(**mask_kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs),
        }
        return args, kwargs

    handle = text_model.register_forward_pre_hook(to_causal, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def home_rope_parameters(home_model: Any) -> dict[str, tuple[float, float]]:
    """The home model's RoPE per T5Gemma 2 layer type: ``{layer_type: (theta, linear factor)}``.

    From a TransformerLens Gemma 3 config: ``rotary_base`` (global layers),
    ``rotary_base_local`` (sliding-window layers) and ``rotary_scaling_factor`` (linear, global
    layers only, as TransformerLens applies it). Gemma 3 270M: 1e6 and 1e4, no scaling.
    """
    cfg = home_model.cfg
    factor = float(getattr(cfg, "rotary_scaling_factor", 1.0) or 1.0)
    local = getattr(cfg, "rotary_base_local", None) or cfg.rotary_base
    return {"full_attention": (float(cfg.rotary_base), factor), "sliding_attention": (float(local), 1.0)}


@contextlib.contextmanager
def home_rope(model: Any, rope: dict[str, tuple[float, float]]) -> Iterator[bool]:
    """Run T5Gemma 2's text encoder with another RoPE (e.g. Gemma 3's, :func:`home_rope_parameters`).

    The encoder's rotary embedding keeps one inverse-frequency buffer per layer type; each is
    replaced by ``1 / theta ** (2i / d) / factor`` (transformers' default and linear RoPE) with
    the attention scaling 1, and restored after. Yields whether anything changed (False: the
    two models' RoPE are the same, and the arm isolates nothing).
    """
    hf = getattr(model, "hf_model", model)
    rot = hf.model.encoder.text_model.rotary_emb
    saved: dict[str, tuple[torch.Tensor, float]] = {}
    changed = False
    try:
        for layer_type, (theta, factor) in rope.items():
            name = f"{layer_type}_inv_freq"
            if not hasattr(rot, name):
                continue
            old = getattr(rot, name)
            dim = 2 * old.shape[0]
            new = (
                1.0
                / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=old.device) / dim))
                / factor
            )
            scaling = getattr(rot, f"{layer_type}_attention_scaling")
            saved[layer_type] = (old, scaling)
            changed = changed or not torch.allclose(new, old.float(), rtol=1e-6, atol=0) or scaling != 1.0
            setattr(rot, name, new.to(old.dtype))
            setattr(rot, f"{layer_type}_attention_scaling", 1.0)
        yield changed
    finally:
        for layer_type, (old, scaling) in saved.items():
            setattr(rot, f"{layer_type}_inv_freq", old)
            setattr(rot, f"{layer_type}_attention_scaling", scaling)


# -------------------------------------------------------------------- feature correlation


class FeatureCorrelation:
    """Streaming per-feature Pearson correlation between two ``[tokens, d_sae]`` activation sets.

    Sums are kept in float64 (five vectors of ``d_sae`` plus fire counts), so memory does not
    depend on the number of tokens.
    """

    def __init__(self, d_sae: int) -> None:
        z = lambda: torch.zeros(d_sae, dtype=torch.float64)  # noqa: E731
        self.n = 0
        self.sa, self.sb, self.saa, self.sbb, self.sab = z(), z(), z(), z(), z()
        self.fires_a = torch.zeros(d_sae, dtype=torch.long)
        self.fires_b = torch.zeros(d_sae, dtype=torch.long)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add rows: ``a`` (home model) and ``b`` (target model) at the same positions."""
        if a.shape != b.shape:
            raise ValueError(f"Feature activations differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += (a * b).sum(0)
        self.fires_a += (a > 0).sum(0)
        self.fires_b += (b > 0).sum(0)

    def correlations(self, min_fires: int = 1) -> torch.Tensor:
        """Per-feature correlation; NaN for features firing fewer than ``min_fires`` times on ``a``.

        A scored feature that is constant on ``b`` (never fires there) gets 0.
        """
        n = max(self.n, 1)
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - ma * mb
        va = (self.saa / n - ma * ma).clamp_min(0)
        vb = (self.sbb / n - mb * mb).clamp_min(0)
        denom = (va * vb).sqrt()
        r = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov)).clamp(-1, 1)
        scored = (self.fires_a >= min_fires) & (va > 0)
        return torch.where(scored, r, torch.full_like(r, float("nan")))


class TransferStatistics:
    """Feature correlations with what a reviewer asks of them, from one streaming pass.

    Documents (rows) are dealt into ``groups`` groups by their index; each group keeps its own
    :class:`FeatureCorrelation`, so that

    - the correlations of the whole run are the sum of the groups;
    - bootstrap intervals resample the groups (documents, not tokens, are the unit);
    - best and worst features are *selected* on the even groups and *reported* on the odd ones
      (selection and report on the same tokens would favour chance highs);
    - a permutation null pairs each document's home activations with another document's target
      activations at the same positions (``n_null`` shuffles within each batch): what the
      statistics look like when the two models' features are unrelated.
    """

    def __init__(self, d_sae: int, groups: int = 20, n_null: int = 3, seed: int = 0) -> None:
        self.d_sae, self.groups = d_sae, groups
        self.by_group = [FeatureCorrelation(d_sae) for _ in range(groups)]
        self.nulls = [FeatureCorrelation(d_sae) for _ in range(n_null)]
        self.rows_seen = 0
        self._g = torch.Generator().manual_seed(seed)

    def add(self, f_home: torch.Tensor, f_target: torch.Tensor, mask: torch.Tensor) -> None:
        """One batch: ``[batch, n, d_sae]`` feature activations on each model, ``[batch, n]`` mask of
        the compared positions."""
        b = mask.shape[0]
        for i in range(b):
            keep = mask[i]
            self.by_group[(self.rows_seen + i) % self.groups].add(f_home[i][keep], f_target[i][keep])
        for null in self.nulls:
            if b < 2:
                break
            shift = int(torch.randint(1, b, (1,), generator=self._g))
            perm = (torch.arange(b) + shift) % b  # every row paired with another document
            for i in range(b):
                keep = mask[i] & mask[perm[i]]
                null.add(f_home[i][keep], f_target[perm[i]][keep])
        self.rows_seen += b

    @staticmethod
    def _merged(parts: list[FeatureCorrelation]) -> FeatureCorrelation:
        out = FeatureCorrelation(parts[0].sa.numel())
        for p in parts:
            out.n += p.n
            for name in ("sa", "sb", "saa", "sbb", "sab", "fires_a", "fires_b"):
                getattr(out, name).add_(getattr(p, name))
        return out

    @property
    def total(self) -> FeatureCorrelation:
        return self._merged(self.by_group)

    def summary(self, min_fires: int, n_boot: int = 200) -> dict[str, Any]:
        """Median and fractions above 0.5/0.9 with 90% bootstrap intervals over document groups,
        the same statistics under the permutation null, and the split-half correlations; also the
        merged ``total`` and its per-feature correlations ``r``."""
        used = [g for g in self.by_group if g.n]
        total = self.total
        r = total.correlations(min_fires)
        stats = _corr_summary(r)
        boot = []
        if len(used) >= 2:
            for _ in range(n_boot):
                pick = torch.randint(0, len(used), (len(used),), generator=self._g).tolist()
                boot.append(_corr_summary(self._merged([used[i] for i in pick]).correlations(min_fires))[:3])
        nulls = [_corr_summary(n.correlations(min_fires))[:3] for n in self.nulls if n.n]

        def interval(k: int) -> tuple[float, float]:
            vals = torch.tensor([b[k] for b in boot if not math.isnan(b[k])], dtype=torch.float64)
            if not vals.numel():
                return (math.nan, math.nan)
            return float(vals.quantile(0.05)), float(vals.quantile(0.95))

        def null_max(k: int) -> float:
            vals = [n[k] for n in nulls if not math.isnan(n[k])]
            return max(vals) if vals else math.nan

        halves = (self._merged(self.by_group[0::2]), self._merged(self.by_group[1::2]))
        return {
            "total": total, "r": r,
            "median": stats[0], "frac_above_0_5": stats[1], "frac_above_0_9": stats[2], "n_scored": stats[3],
            "median_ci": interval(0), "frac_above_0_5_ci": interval(1),
            "null_median": null_max(0), "null_frac_above_0_5": null_max(1), "null_frac_above_0_9": null_max(2),
            "selection": halves[0].correlations(min_fires), "held_out": halves[1].correlations(min_fires),
        }  # fmt: skip


def clears_null(value: float, ci: tuple[float, float], null: float) -> bool:
    """Whether a statistic and its whole 90% interval lie above the largest value its permutation
    null took (both: a bootstrap over few document groups can be biased)."""
    if math.isnan(value) or math.isnan(ci[0]) or math.isnan(null):
        return False
    return value > null and ci[0] > null


# ------------------------------------------------------------------------------ results


@dataclass
class CarriedFeature:
    """One feature's transfer: its correlation and how often it fires on each model."""

    feature: int
    corr: float
    """Correlation on the held-out documents (the odd groups), not those it was selected on."""
    density_home: float
    density_target: float
    corr_selection: float = math.nan
    """Correlation on the documents it was selected on (the even groups)."""


@dataclass
class FeatureTransfer:
    """One SAE read on its home model (Gemma 3) and on a T5Gemma 2 stack at the same positions."""

    sae: str
    layer: int
    site: str
    target_stack: str
    home_hook: str
    target_hook: str
    positions: str
    """Which token positions were compared, in words."""
    n_tokens: int
    norm_home: float
    """Mean L2 norm of the home model's activation at the site."""
    norm_target: float
    norm_ratio: float
    """norm_target / norm_home."""
    ev_home: float
    ev_target: float
    ev_kept: float | None
    """ev_target / ev_home, unclipped; None where ev_home < MIN_HOME_EV."""
    ev_norm_matched: float
    """EV on T5Gemma 2 with its activation rescaled to Gemma 3's mean norm."""
    l0_home: float
    l0_target: float
    l0_norm_matched: float
    corr_median: float
    corr_frac_above_0_5: float
    corr_frac_above_0_9: float
    n_features_scored: int
    """Features firing at least ``min_fires`` times on the home model."""
    n_features_silent_on_target: int
    """Scored features that never fire on T5Gemma 2 (their correlation counts as 0)."""
    corr_median_ci: tuple[float, float] = (math.nan, math.nan)
    """90% bootstrap interval of ``corr_median`` over document groups."""
    corr_frac_above_0_5_ci: tuple[float, float] = (math.nan, math.nan)
    corr_median_null: float = math.nan
    """The largest median of the permutation nulls (documents shuffled, positions kept)."""
    corr_frac_above_0_5_null: float = math.nan
    corr_frac_above_0_9_null: float = math.nan
    ev_causal: float | None = None
    """Encoder targets: EV with T5Gemma 2's encoder run causally (architecture control)."""
    l0_causal: float | None = None
    corr_median_causal: float | None = None
    ev_kept_causal: float | None = None
    ev_causal_home_rope: float | None = None
    """Encoder targets: EV with the encoder run causally *and* with Gemma 3's RoPE (None when the
    two models' RoPE are the same, or the home model's is unknown)."""
    corr_median_causal_home_rope: float | None = None
    best: list[CarriedFeature] = field(default_factory=list)
    worst: list[CarriedFeature] = field(default_factory=list)


def ev_kept(ev_target: float, ev_home: float) -> float | None:
    """The home model's explained variance kept on the target, ``ev_target / ev_home``, unclipped.

    Above 1: the SAE explains more of the target's variance than of its home's; below 0: it makes
    the target's reconstruction worse than the mean. None where ``ev_home < MIN_HOME_EV``: with
    almost nothing explained at home there is nothing to keep, and the ratio would only amplify
    noise.
    """
    if not ev_home >= MIN_HOME_EV:  # also catches NaN
        return None
    return ev_target / ev_home


def _corr_summary(r: torch.Tensor) -> tuple[float, float, float, int]:
    scored = r[~torch.isnan(r)]
    if scored.numel() == 0:
        return float("nan"), float("nan"), float("nan"), 0
    return (
        float(scored.median()),
        float((scored > 0.5).double().mean()),
        float((scored > 0.9).double().mean()),
        int(scored.numel()),
    )


# ---------------------------------------------------------------------------- the pass


def _site(model: Any, hook: str, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer + 1, return_type=None)
    return _flat(cache[hook])


@torch.no_grad()
def feature_transfer(
    home_model: Any,
    target_model: Any,
    sae: Any,
    batches: Iterable[torch.Tensor],
    target_hook: str,
    home_hook: str | None = None,
    sae_name: str = "",
    min_fires: int = 5,
    top_k: int = 10,
    causal_control: bool = True,
    progress: bool = False,
    seed: int = 0,
) -> FeatureTransfer:
    """Read ``sae`` on Gemma 3 and on a T5Gemma 2 stack at identical positions; see the module doc.

    Args:
        home_model: the model the SAE was trained on (TransformerLens Gemma 3).
        target_model: a ``HookedT5Gemma2``; its convention sets the compared positions.
        sae: a SAELens SAE.
        batches: token batches ``[batch, n]``, the same ids for both models (shared tokenizer).
            Iterated twice (the norm-matched control needs the mean norms first).
        target_hook: T5Gemma 2 hook reading the same activation as ``home_hook``.
        home_hook: default ``sae.cfg.metadata.hook_name``.
        min_fires: fires needed on Gemma 3 for a feature's correlation to be scored.
        top_k: how many best and worst carried features to list.
        causal_control: for encoder targets, also run the causal-encoder control.
        seed: of the permutation null and the bootstrap.

    Raises:
        ValueError: the target model has no conventions, or no position is compared.
    """
    from tqdm.auto import tqdm

    if not hasattr(target_model, "covered_mask"):
        raise ValueError("feature_transfer: the target model must be a HookedT5Gemma2.")
    batches = list(batches)
    home_hook = home_hook or sae.cfg.metadata.hook_name
    target = sites_mod.resolve(target_model.canonical_name(target_hook))
    stack, layer = target.stack, target.layer
    home_layer = int(home_hook.split(".")[1])
    special = torch.tensor(special_token_ids(target_model.tokenizer))
    causal = causal_control and stack == "encoder"

    stats = {k: ReconStats() for k in ("home", "target", "causal", "rope", "matched")}
    corr = TransferStatistics(sae.cfg.d_sae, seed=seed)
    corr_causal, corr_rope = FeatureCorrelation(sae.cfg.d_sae), FeatureCorrelation(sae.cfg.d_sae)
    rope = (
        home_rope_parameters(home_model)
        if causal and hasattr(getattr(home_model, "cfg", None), "rotary_base")
        else None
    )
    rope_arm = False
    norm_sum = {"home": 0.0, "target": 0.0}

    def read(x: torch.Tensor, name: str) -> torch.Tensor:
        f = sae.encode(to_sae(sae, x))
        stats[name].add(x, sae.decode(f), f)
        return f

    masks = []
    for tokens in tqdm(
        batches, desc=f"transfer {sae_name or home_hook} -> {target_hook}", disable=not progress
    ):
        tokens = tokens.to(target_model.cfg.device)
        mask = target_model.covered_mask(tokens, stack) & ~torch.isin(tokens, special.to(tokens.device))
        masks.append(mask)
        full_home = _site(home_model, home_hook, tokens.to(home_model.cfg.device), home_layer)
        full_target = _site(target_model, target_hook, tokens, layer)
        x_home, x_target = full_home[mask.to(full_home.device)], full_target[mask]
        norm_sum["home"] += float(x_home.float().norm(dim=-1).sum())
        norm_sum["target"] += float(x_target.float().norm(dim=-1).sum())
        f_home = read(x_home, "home")
        f_target = read(x_target, "target")
        # Per row for the document-level statistics (bootstrap, split halves, permutation null).
        rows_home = torch.zeros(*mask.shape, f_home.shape[-1], dtype=f_home.dtype, device=f_home.device)
        rows_target = torch.zeros_like(rows_home)
        m = mask.to(f_home.device)
        rows_home[m], rows_target[m] = f_home, f_target
        corr.add(rows_home, rows_target, m)
        if causal:
            with causal_encoder(target_model):
                x_causal = _site(target_model, target_hook, tokens, layer)[mask]
            corr_causal.add(f_home, read(x_causal, "causal"))
            if rope is not None:
                with causal_encoder(target_model), home_rope(target_model, rope) as rope_arm:
                    if rope_arm:  # a RoPE that differs: the fourth arm (causal + Gemma 3's RoPE)
                        x_rope = _site(target_model, target_hook, tokens, layer)[mask]
                        corr_rope.add(f_home, read(x_rope, "rope"))
    n = stats["home"].n
    if n == 0:
        raise ValueError(f"No covered, non-special position at {target_hook}: nothing to compare.")
    norm_home, norm_target = norm_sum["home"] / n, norm_sum["target"] / n
    scale = norm_home / norm_target if norm_target > 0 else 1.0
    for tokens, mask in zip(batches, masks, strict=True):
        x_target = _site(target_model, target_hook, tokens.to(target_model.cfg.device), layer)[mask]
        read(x_target * scale, "matched")

    s = {k: stats[k].summary(sae.cfg.d_sae) for k in stats if stats[k].n}
    summary = corr.summary(min_fires)
    total, r = summary["total"], summary["r"]
    median, above_05, above_09, n_scored = (
        summary[k] for k in ("median", "frac_above_0_5", "frac_above_0_9", "n_scored")
    )
    scored = ~torch.isnan(r)
    silent = int((scored & (total.fires_b == 0)).sum())
    # Best and worst are chosen on the even document groups and reported on the odd ones.
    sel, held = summary["selection"], summary["held_out"]
    both = ~torch.isnan(sel) & ~torch.isnan(held)
    order = torch.argsort(torch.where(both, sel, torch.full_like(sel, -2.0)), descending=True)
    order = order[: int(both.sum())]
    dens_a, dens_b = total.fires_a.double() / n, total.fires_b.double() / n

    def listed(idx: torch.Tensor) -> list[CarriedFeature]:
        return [
            CarriedFeature(int(i), float(held[i]), float(dens_a[i]), float(dens_b[i]), float(sel[i]))
            for i in idx
        ]

    out = FeatureTransfer(
        sae=sae_name,
        layer=layer,
        site=target.kind.friendly,
        target_stack=stack,
        home_hook=home_hook,
        target_hook=target_hook,
        positions=_positions_words(target_model, stack),
        n_tokens=n,
        norm_home=norm_home,
        norm_target=norm_target,
        norm_ratio=norm_target / norm_home if norm_home > 0 else float("nan"),
        ev_home=s["home"]["explained_variance"],
        ev_target=s["target"]["explained_variance"],
        ev_kept=ev_kept(s["target"]["explained_variance"], s["home"]["explained_variance"]),
        ev_norm_matched=s["matched"]["explained_variance"],
        l0_home=s["home"]["l0"],
        l0_target=s["target"]["l0"],
        l0_norm_matched=s["matched"]["l0"],
        corr_median=median,
        corr_frac_above_0_5=above_05,
        corr_frac_above_0_9=above_09,
        n_features_scored=n_scored,
        n_features_silent_on_target=silent,
        corr_median_ci=summary["median_ci"],
        corr_frac_above_0_5_ci=summary["frac_above_0_5_ci"],
        corr_median_null=summary["null_median"],
        corr_frac_above_0_5_null=summary["null_frac_above_0_5"],
        corr_frac_above_0_9_null=summary["null_frac_above_0_9"],
        best=listed(order[:top_k]),
        worst=listed(order.flip(0)[:top_k]),
    )
    if causal:
        out.ev_causal = s["causal"]["explained_variance"]
        out.l0_causal = s["causal"]["l0"]
        out.corr_median_causal = _corr_summary(corr_causal.correlations(min_fires))[0]
        out.ev_kept_causal = ev_kept(out.ev_causal, out.ev_home)
        if rope_arm:
            out.ev_causal_home_rope = s["rope"]["explained_variance"]
            out.corr_median_causal_home_rope = _corr_summary(corr_rope.correlations(min_fires))[0]
    return out


def _positions_words(model: Any, stack: str) -> str:
    if model.convention == "reconstruct":
        return f"every non-special position ({stack} under reconstruct)"
    p = "n // 2" if model.prefix_len is None else str(model.prefix_len)
    where = f"the prefix t < p (p = {p})" if stack == "encoder" else f"the continuation t >= p (p = {p})"
    return f"{where}, non-special tokens; same token ids on both models"
