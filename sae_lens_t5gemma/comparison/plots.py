"""The comparison's plots (matplotlib, Agg, no display needed); a synthetic run labels every one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_lens_t5gemma.comparison.report import Report, Row, TransferRow


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


def plots(report: Report, out: Path, synthetic: bool) -> dict[str, Path]:
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
