"""The comparison's rows and its report: Markdown, CSV, JSON and PNG plots.

:mod:`sae_lens_t5gemma.comparison.suite` evaluates the pairs; this module holds what one evaluation
yields (``Row``, ``TransferRow``, ``Report``), the plain words for each site key
(``SITE_WORDS``), and ``write_report``, which writes ``report.md``, ``results.csv``,
``results.json``, ``transfer.csv`` and three plots (matplotlib, Agg, no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from statistics import median
from typing import Any

SITE_WORDS: dict[str, str] = {
    "resid_pre": "resid_pre (residual stream entering the layer)",
    "attn_z": "o_proj input (hook_z: the heads' outputs concatenated, n_heads x d_head wide)",
    "attn_out": "o_proj output (attention output before any post-attention norm)",
    "attn_out_normed": "attention output after post_attention_layernorm",
    "resid_mid": "resid_mid (residual stream between attention and MLP)",
    "mlp_out": "mlp_out (MLP output before any post-MLP norm)",
    "mlp_out_normed": "mlp_out after post_feedforward_layernorm",
    "resid_post": "resid_post (residual stream leaving the layer)",
}
"""Site key -> plain words. Two rows are like with like only if their keys agree."""

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
                f"{r.sae:<58} {r.role:<8} {where:<22} {r.site:<14} {_fmt(r.explained_variance, '7.3f')} "
                f"{_fmt(r.l0, '7.1f')} {_fmt(r.ce_loss_score, '9.3f')}"
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


_FMT = {"n_tokens": "d", "explained_variance": ".3f", "mse": ".4g", "cossim": ".3f", "l0": ".1f",
        "dead_frac": ".3f", "dense_frac": ".3f", "ce_loss_score": ".3f", "kl_div_score": ".3f",
        "ce_increase": ".4f", "eval_s": ".2f"}  # fmt: skip

RELIABLE_DENSITY_TOKENS = 1_000_000
"""Below this many tokens, dead and dense fractions mostly measure rarity: the report warns."""

SYNTHETIC_PREFIX = "SYNTHETIC (random stand-in weights, not the real models): "


def _ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None or any(math.isnan(v) for v in ci) else f"{ci[0]:.3f} to {ci[1]:.3f}"


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return format(value, spec) if isinstance(value, int) and spec == "d" else str(value)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _write_csv(path: Path, names: list[str], records: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(records)


def write_report(
    report: Report,
    out_dir: str | Path,
    title: str = "SAE comparison",
    banner: str | None = None,
    synthetic: bool = False,
) -> Report:
    """Write ``report.md``, the tables (CSV, JSON) and the PNG plots.

    Files: ``results.csv`` (one row per evaluated pair), ``transfer.csv`` (one per transfer),
    ``feature_transfer.csv`` (best and worst carried features of each transfer),
    ``results.json`` (everything), and the plots. With ``synthetic`` every finding starts with
    :data:`SYNTHETIC_PREFIX` and every plot carries a SYNTHETIC label.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.findings = findings(report, synthetic)
    _write_csv(out / "results.csv", [f.name for f in fields(Row)], [asdict(r) for r in report.rows])
    _write_csv(
        out / "transfer.csv", [f.name for f in fields(TransferRow)], [asdict(t) for t in report.transfer]
    )
    carried = [
        {"sae": ft.sae, "target_hook": ft.target_hook, "rank": kind, **asdict(c)}
        for ft in report.features
        for kind, listed in (("best", ft.best), ("worst", ft.worst))
        for c in listed
    ]
    carried_names = [
        "sae",
        "target_hook",
        "rank",
        "feature",
        "corr",
        "density_home",
        "density_target",
        "corr_selection",
    ]
    _write_csv(out / "feature_transfer.csv", carried_names, carried)
    payload = {
        "title": title,
        "banner": banner,
        "synthetic": synthetic,
        "findings": report.findings,
        "setup": report.setup,
        "site_words": SITE_WORDS,
        "notes": report.notes,
        "rows": [asdict(r) for r in report.rows],
        "transfer": [asdict(t) for t in report.transfer],
        "feature_transfer": [asdict(ft) for ft in report.features],
        "matched_variants": matched_variants(report.rows),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    report.files = {
        "csv": out / "results.csv",
        "transfer_csv": out / "transfer.csv",
        "feature_transfer_csv": out / "feature_transfer.csv",
        "json": out / "results.json",
        **_plots(report, out, synthetic),
    }
    report.markdown = _markdown(report, title, banner)
    (out / "report.md").write_text(report.markdown)
    report.files["report"] = out / "report.md"
    return report


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


# ----------------------------------------------------------------------------- markdown


def _markdown(report: Report, title: str, banner: str | None) -> str:
    rows, s = report.rows, report.setup
    # fmt: off
    sites_table = _md_table(
        ["SAE", "role", "model", "stack", "layer", "hook", "site", "what it reads", "d_in", "d_sae"],
        [[r.sae, r.role, r.model, r.stack, str(r.layer), f"`{r.hook_name}`", r.site, r.site_words, str(r.d_in),
          str(r.d_sae)] for r in rows],
    )
    results_table = _md_table(
        ["SAE", "role", "model / stack", "layer", "site", *_FMT],
        [[r.sae, r.role, f"{r.family} {r.stack}", str(r.layer), r.site,
          *(_fmt(getattr(r, k), v) for k, v in _FMT.items())] for r in rows],
    )
    matches = matched_variants(rows)
    matched_table = _md_table(
        ["T5Gemma 2 SAE", "stack", "layer", "L0", "d_sae", "Gemma Scope 2 site", "nearest variant", "L0", "d_sae",
         "abs log L0 ratio"],
        [[m["sae"], m["stack"], str(m["layer"]), _fmt(m["l0"], ".1f"), str(m["d_sae"]), m["gemma_scope_site"],
          m["gemma_scope_sae"], _fmt(m["gemma_scope_l0"], ".1f"), str(m["gemma_scope_d_sae"]),
          _fmt(m["abs_log_l0_ratio"], ".2f")] for m in matches],
    )
    # fmt: on
    parts = [f"# {title}", ""]
    if banner:
        parts += [f"> **{banner}**", ""]
    parts += ["## Findings", ""]
    parts += [f"- {f}" for f in report.findings] or ["- none"]
    parts += [
        "",
        "## Setup",
        "",
        f"{s['n_texts']} texts; rows of {s['context_size']} tokens ({s.get('rows', 'packed')}), batches of "
        f"{s['batch_size']}; rows per model: {s['sequences']}. Special tokens (BOS/EOS/PAD) are excluded from every metric. "
        f"Same token batches for all models: {'yes' if s['same_tokens_for_all_models'] else 'no (different tokenizers)'}. "
        f"T5Gemma 2 convention: {s.get('convention', '?')} (prefix_len {s.get('prefix_len', '?')}). "
        "Metrics: SAELens' definitions computed over covered positions only (`sae_lens_t5gemma.analysis.evaluation`): "
        "positions a stack does not compute, and predictions outside the scored targets, are left out; "
        f"dense = fires on more than {s['dense_threshold']:.0%} of tokens. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in s['versions'].items())}; device {s['device']}; "
        f"models in {s.get('dtype', 'float32')}, SAEs in {', '.join(s.get('sae_dtypes') or ['float32'])}.",
        "",
    ]
    if s.get("documents"):
        parts += [f"Documents per model (kept / too short / truncated): {s['documents']}.", ""]
    parts += [
        "## Sites",
        "",
        "Every SAE, where it was applied, and how wide it is. Rows compare like with like only where the site key agrees.",
        "",
        sites_table,
        "",
        "## Results",
        "",
        f"`n_tokens`: the tokens each row was measured on; dead and dense fractions below "
        f"{RELIABLE_DENSITY_TOKENS:,} tokens mostly measure rarity"
        + (
            " (**every row here is below that**)."
            if rows and max(r.n_tokens for r in rows) < RELIABLE_DENSITY_TOKENS
            else "."
        ),
        "",
        results_table,
        "",
        "## Tasks",
        "",
        "CE-loss score, KL score and CE increase compare only between rows scored on the same task.",
        "",
        _md_table(["SAE", "model / stack", "task"], [[r.sae, f"{r.family} {r.stack}", r.task] for r in rows]),
        "",
        "## Matched sparsity",
        "",
    ]
    if matches:
        parts += [
            "Each native T5Gemma 2 SAE beside the Gemma Scope 2 variant of the same site and layer nearest in L0 "
            "(then width). EV and ΔCE compare fairly only at matched L0 (see the L0 plots).",
            "",
            matched_table,
        ]
    else:
        parts.append(
            "No native T5Gemma 2 and Gemma Scope 2 SAEs read the same site at a shared layer, so sparsity is "
            "not matched: SAEs of different sites (e.g. the mindchain o_proj outputs against Gemma Scope 2's "
            "hook_z or resid_post) are not set side by side."
        )
    parts += ["", "## Like with like", ""]
    by_site: dict[str, list[Row]] = {}
    for r in rows:
        by_site.setdefault(r.site, []).append(r)
    for key, group in by_site.items():
        labels = sorted({r.label for r in group})
        verdict = (
            "comparable with each other" if len(labels) > 1 else "nothing else in this run reads this site"
        )
        parts.append(f"- **{key}** ({SITE_WORDS.get(key, key)}): {', '.join(labels)}: {verdict}.")
    parts += _transfer_markdown(report)
    parts += ["", "## Notes", ""]
    parts += [f"- {n}" for n in report.notes] or ["- none"]
    parts += ["", "## Plots", ""]
    for key, path in report.files.items():
        if path.suffix == ".png":
            parts.append(f"![{key}]({path.name})")
    parts += [
        "",
        "Tables: `results.csv`, `results.json`, `transfer.csv`, `feature_transfer.csv`. Column meanings: "
        "see the package README.",
        "",
    ]
    return "\n".join(parts)


def _transfer_markdown(report: Report) -> list[str]:
    parts = ["", "## Transfer: Gemma Scope 2 SAEs on T5Gemma 2", ""]
    if not report.transfer:
        return [*parts, "No transfer pairs in this run."]
    tasks: dict[str, str] = {}
    for t in report.transfer:
        for task in (t.task_target, t.task_home):
            tasks.setdefault(task, f"T{len(tasks) + 1}")

    def task_cell(t: TransferRow) -> str:
        return (
            tasks[t.task_target]
            if t.same_task
            else f"{tasks[t.task_target]} vs {tasks[t.task_home]} (differ)"
        )

    # fmt: off
    transfer_table = _md_table(
        ["SAE", "layer", "site", "target", "tokens", "EV T5Gemma 2", "EV Gemma 3", "EV kept", "L0 T5Gemma 2",
         "L0 Gemma 3", "ΔCE T5Gemma 2", "ΔCE Gemma 3", "task"],
        [[t.sae, str(t.layer), t.site, f"{t.target_stack} `{t.target_hook}`", str(t.n_tokens),
          _fmt(t.ev_target, ".3f"), _fmt(t.ev_home, ".3f"), _fmt(t.ev_kept, ".2f"), _fmt(t.l0_target, ".1f"),
          _fmt(t.l0_home, ".1f"), _fmt(t.ce_increase_target, ".4f"),
          _fmt(t.ce_increase_home if t.same_task else None, ".4f"), task_cell(t)] for t in report.transfer],
    )
    # fmt: on
    parts += [
        "Each SAE is applied unchanged at the same activation of a T5Gemma 2 stack (both stacks were "
        "initialised from Gemma 3 270M). For Gemma 3 -> T5Gemma 2 transfers, EV and L0 of both columns "
        "are measured at identical token positions (the positions the target stack computes). "
        "*EV kept* = clip(EV T5Gemma 2, 0, EV Gemma 3) / EV Gemma 3, n/a where EV Gemma 3 < 0.1. "
        "ΔCE = CE increase from splicing the SAE in. Both ΔCE columns are filled only where both were "
        "scored on one task (listed below the table); otherwise the Gemma 3 column is n/a.",
        "",
        transfer_table,
        "",
        "Tasks:",
        "",
        *[f"- {key}: {task}" for task, key in tasks.items()],
        "",
        "Native SAEs at each transfer's layer: "
        + "; ".join(sorted({f"layer {t.layer} {t.target_stack}: {t.natives}" for t in report.transfer})),
    ]
    measured = [t for t in report.transfer if t.corr_median is not None]
    if not measured:
        return parts
    # fmt: off
    controls_table = _md_table(
        ["SAE", "layer", "site", "target", "corr median", "90% interval", "null median", "> 0.5", "> 0.5 null",
         "> 0.9", "norm ratio T5/G3", "EV", "EV norm-matched", "L0 norm-matched", "EV causal", "corr median causal",
         "corr median causal + G3 RoPE"],
        [[t.sae, str(t.layer), t.site, t.target_stack, _fmt(t.corr_median, ".3f"), _ci(t.corr_median_ci),
          _fmt(t.corr_median_null, ".3f"), _fmt(t.corr_frac_above_0_5, ".0%"),
          _fmt(t.corr_frac_above_0_5_null, ".0%"), _fmt(t.corr_frac_above_0_9, ".0%"), _fmt(t.norm_ratio, ".3f"),
          _fmt(t.ev_target, ".3f"), _fmt(t.ev_norm_matched, ".3f"), _fmt(t.l0_norm_matched, ".1f"),
          _fmt(t.ev_causal, ".3f"), _fmt(t.corr_median_causal, ".3f"), _fmt(t.corr_median_causal_home_rope, ".3f")]
         for t in measured],
    )
    # fmt: on
    parts += [
        "",
        "## Feature-level transfer and controls",
        "",
        "Per feature, the Pearson correlation over the same token positions between its activation on "
        f"Gemma 3 and on T5Gemma 2 (features firing at least {report.setup.get('min_fires', '?')} times on "
        "Gemma 3 are scored; one silent on T5Gemma 2 counts as 0). Intervals: 90% bootstrap over documents. "
        "Null: the same statistics with each document's Gemma 3 activations paired with another document's "
        "T5Gemma 2 activations at the same positions (what unrelated features give). Best and worst features "
        "are chosen on half the documents and their correlation reported on the other half. Controls: *norm-matched* rescales "
        "T5Gemma 2's activation to Gemma 3's mean norm at the site (JumpReLU thresholds are absolute); "
        "*causal* runs T5Gemma 2's encoder with a causal mask, keeping its weights and RoPE and removing only "
        "bidirectional attention (encoder targets); *causal + G3 RoPE* also gives it Gemma 3's RoPE (run only "
        "where the two RoPE differ), so that the last step to Gemma 3 is the weights alone.",
        "",
        controls_table,
        "",
        "### Best and worst carried features",
        "",
    ]
    for ft in report.features:
        fmt = lambda cs: ", ".join(f"#{c.feature} ({c.corr:.2f})" for c in cs[:5]) or "none"  # noqa: E731
        parts.append(f"- {ft.sae} -> `{ft.target_hook}`: best {fmt(ft.best)}; worst {fmt(ft.worst)}.")
    return parts


# -------------------------------------------------------------------------------- plots


def _figure(size: tuple[float, float]) -> Any:
    # The object-oriented API with the Agg canvas: no pyplot state, no backend switch (safe in notebooks).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, synthetic: bool) -> Path:
    """Save a figure; a synthetic one gets a large diagonal SYNTHETIC label across it."""
    if synthetic:
        fig.text(0.5, 0.5, "SYNTHETIC", fontsize=64, color="red", alpha=0.18, rotation=25,
                 ha="center", va="center", weight="bold", zorder=10)  # fmt: skip
        fig.text(0.01, 0.005, "SYNTHETIC stand-in data: random weights, not the real models", fontsize=8,
                 color="red", ha="left", va="bottom")  # fmt: skip
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _layer_axis(ax: Any, layers: Any) -> None:
    """Ticks at the layers plotted (integers, also when there is a single one)."""
    ticks = sorted(set(layers))
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    ax.set_xlabel("layer")


def _log_l0_axis(ax: Any) -> None:
    ax.set_xscale("log")  # as Gemma Scope's own figures: L0 spans orders of magnitude
    ax.set_xlabel("L0 (active features per token, log scale)")


def _plots(report: Report, out: Path, synthetic: bool) -> dict[str, Path]:
    rows = report.rows
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.label, []).append(r)
    files = {}

    fig = _figure((12, 4.8))
    axes = fig.subplots(1, 2)
    natives = [r for r in rows if r.role == "native" and r.l0 > 0]
    for ax, metric, name in ((axes[0], "explained_variance", "explained variance"),
                             (axes[1], "ce_increase", "ΔCE (nats; each model on its own task)")):  # fmt: skip
        for label, group in groups.items():
            group = [r for r in group if r in natives]
            if group:
                ax.scatter([r.l0 for r in group], [getattr(r, metric) for r in group], label=label)
                for r in group:
                    ax.annotate(str(r.layer), (r.l0, getattr(r, metric)), fontsize=7)
        if natives:
            _log_l0_axis(ax)
            ax.legend(fontsize=6)
        ax.set_ylabel(name)
    fig.suptitle("Native SAEs: L0 vs explained variance and vs ΔCE (numbers = layer)")
    files["l0_sweep"] = _save(fig, out / "l0_sweep.png", synthetic)

    fig = _figure((7, 5))
    ax = fig.add_subplot()
    for label, group in groups.items():
        group = sorted(group, key=lambda r: r.layer)
        ax.plot([r.layer for r in group], [r.ce_loss_score for r in group], marker="o", label=label)
    _layer_axis(ax, [r.layer for r in rows])
    ax.set_ylabel("CE-loss score (1 = no loss increase)")
    ax.set_title("CE-loss score by layer (each row on its own task)")
    ax.legend(fontsize=6)
    files["ce_loss_score_by_layer"] = _save(fig, out / "ce_loss_score_by_layer.png", synthetic)

    fig = _figure((11, 4.5))
    axes = fig.subplots(1, 2)
    t5 = [r for r in rows if r.family == "T5Gemma 2" and r.role == "native"]
    for ax, metric, name in (
        (axes[0], "explained_variance", "explained variance"),
        (axes[1], "ce_loss_score", "CE-loss score"),
    ):
        for (stack, key), style in _stack_styles(t5).items():
            group = sorted((r for r in t5 if r.stack == stack and r.site == key), key=lambda r: r.layer)
            ax.plot(
                [r.layer for r in group], [getattr(r, metric) for r in group], style, label=f"{stack} {key}"
            )
        _layer_axis(ax, [r.layer for r in t5])
        ax.set_ylabel(name)
        if t5:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no native T5Gemma 2 rows", ha="center", transform=ax.transAxes)
    fig.suptitle("T5Gemma 2: encoder vs decoder (native SAEs)")
    files["encoder_vs_decoder"] = _save(fig, out / "encoder_vs_decoder.png", synthetic)
    files.update(_transfer_plots(report.transfer, out, synthetic))
    return files


