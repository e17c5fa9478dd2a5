"""Feature dashboards: self-contained HTML pages, one per feature plus an index.

The layout follows SAEDashboard's and Neuronpedia's feature pages, which SAE users know:
feature facts and density on the left with the logit (decoder sites) or ablation (encoder
sites) tables, and on the right the activation histogram, the top activations with every
token shaded by the feature's activation, then quantile-sampled intervals. What is
T5Gemma 2's own: every token is marked as encoder input (orange underline) or decoder
continuation (blue underline), and a ``|dec→`` marker shows where the decoder takes over
under ``prefix_lm``.

Pages are rendered with Jinja2 from ``templates/*.html.j2``; plots are matplotlib figures
embedded as inline SVG. Nothing is loaded from the network. (SAEDashboard itself cannot
be installed beside this package: it pins ``transformer-lens<3`` / ``transformers<4.57``.)

The output folder holds one run's files only (:func:`outputs.owned_outputs`): it is locked
while written, every file is written atomically and never through a symlink, and the pages
and export files of an earlier run that this run did not write again are removed at the end
(files the package did not write are left alone; ``stats/`` is :func:`feature_stats.corpus_stats`'
own, where a symlink is refused). Features whose activations hold NaN or Inf are reported as
non-finite, never as dead.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.analysis.effects import FeatureEffect
from sae_lens_t5gemma.analysis.feature_stats import Example, FeatureStats
from sae_lens_t5gemma.analysis.stats_state import SAEInfo
from sae_lens_t5gemma.dashboard.checks import check_features, nonfinite_features
from sae_lens_t5gemma.model.sites import IMAGE_TOKEN_LABEL
from sae_lens_t5gemma.outputs import OutputRun, owned_outputs, refuse_symlinks

if TYPE_CHECKING:
    from sae_lens import SAE

    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2

_SEG_CLASS = {
    "encoder input": "seg-enc",
    "decoder continuation": "seg-dec",
    "encoder input + decoder (reconstruct)": "seg-both",
    "": "",
}


def tokrepr(token: str) -> str:
    """A token as shown on a page: newlines and tabs visible, an empty token as ∅."""
    if token == "":
        return "∅"
    return token.replace("\n", "↵").replace("\t", "⇥")


def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sae_lens_t5gemma.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["tokrepr"] = tokrepr
    return env


def rendered_tokens(example: Example, max_act: float) -> list[dict[str, Any]]:
    """Per window token: text, activation shade, segment class, tooltip, and whether the
    decoder continuation starts just before it."""
    out = []
    scale = max_act if max_act > 0 else 1.0
    for i, (tok, act, seg) in enumerate(zip(example.tokens, example.acts, example.segments, strict=True)):
        alpha = max(0.0, min(1.0, act / scale))
        prev = example.segments[i - 1] if i else ""
        out.append({
            "text": tokrepr(tok),
            "color": f"rgba(255, 140, 0, {alpha:.3f})" if alpha > 0 else "transparent",
            "seg_class": _SEG_CLASS.get(seg, ""),
            "center": i == example.center,
            "title": ("image token · " if tok == IMAGE_TOKEN_LABEL else "")
            + f"{tok!r}: activation {act:.4g}"
            + (f" · {seg}" if seg else ""),
            "image": tok == IMAGE_TOKEN_LABEL,
            "split_before": seg == "decoder continuation" and prev == "encoder input",
        })  # fmt: skip
    return out


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the SVG sits inline


def _figure(width: float = 5.2, height: float = 2.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text in the page
    fig, ax = plt.subplots(figsize=(width, height))
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def histogram_svg(edges: torch.Tensor, counts: torch.Tensor, feature: int) -> str:
    """The activation histogram of one feature (log-spaced bins) as inline SVG."""
    fig, ax = _figure()
    e = edges.double().numpy()
    c = counts.double().numpy()
    nz = c.nonzero()[0]
    if len(nz):
        lo, hi = max(nz[0] - 1, 0), min(nz[-1] + 2, len(c))
        ax.bar(e[lo:hi], c[lo:hi], width=(e[lo + 1 : hi + 1] - e[lo:hi]), align="edge", color="#fb8f44")
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "never fired", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"feature {feature} activation")
    ax.set_ylabel("positions")
    return _svg(fig)


def values_svg(values: Sequence[float], xlabel: str) -> str:
    """A histogram of values (logit effects, or log10 densities) as inline SVG."""
    fig, ax = _figure()
    ax.hist(list(values), bins=60, color="#54aeff")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _svg(fig)


def _positive(name: str, value: Any, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def feature_effect(
    model: HookedT5Gemma2,
    sae: SAE[Any],
    stats: FeatureStats,
    key: str,
    feature: int,
    rows: dict[int, list[int]] | None,
    k: int = 10,
    vectors: tuple[torch.Tensor, str] | None = None,
) -> FeatureEffect | None:
    """Logit effects at decoder sites, ablation effects at encoder sites (None where unavailable)."""
    from sae_lens_t5gemma.analysis.effects import ablation_effects, logit_effect_vectors, logit_effects

    info = stats.info(key)
    if info.stack == "decoder":
        try:
            return logit_effects(model, sae, feature, k, vectors or logit_effect_vectors(model, sae))
        except ValueError:
            return None
    if rows is None:
        return None
    return ablation_effects(model, sae, feature, stats.top_examples(key, feature), rows, k)


def write_dashboard(
    model: HookedT5Gemma2,
    sae: SAE[Any],
    stats: FeatureStats,
    out: str | Path,
    features: Sequence[int] | None = None,
    *,
    key: str | None = None,
    dataset: str | Path | None = None,
    texts: Sequence[str] | None = None,
    n_features: int = 20,
    k_effects: int = 10,
    progress: bool = True,
) -> Path:
    """Write ``index.html`` and one ``feature_<f>.html`` per feature into ``out``.

    Args:
        model: the model the statistics were made on (for the logit/ablation effects).
        sae: the SAE.
        stats: from :func:`feature_stats.corpus_stats` (or ``FeatureStats.load``).
        out: the folder for the pages.
        features: which features; default the ``n_features`` densest ones that fired.
        key: the SAE's key in ``stats`` (default: its only SAE).
        dataset, texts: the corpus the statistics were made on; encoder sites need it to
            re-run their top examples with the feature ablated (without it, no ablation table).
        k_effects: rows in the logit/ablation tables.
        progress: show a progress bar.

    Returns:
        The index page's path.

    Raises:
        OutputLockedError: another run is writing ``out``.
        OutputPathError: a page's path in ``out`` is a symlink.
    """
    key = key or (stats.keys[0] if len(stats.keys) == 1 else None)
    if key is None:
        raise ValueError(f"These statistics hold several SAEs {stats.keys}: say which with key=")
    info = stats.info(key)
    if info.d_sae != sae.cfg.d_sae:
        raise ValueError(
            f"SAE has d_sae {sae.cfg.d_sae}, the statistics for {key!r} {info.d_sae}: not the same SAE"
        )
    _positive("n_features (--n-features)", n_features)
    features = check_features(features, info.d_sae, f"SAE {key!r}")  # before anything is written
    with owned_outputs(out, "dashboard") as run:
        return _write_pages(model, sae, stats, Path(out), features, key, dataset, texts, n_features, k_effects,
                            progress, run)  # fmt: skip


def _write_pages(model: HookedT5Gemma2, sae: SAE[Any], stats: FeatureStats, out: Path, features: list[int] | None,
                 key: str, dataset: str | Path | None, texts: Sequence[str] | None, n_features: int, k_effects: int,
                 progress: bool, run: OutputRun) -> Path:  # fmt: skip
    from tqdm.auto import tqdm

    from sae_lens_t5gemma.analysis.effects import rows_by_index
    from sae_lens_t5gemma.analysis.feature_stats import log10_density

    info = stats.info(key)
    density = stats.density(key)
    if features is None:
        order = [f for f in density.argsort(descending=True).tolist() if density[f] > 0]
        features = sorted(order[:n_features])
    env = _environment()
    synthetic = bool(stats.meta.get("synthetic")) or info.synthetic
    rows = None
    if info.stack == "encoder" and (dataset is not None or texts is not None):
        wanted = {e.row for f in features for e in stats.top_examples(key, f)}
        rows = rows_by_index(model, dataset, wanted, stats.meta["config"]["context_size"], texts=texts,
                             split=stats.meta.get("split", "train"))  # fmt: skip
    from sae_lens_t5gemma.analysis.effects import decoder_logit_vectors

    vectors = decoder_logit_vectors(model, sae, info.stack)
    common = {"meta": stats.meta, "info": _info_view(info), "synthetic": synthetic}
    index_rows = []
    for i, f in enumerate(tqdm(features, desc="dashboard pages", unit="page", disable=not progress)):
        max_act = float(stats.max_activation(key)[f])
        top = stats.top_examples(key, f)
        groups = [
            {"low": lo, "high": hi, "frac": frac, "examples": [_example_view(e, max_act) for e in exs]}
            for lo, hi, frac, exs in stats.quantile_examples(key, f)
        ]
        effect = feature_effect(model, sae, stats, key, f, rows, k_effects, vectors)
        edges, counts = stats.histogram(key, f)
        page = env.get_template("feature.html.j2").render(
            **common,
            feature=f,
            prev=features[i - 1] if i else None,
            next=features[i + 1] if i + 1 < len(features) else None,
            density=float(density[f]),
            n_tokens=stats.n_tokens(key),
            max_act=max_act,
            mean_act=float(stats.mean_activation(key)[f]),
            top=[_example_view(e, max_act) for e in top],
            groups=groups,
            effect=effect,
            hist_svg=histogram_svg(edges, counts, f),
            logit_svg=values_svg(effect.values, f"logit effect of feature {f}")
            if effect and effect.values
            else "",
        )
        run.write(out / f"feature_{f}.html", page)
        top_tokens = [t for t, _ in Counter(e.tokens[e.center] for e in top).most_common(3)]
        index_rows.append({
            "feature": f, "density": float(density[f]), "max_act": max_act, "top_tokens": top_tokens,
            "effect_tokens": [r.token for r in effect.top[:3]] if effect else [],
        })  # fmt: skip
    broken = nonfinite_features(stats, key)
    dead = density == 0
    dead[broken] = False  # a NaN never fires: such a feature is broken, not dead
    index = env.get_template("index.html.j2").render(
        **common,
        rows=index_rows,
        n_tokens=stats.n_tokens(key),
        n_dead=int(dead.sum()),
        nonfinite=broken,
        density_svg=values_svg(log10_density(density).tolist(), "log10 feature density (dead at -10)"),
    )
    return run.write(out / "index.html", index)


def _info_view(info: SAEInfo) -> dict[str, Any]:
    view = dict(info.__dict__)
    view["site_words"] = info.site_words
    return view


def _example_view(e: Example, max_act: float) -> dict[str, Any]:
    view = dict(e.__dict__)
    view["part"] = e.part
    view["rendered"] = rendered_tokens(e, max_act)
    return view


def run_dashboard(
    sae_spec: str,
    out: str | Path,
    dataset: str | Path | None = None,
    features: Sequence[int] | None = None,
    *,
    model_name: str | None = None,
    stand_in: bool = False,
    convention: str | None = None,
    config: Any = None,
    max_rows: int | None = None,
    n_features: int = 20,
    resume: bool = False,
    overwrite: bool = False,
    neuronpedia: bool = True,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """The ``dashboard`` command: load the model and SAE, gather statistics, write pages and export.

    Writes ``out/stats/`` (see :mod:`feature_stats`), ``out/index.html`` + ``out/feature_<f>.html``
    and, with ``neuronpedia``, ``out/neuronpedia/`` (see :mod:`neuronpedia`). ``stand_in``
    runs offline on the synthetic stand-in hub (tiny random model, random SAEs), and uses
    its embedded corpus when no dataset is given. Returns the index page's path.

    Every argument (features against the SAE's width included) is checked before the model
    loads; ``out`` is locked for the whole run and ends up holding this run's files only.
    With ``neuronpedia``, features with NaN/Inf activations are refused (JSON cannot carry
    them) before any page is written.
    """
    import contextlib

    from sae_lens_t5gemma.analysis.feature_stats import corpus_stats
    from sae_lens_t5gemma.loading.inspection import load_sae_spec
    from sae_lens_t5gemma.model.hooked import load_t5gemma2
    from sae_lens_t5gemma.model.sizes import T5GEMMA2_MODEL

    if dataset is None and not stand_in:
        raise ValueError("--dataset is required: a Hugging Face dataset name or local .txt/.jsonl files")
    _positive("n_features (--n-features)", n_features)
    _positive("max_rows (--max-rows)", max_rows, none_ok=True)
    check_features(features, None)  # types and signs now; the width once the SAE is loaded
    context: Any = contextlib.nullcontext()
    if stand_in:
        from sae_lens_t5gemma.comparison.models import stand_in_hub

        context = stand_in_hub()
    out = Path(out)
    with context, owned_outputs(out, "dashboard"):
        sae, source = load_sae_spec(sae_spec, device)
        features = check_features(features, sae.cfg.d_sae, f"SAE {sae_spec}")
        key = _key_for(sae)
        stats_dir = out / "stats"  # corpus_stats' own folder (its files are its to keep or replace)
        refuse_symlinks(stats_dir)  # nothing written there may go through a link
        name = model_name or getattr(sae.cfg.metadata, "model_name", None) or T5GEMMA2_MODEL
        model = load_t5gemma2(name, device=device, dtype=dtype)
        if convention is not None:
            model.convention = convention
        texts = _stand_in_texts() if dataset is None else None
        stats = corpus_stats(
            model, {key: sae}, dataset, stats_dir, texts=texts, config=config, max_rows=max_rows,
            resume=resume, overwrite=overwrite, sources={key: source}, synthetic=stand_in, progress=progress,
        )  # fmt: skip
        if neuronpedia:
            from sae_lens_t5gemma.dashboard.neuronpedia import check_finite

            check_finite(stats, key, None, hint=" Pass --no-neuronpedia to write the pages alone.")
        index = write_dashboard(model, sae, stats, out, features, key=key, dataset=dataset, texts=texts,
                                n_features=n_features, progress=progress)  # fmt: skip
        if neuronpedia:
            from sae_lens_t5gemma.dashboard.neuronpedia import export_neuronpedia

            export_neuronpedia(model, sae, stats, out / "neuronpedia", key=key, features=None)
    return index


def _key_for(sae: SAE[Any]) -> str:
    from sae_lens_t5gemma.model import sites as sites_mod

    return sites_mod.resolve(sae.cfg.metadata.hook_name).friendly


def run_find_features(
    sae_spec: str,
    with_file: str | Path,
    without_file: str | Path,
    k: int = 20,
    *,
    model_name: str | None = None,
    stand_in: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    encoder_reads_whole_text: bool = False,
) -> str:
    """The ``find-features`` command: a table of the features that fire more on one set of texts.

    Texts are read under the model's convention, as every call reads a prompt; with
    ``encoder_reads_whole_text`` an encoder SAE's encoder reads each whole text instead."""
    import contextlib

    from sae_lens_t5gemma.analysis.corpus import read_texts
    from sae_lens_t5gemma.analysis.search import find_features
    from sae_lens_t5gemma.loading.inspection import load_sae_spec
    from sae_lens_t5gemma.model.hooked import load_t5gemma2
    from sae_lens_t5gemma.model.sizes import T5GEMMA2_MODEL

    _positive("k (-k)", k)
    texts_with, texts_without = read_texts(with_file), read_texts(without_file)
    context: Any = contextlib.nullcontext()
    if stand_in:
        from sae_lens_t5gemma.comparison.models import stand_in_hub

        context = stand_in_hub()
    with context:
        sae, source = load_sae_spec(sae_spec, device)
        model = load_t5gemma2(
            model_name or sae.cfg.metadata.model_name or T5GEMMA2_MODEL, device=device, dtype=dtype
        )
        rows = find_features(model, sae, texts_with, texts_without, k=k,
                             encoder_reads_whole_text=encoder_reads_whole_text)  # fmt: skip
    label = " SYNTHETIC stand-in," if stand_in else ""
    read = "whole texts" if encoder_reads_whole_text and model.site(
        sae.cfg.metadata.hook_name).stack == "encoder" else f"convention {model.convention}"  # fmt: skip
    lines = [
        f"features of {source} ({sae.cfg.metadata.hook_name}, d_sae {sae.cfg.d_sae},{label} "
        f"{read}) ranked by mean peak activation on {len(texts_with)} texts with minus "
        f"{len(texts_without)} without",
        f"{'feature':>8}{'score':>10}{'with':>10}{'without':>10}{'fires with':>12}{'without':>9}",
    ]
    for r in rows:
        lines.append(f"{r.feature:>8}{r.score:>10.4f}{r.mean_with:>10.4f}{r.mean_without:>10.4f}"
                     f"{r.frac_with:>12.0%}{r.frac_without:>9.0%}")  # fmt: skip
    return "\n".join(lines)


def _stand_in_texts() -> list[str]:
    from sae_lens_t5gemma.stand_in.synthetic import stand_in_texts

    return stand_in_texts()
