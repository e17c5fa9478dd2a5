"""The comparison's rows and its report: Markdown, CSV, JSON and PNG plots.

:mod:`sae_lens_t5gemma.compare` evaluates the pairs; this module holds what one evaluation
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
    """One evaluated pair. Metrics are over covered positions (:mod:`sae_lens_t5gemma.evaluation`)."""

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
    """A Gemma Scope (or any) SAE applied off its home model, beside its reference numbers."""

    sae: str
    layer: int
    site: str
    target_model: str
    target_hook: str
    home_model: str
    home_hook: str
    ev_target: float
    ev_home: float
    ev_carried: float | None
    """ev_target / ev_home when ev_home > 0, else None."""
    ce_score_target: float
    ce_score_home: float
    l0_target: float
    l0_home: float
    natives: str
    """The native SAEs at that layer of the target stack: 'sae (site; EV, CE score, same/different site)'."""


@dataclass
class Report:
    """What :func:`compare` returns: the rows, the transfer table, and the files written."""

    rows: list[Row]
    transfer: list[TransferRow]
    setup: dict[str, Any]
    notes: list[str]
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


_FMT = {"explained_variance": ".3f", "mse": ".4g", "cossim": ".3f", "l0": ".1f", "dead_frac": ".3f",
        "dense_frac": ".3f", "ce_loss_score": ".3f", "kl_div_score": ".3f", "ce_increase": ".4f",
        "eval_s": ".2f"}  # fmt: skip


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def write_report(
    report: Report, out_dir: str | Path, title: str = "SAE comparison", banner: str | None = None
) -> Report:
    """Write ``report.md``, ``results.csv``, ``results.json``, ``transfer.csv`` and the PNG plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(Row)]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(asdict(r) for r in report.rows)
    with open(out / "transfer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(TransferRow)])
        writer.writeheader()
        writer.writerows(asdict(t) for t in report.transfer)
    payload = {
        "title": title,
        "banner": banner,
        "setup": report.setup,
        "site_words": SITE_WORDS,
        "notes": report.notes,
        "rows": [asdict(r) for r in report.rows],
        "transfer": [asdict(t) for t in report.transfer],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    report.files = {
        "csv": out / "results.csv",
        "transfer_csv": out / "transfer.csv",
        "json": out / "results.json",
        **_plots(report.rows, out),
    }
    report.markdown = _markdown(report, title, banner)
    (out / "report.md").write_text(report.markdown)
    report.files["report"] = out / "report.md"
    return report


def _markdown(report: Report, title: str, banner: str | None) -> str:
    rows, s = report.rows, report.setup
    parts = [f"# {title}", ""]
    if banner:
        parts += [f"> **{banner}**", ""]
    parts += [
        "## Setup",
        "",
        f"{s['n_texts']} texts; sequences of {s['context_size']} tokens, batches of {s['batch_size']}; "
        f"sequences per model: {s['sequences']}. Special tokens (BOS/EOS/PAD) are excluded from every metric. "
        f"Same token batches for all models: {'yes' if s['same_tokens_for_all_models'] else 'no (different tokenizers)'}. "
        f"T5Gemma 2 convention: {s.get('convention', '?')} (prefix_len {s.get('prefix_len', '?')}). "
        "Metrics: SAELens' definitions computed over covered positions only (`sae_lens_t5gemma.evaluation`): "
        "positions a stack does not compute, and predictions outside the scored targets, are left out; "
        f"dense = fires on more than {s['dense_threshold']:.0%} of tokens. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in s['versions'].items())}; device {s['device']}.",
        "",
        "## Sites",
        "",
        "Every SAE, where it was applied, and how wide it is. Rows compare like with like only where the site key agrees.",
        "",
        _md_table(
            ["SAE", "role", "model", "stack", "layer", "hook", "site", "what it reads", "d_in", "d_sae"],
            [
                [
                    r.sae,
                    r.role,
                    r.model,
                    r.stack,
                    str(r.layer),
                    f"`{r.hook_name}`",
                    r.site,
                    r.site_words,
                    str(r.d_in),
                    str(r.d_sae),
                ]
                for r in rows
            ],
        ),  # fmt: skip
        "",
        "## Results",
        "",
        _md_table(
            ["SAE", "role", "model / stack", "layer", "site", *_FMT],
            [
                [
                    r.sae,
                    r.role,
                    f"{r.family} {r.stack}",
                    str(r.layer),
                    r.site,
                    *(_fmt(getattr(r, k), v) for k, v in _FMT.items()),
                ]
                for r in rows
            ],
        ),  # fmt: skip
        "",
        "## Tasks",
        "",
        "CE-loss score, KL score and CE increase compare only between rows scored on the same task.",
        "",
        _md_table(["SAE", "model / stack", "task"], [[r.sae, f"{r.family} {r.stack}", r.task] for r in rows]),
        "",
        "## Like with like",
        "",
    ]
    by_site: dict[str, list[Row]] = {}
    for r in rows:
        by_site.setdefault(r.site, []).append(r)
    for key, group in by_site.items():
        labels = sorted({r.label for r in group})
        verdict = (
            "comparable with each other" if len(labels) > 1 else "nothing else in this run reads this site"
        )
        parts.append(f"- **{key}** ({SITE_WORDS[key]}): {', '.join(labels)}: {verdict}.")
    parts += ["", "## Transfer: Gemma Scope 2 SAEs on the T5Gemma 2 encoder", ""]
    if report.transfer:
        parts += [
            "Each SAE is applied unchanged at the same site and layer of T5Gemma 2's encoder "
            "(its weights were initialised from Gemma 3 270M). *carried* = explained variance on "
            "T5Gemma 2 / on Gemma 3 (n/a where the latter is not positive).",
            "",
            _md_table(
                [
                    "SAE",
                    "layer",
                    "site",
                    "EV T5Gemma 2",
                    "EV Gemma 3",
                    "carried",
                    "CE score T5Gemma 2",
                    "CE score Gemma 3",
                    "L0 T5Gemma 2",
                    "L0 Gemma 3",
                    "native SAEs at this layer",
                ],
                [
                    [
                        t.sae,
                        str(t.layer),
                        t.site,
                        _fmt(t.ev_target, ".3f"),
                        _fmt(t.ev_home, ".3f"),
                        _fmt(t.ev_carried, ".2f"),
                        _fmt(t.ce_score_target, ".3f"),
                        _fmt(t.ce_score_home, ".3f"),
                        _fmt(t.l0_target, ".1f"),
                        _fmt(t.l0_home, ".1f"),
                        t.natives,
                    ]
                    for t in report.transfer
                ],
            ),  # fmt: skip
            "",
            "CE scores of the two columns measure different tasks (see the CE/KL caveat).",
        ]
    else:
        parts.append("No transfer pairs in this run.")
    parts += ["", "## Notes", ""]
    parts += [f"- {n}" for n in report.notes] or ["- none"]
    parts += ["", "## Plots", ""]
    for key, path in report.files.items():
        if path.suffix == ".png":
            parts.append(f"![{key}]({path.name})")
    parts += [
        "",
        "Tables: `results.csv`, `results.json`, `transfer.csv`. Column meanings: see the package README.",
        "",
    ]
    return "\n".join(parts)


def _plots(rows: list[Row], out: Path) -> dict[str, Path]:
    # The object-oriented API with the Agg canvas: no pyplot state, no backend switch (safe in notebooks).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.label, []).append(r)
    files = {}

    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, group in groups.items():
        ax.scatter([r.l0 for r in group], [r.explained_variance for r in group], label=label)
        for r in group:
            ax.annotate(str(r.layer), (r.l0, r.explained_variance), fontsize=7)
    l0s = [r.l0 for r in rows if r.l0 > 0]
    if l0s and max(l0s) / min(l0s) > 20:  # e.g. mindchain's L0 ~1400 beside Gemma Scope's 10-150
        ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("explained variance")
    ax.set_title("Per-layer L0 vs explained variance (numbers = layer)")
    ax.legend(fontsize=7)
    files["l0_vs_explained_variance"] = out / "l0_vs_explained_variance.png"
    fig.savefig(files["l0_vs_explained_variance"], dpi=100, bbox_inches="tight")

    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, group in groups.items():
        group = sorted(group, key=lambda r: r.layer)
        ax.plot([r.layer for r in group], [r.ce_loss_score for r in group], marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("CE-loss score (1 = no loss increase)")
    ax.set_title("CE-loss score by layer")
    ax.legend(fontsize=7)
    files["ce_loss_score_by_layer"] = out / "ce_loss_score_by_layer.png"
    fig.savefig(files["ce_loss_score_by_layer"], dpi=100, bbox_inches="tight")

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
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
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        if t5:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no native T5Gemma 2 rows", ha="center", transform=ax.transAxes)
    fig.suptitle("T5Gemma 2: encoder vs decoder (native SAEs)")
    files["encoder_vs_decoder"] = out / "encoder_vs_decoder.png"
    fig.savefig(files["encoder_vs_decoder"], dpi=100, bbox_inches="tight")
    return files


def _stack_styles(rows: list[Row]) -> dict[tuple[str, str], str]:
    keys = sorted({(r.stack, r.site) for r in rows})
    return {k: ("o-" if k[0] == "encoder" else "s--") for k in keys}
