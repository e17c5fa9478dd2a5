"""The comparison's files: ``report.md``, ``results.csv``, ``transfer.csv``, ``feature_transfer.csv``,
``results.json``, and the plots (:mod:`~sae_lens_t5gemma.comparison.plots`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from sae_lens_t5gemma.comparison.plots import plots
from sae_lens_t5gemma.comparison.report import (
    RELIABLE_DENSITY_TOKENS,
    SITE_WORDS,
    Report,
    Row,
    TransferRow,
    findings,
    format_cell,
    format_ci,
    matched_variants,
)

_FMT = {"n_tokens": "d", "explained_variance": ".3f", "mse": ".4g", "cossim": ".3f", "l0": ".1f",
        "dead_frac": ".3f", "dense_frac": ".3f", "ce_loss_score": ".3f", "kl_div_score": ".3f",
        "ce_increase": ".4f", "eval_s": ".2f"}  # fmt: skip


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
        **plots(report, out, synthetic),
    }
    report.markdown = _markdown(report, title, banner)
    (out / "report.md").write_text(report.markdown)
    report.files["report"] = out / "report.md"
    return report


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
          *(format_cell(getattr(r, k), v) for k, v in _FMT.items())] for r in rows],
    )
    matches = matched_variants(rows)
    matched_table = _md_table(
        ["T5Gemma 2 SAE", "stack", "layer", "L0", "d_sae", "Gemma Scope 2 site", "nearest variant", "L0", "d_sae",
         "abs log L0 ratio"],
        [[m["sae"], m["stack"], str(m["layer"]), format_cell(m["l0"], ".1f"), str(m["d_sae"]), m["gemma_scope_site"],
          m["gemma_scope_sae"], format_cell(m["gemma_scope_l0"], ".1f"), str(m["gemma_scope_d_sae"]),
          format_cell(m["abs_log_l0_ratio"], ".2f")] for m in matches],
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
          format_cell(t.ev_target, ".3f"), format_cell(t.ev_home, ".3f"), format_cell(t.ev_kept, ".2f"), format_cell(t.l0_target, ".1f"),
          format_cell(t.l0_home, ".1f"), format_cell(t.ce_increase_target, ".4f"),
          format_cell(t.ce_increase_home if t.same_task else None, ".4f"), task_cell(t)] for t in report.transfer],
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
        [[t.sae, str(t.layer), t.site, t.target_stack, format_cell(t.corr_median, ".3f"), format_ci(t.corr_median_ci),
          format_cell(t.corr_median_null, ".3f"), format_cell(t.corr_frac_above_0_5, ".0%"),
          format_cell(t.corr_frac_above_0_5_null, ".0%"), format_cell(t.corr_frac_above_0_9, ".0%"), format_cell(t.norm_ratio, ".3f"),
          format_cell(t.ev_target, ".3f"), format_cell(t.ev_norm_matched, ".3f"), format_cell(t.l0_norm_matched, ".1f"),
          format_cell(t.ev_causal, ".3f"), format_cell(t.corr_median_causal, ".3f"), format_cell(t.corr_median_causal_home_rope, ".3f")]
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
