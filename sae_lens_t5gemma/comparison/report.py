"""The comparison's rows and what they say: ``Row``, ``TransferRow``, ``Report`` and the findings.

:mod:`sae_lens_t5gemma.comparison.harness` evaluates the pairs into a :class:`Report`; this
module holds its records, the plain words for each site key (``SITE_WORDS``), the matching of
each T5Gemma 2 SAE to the Gemma Scope 2 variant nearest in L0 (:func:`matched_variants`) and the
findings in sentences (:func:`findings`). :mod:`~sae_lens_t5gemma.comparison.report_files` writes
them (Markdown, CSV, JSON) and :mod:`~sae_lens_t5gemma.comparison.plots` draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from sae_lens_t5gemma.model.sites import SITE_KINDS

SITE_WORDS: dict[str, str] = {k.friendly: k.description for k in SITE_KINDS}
"""Site key -> plain words (``sites.SiteKind.description``). Rows are like with like only if their keys agree."""

CE_KL_CAVEAT = (
    "CE/KL caveat for T5Gemma 2 rows under the reconstruct convention: the encoder reads the whole "
    "row and the decoder is scored on predicting tokens the encoder has already read (a copy task the "
    "model was never trained on). Their CE-loss score, KL score and CE increase measure how much the SAE "
    "harms reproducing the input, not language modelling; compare them only with rows of the same task."
)

HONEST_SITES_NOTE = (
    "Gemma Scope 2's 'attn_out' SAEs (releases -att / -att-all) read the o_proj INPUT "
    "(hook_z: n_heads x d_head = 4 x 256 = 1024 wide on the real model). The mindchain SAEs read "
    "the o_proj OUTPUT (d_model = 640 wide), before post_self_attn_layernorm. These are different "
    "activations, so their rows are not compared with each other. Likewise Gemma Scope 2's "
    "'mlp_out' is the output of post_feedforward_layernorm, while T5Gemma 2's mlp.hook_out is the "
    "MLP output before that norm: no transfer row is made for it. resid_post and hook_z are the "
    "same activations in both models."
)


@dataclass
class Row:
    """One evaluated pair. Metrics are over covered positions (:mod:`sae_lens_t5gemma.analysis.evaluation`)."""

    model: str
    family: str
    """T5Gemma 2, Gemma 3, or the TransformerLens model name."""
    stack: str
    """encoder / decoder (T5Gemma 2) or decoder-only."""
    layer: int
    hook_name: str
    site: str
    """Site key (see ``SITE_WORDS``); rows compare like with like only when it agrees."""
    site_words: str
    sae: str
    sae_source: str
    """mindchain, gemma-scope-2, local, or the release name."""
    sae_home_model: str
    sae_home_hook: str
    role: str
    """native (SAE on the model it was trained on) or transfer."""
    d_in: int
    d_sae: int
    n_tokens: int
    """Tokens scored (special tokens excluded)."""
    explained_variance: float
    mse: float
    cossim: float
    l0: float
    l1: float
    l2_ratio: float
    dead_frac: float
    """Fraction of features that never fire on the eval tokens."""
    dense_frac: float
    """Fraction of features firing on more than ``dense_threshold`` of the eval tokens."""
    ce_loss_score: float
    kl_div_score: float
    ce_loss_without_sae: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    ce_increase: float
    """ce_loss_with_sae - ce_loss_without_sae: the loss increase from splicing the SAE in."""
    kl_div_with_sae: float
    kl_div_with_ablation: float
    load_s: float
    """Wall time to load the SAE (the model is loaded once per run and not counted)."""
    eval_s: float
    """Wall time of the evaluation of this pair."""
    task: str = ""
    """What CE/KL were scored on: T5Gemma 2's convention, or next-token prediction (and which targets)."""

    @property
    def label(self) -> str:
        where = f"{self.family} {self.stack}" if self.stack != "decoder-only" else self.family
        return f"{self.sae_source} {self.site} on {where}" + (
            " (transfer)" if self.role == "transfer" else ""
        )