def _variant(sae: str) -> str:
    tail = sae.rsplit(":", 1)[-1]
    return tail.split("_", 2)[-1] if tail.startswith("layer_") else tail


def _transfer_plots(transfer: list[TransferRow], out: Path, synthetic: bool) -> dict[str, Path]:
    measured = [t for t in transfer if t.corr_median is not None]
    if not measured:
        return {}
    files = {}
    lines: dict[tuple[str, str, str], list[TransferRow]] = {}
    for t in measured:
        lines.setdefault((t.site, t.target_stack, _variant(t.sae)), []).append(t)

    fig = _figure((12, 4.8))
    axes = fig.subplots(1, 2)
    for (site, stack, variant), group in sorted(lines.items()):
        group = sorted(group, key=lambda t: t.layer)
        style = "o-" if stack == "encoder" else "s--"
        layers = [t.layer for t in group]
        axes[0].plot(layers, [t.ev_target for t in group], style, label=f"{site} {variant} -> {stack}")
        axes[1].plot(layers, [t.corr_median for t in group], style, label=f"{site} {variant} -> {stack}")
    homes = sorted({(t.site, _variant(t.sae), t.layer, t.ev_home) for t in measured})
    axes[0].scatter([h[2] for h in homes], [h[3] for h in homes], marker="x", color="black",
                    label="same SAE on Gemma 3 (same positions)")  # fmt: skip
    axes[0].set_ylabel("explained variance on T5Gemma 2")
    axes[1].set_ylabel("median feature correlation with Gemma 3")
    axes[1].set_ylim(-0.1, 1.05)
    for ax in axes:
        _layer_axis(ax, [t.layer for t in measured])
        ax.legend(fontsize=6)
    fig.suptitle("Gemma Scope 2 SAEs transferred to T5Gemma 2, per layer (solid: encoder, dashed: decoder)")
    files["transfer_by_layer"] = _save(fig, out / "transfer_by_layer.png", synthetic)

    fig = _figure((6, 5.5))
    ax = fig.add_subplot()
    pairs: dict[tuple[str, int], dict[str, float]] = {}
    for t in measured:
        pairs.setdefault((t.sae, t.layer), {})[t.target_stack] = t.corr_median or 0.0
    both = [(k, v) for k, v in pairs.items() if {"encoder", "decoder"} <= set(v)]
    ax.plot([-0.1, 1.05], [-0.1, 1.05], color="grey", lw=0.8, ls=":")
    if both:
        ax.scatter([v["encoder"] for _, v in both], [v["decoder"] for _, v in both])
        for (sae, layer), v in both:
            ax.annotate(f"{_variant(sae)} L{layer}", (v["encoder"], v["decoder"]), fontsize=6)
    else:
        ax.text(0.5, 0.5, "no SAE transferred onto both stacks", ha="center", transform=ax.transAxes)
    ax.set_xlabel("median feature correlation on the encoder")
    ax.set_ylabel("median feature correlation on the decoder")
    ax.set_title("Encoder vs decoder transfer (each point: one SAE)")
    files["transfer_encoder_vs_decoder"] = _save(fig, out / "transfer_encoder_vs_decoder.png", synthetic)

    fig = _figure((7, 5))
    ax = fig.add_subplot()
    # The norm ratio belongs to the site and positions, not to the SAE: one line per (site, stack).
    ratios: dict[tuple[str, str], dict[int, float]] = {}
    for t in measured:
        ratios.setdefault((t.site, t.target_stack), {})[t.layer] = t.norm_ratio or float("nan")
    for (site, stack), by_layer in sorted(ratios.items()):
        layers = sorted(by_layer)
        style = "o-" if stack == "encoder" else "s--"
        ax.plot(layers, [by_layer[layer] for layer in layers], style, label=f"{site} -> {stack}")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    _layer_axis(ax, [t.layer for t in measured])
    ax.set_ylabel("mean activation norm, T5Gemma 2 / Gemma 3")
    ax.set_title("Norm ratio at each transferred site (same positions)")
    ax.legend(fontsize=6)
    files["norm_ratio_by_layer"] = _save(fig, out / "norm_ratio_by_layer.png", synthetic)
    return files


def _stack_styles(rows: list[Row]) -> dict[tuple[str, str], str]:
    keys = sorted({(r.stack, r.site) for r in rows})
    return {k: ("o-" if k[0] == "encoder" else "s--") for k in keys}