@dataclass
class TransferRow:
    """A Gemma Scope 2 (or any) SAE applied off its home model, beside its home numbers.

    For Gemma 3 -> T5Gemma 2 transfers the reconstruction columns come from
    :func:`~sae_lens_t5gemma.comparison.transfer.feature_transfer`: both sides at identical token
    positions. ``ce_increase_home`` is then the SAE re-scored on Gemma 3 on the transfer's own
    task, so ``task_target == task_home`` and the two ΔCE columns compare like with like;
    where the tasks differ, ``ce_increase_home`` stays None.
    """

    sae: str
    layer: int
    site: str
    target_model: str
    target_stack: str
    target_hook: str
    home_model: str
    home_hook: str
    task_target: str
    task_home: str
    n_tokens: int
    ev_target: float
    ev_home: float
    l0_target: float
    l0_home: float
    ce_increase_target: float
    natives: str
    """The native SAEs at that layer of the target stack: 'sae (site; EV, L0, same/different site)'."""
    ev_kept: float | None = None
    """clip(ev_target, 0, ev_home) / ev_home; None where ev_home < 0.1 (see transfer.MIN_HOME_EV)."""
    ce_increase_home: float | None = None
    """ΔCE on the home model on task_home; None unless task_home == task_target."""
    norm_ratio: float | None = None
    """Mean activation norm on the target / on the home model, at the same positions."""
    ev_norm_matched: float | None = None
    l0_norm_matched: float | None = None
    ev_causal: float | None = None
    """Encoder targets: EV with T5Gemma 2's encoder run causally (architecture control)."""
    ev_kept_causal: float | None = None
    corr_median: float | None = None
    """Median per-feature correlation between the two models' activations of this SAE's features."""
    corr_frac_above_0_5: float | None = None
    corr_frac_above_0_9: float | None = None
    corr_median_causal: float | None = None
    ev_causal_home_rope: float | None = None
    """Encoder targets: EV run causally and with Gemma 3's RoPE (None: the RoPE are the same)."""
    corr_median_causal_home_rope: float | None = None
    corr_median_ci: tuple[float, float] | None = None
    """90% bootstrap interval of ``corr_median`` over documents."""
    corr_frac_above_0_5_ci: tuple[float, float] | None = None
    corr_median_null: float | None = None
    """The permutation null's median (documents shuffled, positions kept; the largest of its shuffles)."""
    corr_frac_above_0_5_null: float | None = None
    corr_frac_above_0_9_null: float | None = None

    @property
    def clears_null(self) -> bool:
        """Whether ``corr_median`` and its interval lie above the permutation null's."""
        from sae_lens_t5gemma.comparison.transfer import clears_null

        if self.corr_median is None or self.corr_median_ci is None or self.corr_median_null is None:
            return False
        return clears_null(self.corr_median, self.corr_median_ci, self.corr_median_null)

    @property
    def same_task(self) -> bool:
        return self.task_target == self.task_home


@dataclass
class Report:
    """What :func:`compare` returns: the rows, the transfer table, and the files written."""

    rows: list[Row]
    transfer: list[TransferRow]
    setup: dict[str, Any]
    notes: list[str]
    features: list[Any] = field(default_factory=list)
    """:class:`~sae_lens_t5gemma.comparison.transfer.FeatureTransfer` per Gemma 3 -> T5Gemma 2 transfer."""
    findings: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    markdown: str = ""

    def summary(self) -> str:
        """A short plain-text table of the rows and the files written, for terminals."""
        lines = [
            f"{'SAE':<58} {'role':<8} {'model / stack':<22} {'site':<14} {'EV':>7} {'L0':>7} {'CE score':>9}"
        ]
        for r in self.rows:
            where = f"{r.family} {r.stack}" if r.stack != "decoder-only" else r.family
            lines.append(
                f"{r.sae:<58} {r.role:<8} {where:<22} {r.site:<14} {format_cell(r.explained_variance, '7.3f')} "
                f"{format_cell(r.l0, '7.1f')} {format_cell(r.ce_loss_score, '9.3f')}"
            )
        lines += [f"wrote {path}" for path in self.files.values()]
        return "\n".join(lines)

    def find(self, sae: str, model: str | None = None, role: str | None = None) -> Row:
        """The row of ``sae`` (spec as given) on ``model``; KeyError if none."""
        for row in self.rows:
            if (
                row.sae == sae
                and (model is None or row.model == model)
                and (role is None or row.role == role)
            ):
                return row
        raise KeyError(f"No row for SAE {sae!r}" + (f" on {model!r}" if model else ""))


RELIABLE_DENSITY_TOKENS = 1_000_000
"""Below this many tokens, dead and dense fractions mostly measure rarity: the report warns."""

SYNTHETIC_PREFIX = "SYNTHETIC (random stand-in weights, not the real models): "


def format_ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None or any(math.isnan(v) for v in ci) else f"{ci[0]:.3f} to {ci[1]:.3f}"


def format_cell(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return format(value, spec) if isinstance(value, int) and spec == "d" else str(value)


# ------------------------------------------------------------------- matched variants


def matched_variants(rows: list[Row]) -> list[dict[str, Any]]:
    """For each native T5Gemma 2 SAE, the Gemma Scope 2 row of the same site and layer nearest in
    L0, then width.

    Nearest by |log(L0 ratio)| (measured L0s), ties broken by |log(width ratio)|, among the native
    Gemma 3 rows of this run whose site key equals the T5Gemma 2 SAE's: sparsity is matched only
    between SAEs that read the same activation (an o_proj output is not a residual stream).
    """
    out = []
    t5 = [r for r in rows if r.family == "T5Gemma 2" and r.role == "native" and r.l0 > 0]
    gs = [r for r in rows if r.family == "Gemma 3" and r.role == "native" and r.l0 > 0]
    for r in t5:
        by_site: dict[str, list[Row]] = {}
        for g in gs:
            if g.layer == r.layer and g.site == r.site:
                by_site.setdefault(g.site, []).append(g)
        for site, group in by_site.items():
            best = min(
                group,
                key=lambda g: (abs(math.log(g.l0 / r.l0)), abs(math.log(g.d_sae / r.d_sae)), g.sae),
            )
            out.append(
                {
                    "sae": r.sae,
                    "stack": r.stack,
                    "layer": r.layer,
                    "site": r.site,
                    "l0": r.l0,
                    "d_sae": r.d_sae,
                    "gemma_scope_site": site,
                    "gemma_scope_sae": best.sae,
                    "gemma_scope_l0": best.l0,
                    "gemma_scope_d_sae": best.d_sae,
                    "abs_log_l0_ratio": abs(math.log(best.l0 / r.l0)),
                    "candidates": len(group),
                }  # fmt: skip
            )
    return out


# ----------------------------------------------------------------------------- findings


def findings(report: Report, synthetic: bool = False) -> list[str]:
    """Short findings generated from the numbers: what transfers, where, how much; and the controls."""
    pre = SYNTHETIC_PREFIX if synthetic else ""
    out: list[str] = []
    measured = [t for t in report.transfer if t.corr_median is not None and not math.isnan(t.corr_median)]
    if not measured:
        out.append("No Gemma 3 -> T5Gemma 2 transfer was measured feature by feature in this run.")
    groups: dict[tuple[str, str], list[TransferRow]] = {}
    for t in measured:
        groups.setdefault((t.site, t.target_stack), []).append(t)
    for (site, stack), group in sorted(groups.items()):
        layers = sorted({t.layer for t in group})
        best = max(group, key=lambda t: t.corr_median or 0.0)
        worst = min(group, key=lambda t: t.corr_median or 0.0)
        kept = [t.ev_kept for t in group if t.ev_kept is not None]
        above = median([t.corr_frac_above_0_5 or 0.0 for t in group])
        sentence = (
            f"Gemma Scope 2 {site} SAEs on T5Gemma 2's {stack} (layers {', '.join(map(str, layers))}; "
            f"{len(group)} SAEs): median feature correlation with Gemma 3 {median([t.corr_median for t in group]):.2f} "
            f"({above:.0%} of features above 0.5); highest at layer {best.layer} ({best.corr_median:.2f}), "
            f"lowest at layer {worst.layer} ({worst.corr_median:.2f}). "
        )
        nulls = [t for t in group if t.corr_median_null is not None and t.corr_median_ci is not None]
        if nulls:
            clear = [t for t in nulls if t.clears_null]
            example = max(nulls, key=lambda t: t.corr_median or 0.0)
            lo, hi = example.corr_median_ci  # type: ignore[misc]
            sentence += (
                f"{len(clear)} of {len(nulls)} clear their permutation null (documents shuffled, positions kept): "
                f"e.g. layer {example.layer}, {example.corr_median:.2f} (90% interval over documents {lo:.2f} to "
                f"{hi:.2f}) against a null median of {example.corr_median_null:.2f}, and "
                f"{example.corr_frac_above_0_5 or 0:.0%} of features above 0.5 against "
                f"{example.corr_frac_above_0_5_null or 0:.0%} by chance"
                + ("; the rest could be chance. " if len(clear) < len(nulls) else ". ")
            )
        if kept:
            sentence += (
                f"Their explained variance on T5Gemma 2 is a median {median(kept):.0%} of that on Gemma 3 "
                "(unclipped); kept variance does not mean kept features: a dictionary whose span still "
                "covers the activations reconstructs them with unrelated features, which is what the "
                "correlations above measure."
            )
        else:
            sentence += (
                "The fraction of explained variance kept is undefined: these SAEs explain less than "
                "10% of the variance on Gemma 3 itself."
            )
        out.append(sentence)
    norms = [t for t in measured if t.norm_ratio is not None and t.ev_norm_matched is not None]
    if norms:
        ratios = [t.norm_ratio for t in norms]
        gain = sum(t.ev_norm_matched - t.ev_target for t in norms) / len(norms)
        verdict = (
            "norm drift explains little of the difference"
            if abs(gain) < 0.02
            else "part of the difference is scale, not direction"
        )
        out.append(
            f"Activation norms on T5Gemma 2 are {min(ratios):.2f}-{max(ratios):.2f}x Gemma 3's at the same "
            f"sites and positions; rescaling them to Gemma 3's mean norm changes EV by {gain:+.3f} on "
            f"average: {verdict}."
        )
    causal = [t for t in measured if t.corr_median_causal is not None]
    if causal:
        before = median([t.corr_median for t in causal])
        after = median([t.corr_median_causal for t in causal])
        moves = [t.corr_median_causal - t.corr_median for t in causal]
        roped = [t for t in causal if t.corr_median_causal_home_rope is not None]
        rope_words = (
            f" Giving it Gemma 3's RoPE as well moves the median to "
            f"{median([t.corr_median_causal_home_rope for t in roped]):.2f} ({len(roped)} transfers); what "
            "is left between that arm and Gemma 3 is the weights."
            if roped
            else " The two models' RoPE are the same here (or Gemma 3's is unknown), so no RoPE arm was run: "
            "what separates the causal arm from Gemma 3 is the weights, plus RoPE wherever the RoPE differ "
            "(T5Gemma 2 scales its global layers linearly by 8; Gemma 3 270M does not)."
        )
        out.append(
            f"Run causally, T5Gemma 2's encoder moves the median feature correlation from {before:.2f} to "
            f"{after:.2f} (per SAE and layer, by {min(moves):+.2f} to {max(moves):+.2f}; {len(causal)} transfers)."
            + rope_words
        )
    same = [t for t in report.transfer if t.same_task and t.ce_increase_home is not None]
    if same:
        out.append(
            f"On the matched prefix_lm continuation task, splicing the SAE in raises CE by a median "
            f"{median([t.ce_increase_target for t in same]):.3g} nats on T5Gemma 2 against "
            f"{median([t.ce_increase_home for t in same]):.3g} on Gemma 3 ({len(same)} transfers)."
        )
    matches = matched_variants(report.rows)
    if matches:
        worst_match = max(matches, key=lambda m: m["abs_log_l0_ratio"])
        out.append(
            f"Matched sparsity: the T5Gemma 2 SAEs run at L0 {min(m['l0'] for m in matches):.0f}-"
            f"{max(m['l0'] for m in matches):.0f}; the nearest Gemma Scope 2 variants at "
            f"{min(m['gemma_scope_l0'] for m in matches):.0f}-{max(m['gemma_scope_l0'] for m in matches):.0f} "
            f"(worst match {worst_match['sae']}: {worst_match['l0']:.0f} vs {worst_match['gemma_scope_l0']:.0f}); "
            "compare EV at matched L0 in the L0 plot, not across L0."
        )
    if report.rows:
        most = max(r.n_tokens for r in report.rows)
        if most < RELIABLE_DENSITY_TOKENS:
            out.append(
                f"Every row was measured on at most {most:,} tokens, fewer than {RELIABLE_DENSITY_TOKENS:,}: "
                "dead and dense fractions mostly measure rarity at this size."
            )
    return [pre + sentence for sentence in out]
