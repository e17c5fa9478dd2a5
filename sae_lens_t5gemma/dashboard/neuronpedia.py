"""Neuronpedia export: feature data in the JSON layout SAEDashboard's ``NeuronpediaRunner`` writes.

SAEDashboard (``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``, ``NeuronpediaDashboardBatch``
and friends; checked at commit db4839a) writes ``batch-<n>.json`` files that Neuronpedia's
importer (and SAEDashboard's own ``neuronpedia_export``, which turns them into the bulk-import
``features/*.jsonl.gz`` and ``activations/*.jsonl.gz``) reads. This module writes the same
layout, field for field (:data:`BATCH_FIELDS`, :data:`FEATURE_FIELDS`, :data:`ACTIVATION_FIELDS`):

- batch: ``model_id``, ``layer``, ``sae_set``, ``sae_id_suffix``, ``features``;
- feature: ``feature_index``; the logit tables ``neg_str``/``neg_values``/``pos_str``/``pos_values``;
  the density ``frac_nonzero``; the activation histogram ``freq_hist_data_bar_values`` (bin
  centres) / ``_bar_heights`` (counts); the logit histogram ``logits_hist_data_bar_values`` /
  ``_bar_heights``; ``n_prompts_total``, ``n_tokens_in_prompt``, ``dataset``; ``activations``;
  and the table fields SAEDashboard fills from neuron alignment and feature correlations
  (``neuron_alignment_*``, ``correlated_neurons_*``, ``correlated_features_*``,
  ``decoder_weights_dist``, ``vector``), written empty here;
- activation: ``bin_min``, ``bin_max``, ``bin_contains`` (top activations: ``-1, max, -1``;
  an interval group: its bounds and the fraction of firing positions it holds), ``tokens``
  (strings), ``values`` (the feature's activation per token), ``qualifying_token_index``
  (the example's own position in ``tokens``).

Explanations are not part of the runner's output: Neuronpedia makes them after import
(auto-interp), so nothing is written for them.

What differs, and where the T5Gemma 2 facts go:

- decoder sites: ``pos``/``neg`` are the direct-path logit effects of
  :func:`effects.logit_effects` (approximations stated there); encoder sites have no logit
  path, so they hold the ablation effects (promoted / suppressed tokens) when ``ablation=True``
  and are empty otherwise;
- the activation histogram has log-spaced bins (SAEDashboard's are linear);
- ``t5gemma2.json`` beside the batches holds what the layout has no field for: the site,
  width, convention, synthetic flag, the proposed Neuronpedia id, and per activation whether
  each token is encoder input or decoder continuation;
- ``run_settings.json`` (the run's settings) and ``skipped_indexes.json`` (features that never
  fired) as the runner writes them.

The JSON is strict (no ``NaN``/``Infinity``, which ``JSON.parse`` rejects): a feature whose
activations held NaN or Inf is refused, naming it and the field, before anything is written,
and :func:`validate_batch` rejects non-finite numbers too. The folder is locked while written
and holds one export's files only (:func:`outputs.owned_outputs`): batches of an earlier,
wider export are removed.

Neuronpedia ids (SAELens' ``neuronpedia`` field in a release YAML, ``<model_id>/<source id>``
with source id ``<layer>-<sae_set>``) are produced by :func:`neuronpedia_id`, e.g.
``t5gemma-2-270m-270m/5-mindchain-enc-attn-out-4k``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.analysis.feature_stats import FeatureStats
from sae_lens_t5gemma.analysis.stats_state import SAEInfo
from sae_lens_t5gemma.model.sizes import T5GEMMA2_MODEL
from sae_lens_t5gemma.outputs import OutputRun, owned_outputs

if TYPE_CHECKING:
    from sae_lens import SAE

    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2

BATCH_FIELDS: dict[str, Any] = {
    "model_id": str,
    "layer": int,
    "sae_set": str,
    "sae_id_suffix": (str, type(None)),
    "features": list,
}
FEATURE_FIELDS: dict[str, Any] = {
    "feature_index": int,
    "neuron_alignment_indices": list,
    "neuron_alignment_values": list,
    "neuron_alignment_l1": list,
    "correlated_neurons_indices": list,
    "correlated_neurons_l1": list,
    "correlated_neurons_pearson": list,
    "correlated_features_indices": list,
    "correlated_features_l1": list,
    "correlated_features_pearson": list,
    "neg_str": list,
    "neg_values": list,
    "pos_str": list,
    "pos_values": list,
    "frac_nonzero": float,
    "freq_hist_data_bar_values": list,
    "freq_hist_data_bar_heights": list,
    "logits_hist_data_bar_heights": list,
    "logits_hist_data_bar_values": list,
    "n_prompts_total": int,
    "n_tokens_in_prompt": int,
    "dataset": str,
    "decoder_weights_dist": list,
    "activations": list,
    "vector": list,
}
ACTIVATION_FIELDS: dict[str, Any] = {
    "bin_min": (int, float),
    "bin_max": (int, float),
    "bin_contains": (int, float),
    "tokens": list,
    "values": list,
    "qualifying_token_index": int,
}
"""The layout of SAEDashboard's ``NeuronpediaDashboardBatch`` / ``Feature`` / ``Activation.to_dict()``
(optional DFA fields left out: they exist for attention SAEs only)."""

_MINDCHAIN_RELEASE = "t5gemma2-270m-attn_out"


def _width(d_sae: int) -> str:
    return f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)


def neuronpedia_set(info: SAEInfo, set_name: str | None = None) -> str:
    """The Neuronpedia ``sae_set`` for an SAE: ``<set>-<enc|dec>-<site>-<width>``."""
    name = set_name or ("mindchain" if info.source.startswith(_MINDCHAIN_RELEASE) else "t5g2")
    return f"{name}-{'enc' if info.stack == 'encoder' else 'dec'}-{info.kind.replace('_', '-')}-{_width(info.d_sae)}"


def neuronpedia_model_id(model_name: str) -> str:
    """Neuronpedia's model id: the hub name without its owner, lower case."""
    return model_name.rstrip("/").split("/")[-1].lower()


def neuronpedia_id(info: SAEInfo, model_name: str, set_name: str | None = None) -> str:
    """``<model_id>/<layer>-<sae_set>``, SAELens' ``neuronpedia`` field for the release YAML."""
    return f"{neuronpedia_model_id(model_name)}/{info.layer}-{neuronpedia_set(info, set_name)}"


def mindchain_neuronpedia_ids(model_name: str = T5GEMMA2_MODEL, n_layers: int = 18,
                              d_sae: int = 4096) -> dict[str, str]:  # fmt: skip
    """The proposed ``neuronpedia`` id of each of the 36 mindchain SAEs (``sae_id -> id``)."""
    from sae_lens_t5gemma.model import sites as sites_mod

    out = {}
    for stack in ("encoder", "decoder"):
        for layer in range(n_layers):
            s = sites_mod.site(stack, layer, "attn_out")
            info = SAEInfo(
                f"{stack}.{layer}", s.hook_name, stack, layer, "attn_out", 0, d_sae, _MINDCHAIN_RELEASE
            )
            out[f"{stack}/layer_{layer}"] = neuronpedia_id(info, model_name)
    return out


class NonFiniteError(ValueError):
    """A value the export would write is NaN or Inf; the message names the feature and field."""


def _first_nonfinite(obj: Any, path: str) -> tuple[str, float] | None:
    """The path and value of the first NaN/Inf number in a JSON-like object, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path, obj)
    if isinstance(obj, dict):
        items: Any = ((f"{path}.{k}", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for p, v in items:
        found = _first_nonfinite(v, p)
        if found is not None:
            return found
    return None


def check_finite(
    stats: FeatureStats, key: str, features: Sequence[int] | None = None, hint: str = ""
) -> None:
    """Refuse statistics whose exported features saw NaN/Inf activations (default: every feature).

    Raises:
        NonFiniteError: naming the first such feature, its field and value, and how many there are.
    """
    from sae_lens_t5gemma.dashboard.checks import nonfinite_features

    broken = nonfinite_features(stats, key)
    if features is not None:
        wanted = set(features)
        broken = [f for f in broken if f in wanted]
    if broken:
        f = broken[0]
        peak, mean = float(stats.max_activation(key)[f]), float(stats.mean_activation(key)[f])
        more = f"{len(broken)} such features: {broken[:10]}{' ...' if len(broken) > 10 else ''}"
        raise NonFiniteError(
            f"Neuronpedia export of {key!r}: feature {f} field activations.values holds non-finite activations "
            f"(max {peak}, mean {mean}; {more}); the export's JSON cannot carry NaN/Inf, check the SAE and model "
            f"for NaN/Inf.{hint}"
        )


def _round(values: Sequence[float] | torch.Tensor) -> list[float]:
    return [round(float(v), 5) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def _activation(e: Any, bin_min: float, bin_max: float, bin_contains: float) -> dict[str, Any]:
    return {
        "bin_min": bin_min,
        "bin_max": bin_max,
        "bin_contains": bin_contains,
        "tokens": list(e.tokens),
        "values": _round(e.acts),
        "qualifying_token_index": int(e.center),
    }


def feature_record(
    stats: FeatureStats, key: str, feature: int, effect: Any = None, dataset: str | None = None
) -> tuple[dict[str, Any], list[list[str]]]:
    """One feature in SAEDashboard's layout, and the per-token segments of its activations."""
    edges, counts = stats.histogram(key, feature)
    centres = (edges[:-1] * edges[1:]).sqrt()
    nz = counts.nonzero().flatten()
    lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
    acts, segments = [], []
    top = stats.top_examples(key, feature)
    if top:
        peak = top[0].activation
        for e in top:
            acts.append(_activation(e, -1, round(peak, 5), -1))
            segments.append(e.segments)
    for low, high, frac, exs in stats.quantile_examples(key, feature):
        for e in exs:
            acts.append(_activation(e, round(low, 5), round(high, 5), round(frac, 5)))
            segments.append(e.segments)
    logit_heights: list[float] = []
    logit_values: list[float] = []
    if effect is not None and effect.values:
        h, bin_edges = torch.histogram(torch.tensor(effect.values, dtype=torch.float32), bins=40)
        logit_heights = _round(h)
        logit_values = _round((bin_edges[:-1] + bin_edges[1:]) / 2)
    record = {
        "feature_index": int(feature),
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": [r.token for r in effect.bottom] if effect else [],
        "neg_values": _round([r.value for r in effect.bottom]) if effect else [],
        "pos_str": [r.token for r in effect.top] if effect else [],
        "pos_values": _round([r.value for r in effect.top]) if effect else [],
        "frac_nonzero": float(stats.density(key)[feature]),
        "freq_hist_data_bar_values": _round(centres[lo:hi]),
        "freq_hist_data_bar_heights": _round(counts[lo:hi].double()),
        "logits_hist_data_bar_heights": logit_heights,
        "logits_hist_data_bar_values": logit_values,
        "n_prompts_total": int(stats.meta["rows_done"]),
        "n_tokens_in_prompt": int(stats.meta["config"]["context_size"]),
        "dataset": dataset if dataset is not None else str(stats.meta["dataset"]),
        "decoder_weights_dist": [],
        "activations": acts,
        "vector": [],
    }
    return record, segments


def export_neuronpedia(
    model: HookedT5Gemma2,
    sae: SAE[Any],
    stats: FeatureStats,
    out: str | Path,
    *,
    key: str | None = None,
    features: Sequence[int] | None = None,
    set_name: str | None = None,
    features_per_batch: int = 128,
    ablation: bool = False,
    dataset: str | Path | None = None,
    texts: Sequence[str] | None = None,
    k: int = 10,
) -> list[Path]:
    """Write ``batch-<n>.json`` (SAEDashboard's NeuronpediaRunner layout) and the side files.

    Args:
        model, sae, stats: as for :func:`dashboard.write_dashboard`.
        out: the export folder.
        key: the SAE's key in ``stats`` (default: its only one).
        features: which features (default: every feature that fired; the others are listed
            in ``skipped_indexes.json``, as the runner lists features below its sparsity threshold).
        set_name: the Neuronpedia set name prefix (default ``mindchain`` for the mindchain
            release, ``t5g2`` otherwise).
        features_per_batch: features per ``batch-<n>.json``.
        ablation: encoder sites: compute ablation effects for the pos/neg tables (re-runs the
            top examples of every exported feature; needs ``dataset`` or ``texts``).
        k: rows in the pos/neg tables.

    Returns:
        The batch files written.

    Raises:
        NonFiniteError: (a ``ValueError``) a value to export is NaN or Inf, named by feature and
            field: refused before anything is written where the statistics show it (NaN/Inf
            activations), at that feature where it comes from the SAE's weights (logit effects).
        OutputLockedError: another run is writing ``out``.
    """
    from sae_lens_t5gemma.dashboard.checks import check_features, nonfinite_features

    key = key or (stats.keys[0] if len(stats.keys) == 1 else None)
    if key is None:
        raise ValueError(f"These statistics hold several SAEs {stats.keys}: say which with key=")
    info = stats.info(key)
    if (
        isinstance(features_per_batch, bool)
        or not isinstance(features_per_batch, int)
        or features_per_batch < 1
    ):
        raise ValueError(f"features_per_batch must be a positive integer, got {features_per_batch!r}")
    density = stats.density(key)
    broken = nonfinite_features(stats, key)
    fired = [int(f) for f in (density > 0).nonzero().flatten().tolist()]
    chosen = (
        sorted(set(fired) | set(broken)) if features is None else (check_features(features, info.d_sae) or [])
    )
    check_finite(stats, key, chosen)
    out = Path(out)
    with owned_outputs(out, "neuronpedia export") as run:
        return _export(model, sae, stats, out, run, key, info, chosen, fired, set_name, features_per_batch,
                       ablation, dataset, texts, k)  # fmt: skip


def _export(model: HookedT5Gemma2, sae: SAE[Any], stats: FeatureStats, out: Path, run: OutputRun, key: str, info: SAEInfo,
            chosen: list[int], fired: list[int], set_name: str | None, features_per_batch: int, ablation: bool,
            dataset: str | Path | None, texts: Sequence[str] | None, k: int) -> list[Path]:  # fmt: skip
    from sae_lens_t5gemma.analysis.effects import (
        ablation_effects,
        decoder_logit_vectors,
        logit_effects,
        rows_by_index,
    )

    rows = None
    if info.stack == "encoder" and ablation:
        if dataset is None and texts is None:
            raise ValueError("ablation=True needs the corpus (dataset= or texts=) to re-run the top examples")
        wanted = {e.row for f in chosen for e in stats.top_examples(key, f)}
        rows = rows_by_index(model, dataset, wanted, stats.meta["config"]["context_size"], texts=texts)
    np_id = neuronpedia_id(info, stats.meta["model"], set_name)
    model_id, source = np_id.split("/", 1)
    extras: dict[str, Any] = {
        "neuronpedia_id": np_id, "site": info.hook_name, "site_words": info.site_words, "stack": info.stack,
        "layer": info.layer, "d_in": info.d_in, "d_sae": info.d_sae, "convention": stats.meta["convention_words"],
        "model_dtype": stats.meta.get("dtype", "float32"),
        "synthetic": bool(stats.meta.get("synthetic")) or info.synthetic, "source": info.source,
        "pos_neg_tables": "logit effects (direct path)" if info.stack == "decoder"
        else ("ablation effects" if ablation else "empty (encoder site, no ablation run)"),
        "segments": {},
    }  # fmt: skip
    vectors = decoder_logit_vectors(model, sae, info.stack)
    paths = []
    for b in range(0, max(len(chosen), 1), features_per_batch):
        batch_features = []
        for f in chosen[b : b + features_per_batch]:
            effect = None
            if vectors is not None:
                effect = logit_effects(model, sae, f, k, vectors)
            elif rows is not None:
                effect = ablation_effects(model, sae, f, stats.top_examples(key, f), rows, k)
            record, segments = feature_record(stats, key, f, effect)
            bad = _first_nonfinite(record, "")
            if bad is not None:  # e.g. NaN/Inf in the SAE's decoder weights, through the logit effects
                raise NonFiniteError(
                    f"Neuronpedia export of {key!r}: feature {f} field {bad[0].lstrip('.')} holds {bad[1]}; "
                    "the export's JSON cannot carry NaN/Inf, check the SAE and model for NaN/Inf."
                )
            if effect is not None:
                extras.setdefault("approximation", effect.approximation.split(";")[0])
            extras["segments"][str(f)] = segments
            batch_features.append(record)
        batch = {
            "model_id": model_id,
            "layer": info.layer,
            "sae_set": source.split("-", 1)[1],
            "sae_id_suffix": None,
            "features": batch_features,
        }
        paths.append(run.write(out / f"batch-{b // features_per_batch}.json", _dumps(batch)))
    # Never fired, and finite: a NaN feature is broken, not dead (it was refused above).
    fired_set = set(fired)
    run.write(out / "skipped_indexes.json",
              _dumps({"skipped_indexes": [f for f in range(info.d_sae) if f not in fired_set]}))  # fmt: skip
    settings = {
        "model_id": model_id, "layer": info.layer, "sae_set": source.split("-", 1)[1], "neuronpedia_id": np_id,
        "hook_name": info.hook_name, "dataset": stats.meta["dataset"], "n_prompts_total": stats.meta["rows_done"],
        "n_tokens_in_prompt": stats.meta["config"]["context_size"], "top_k": stats.meta["config"]["top_k"],
        "convention": stats.meta["convention"], "features_per_batch": features_per_batch,
    }  # fmt: skip
    run.write(out / "run_settings.json", _dumps(settings, indent=2))
    run.write(out / "t5gemma2.json", _dumps(extras))
    return paths


def _dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON: NaN/Inf raise instead of becoming ``NaN``/``Infinity``."""
    return json.dumps(obj, allow_nan=False, indent=indent)


def validate_batch(batch: Any, where: str = "batch") -> None:
    """Check one ``batch-<n>.json`` object against the documented layout.

    Raises:
        ValueError: the first missing or extra field, a field of the wrong type, or a NaN/Inf
            number (``JSON.parse`` rejects them), named by path.
    """

    def check(obj: Any, fields: dict[str, Any], path: str) -> None:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected an object, got {type(obj).__name__}")
        missing = sorted(set(fields) - set(obj))
        extra = sorted(set(obj) - set(fields) - {"dfa_values", "dfa_maxValue", "dfa_targetIndex"})
        if missing or extra:
            raise ValueError(f"{path}: missing fields {missing}, unexpected fields {extra}")
        for name, typ in fields.items():
            value = obj[name]
            ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"{path}.{name}: expected {typ}, got {type(value).__name__}")

    check(batch, BATCH_FIELDS, where)
    bad = _first_nonfinite(batch, where)
    if bad is not None:
        raise ValueError(f"{bad[0]}: {bad[1]} is not a finite number (strict JSON has no NaN/Infinity)")
    for i, feat in enumerate(batch["features"]):
        fp = f"{where}.features[{i}]"
        check(feat, FEATURE_FIELDS, fp)
        for a in ("neg", "pos"):
            if len(feat[f"{a}_str"]) != len(feat[f"{a}_values"]):
                raise ValueError(f"{fp}: {a}_str and {a}_values differ in length")
            if not all(isinstance(t, str) for t in feat[f"{a}_str"]):
                raise ValueError(f"{fp}.{a}_str: every entry must be a string")
        for h in ("freq_hist_data", "logits_hist_data"):
            if len(feat[f"{h}_bar_values"]) != len(feat[f"{h}_bar_heights"]):
                raise ValueError(f"{fp}: {h}_bar_values and {h}_bar_heights differ in length")
        if not 0 <= feat["frac_nonzero"] <= 1:
            raise ValueError(f"{fp}.frac_nonzero: {feat['frac_nonzero']} is not a fraction")
        for j, act in enumerate(feat["activations"]):
            ap = f"{fp}.activations[{j}]"
            check(act, ACTIVATION_FIELDS, ap)
            if len(act["tokens"]) != len(act["values"]):
                raise ValueError(f"{ap}: tokens and values differ in length")
            if not all(isinstance(t, str) for t in act["tokens"]):
                raise ValueError(f"{ap}.tokens: every entry must be a string")
            if not 0 <= act["qualifying_token_index"] < len(act["tokens"]):
                raise ValueError(
                    f"{ap}.qualifying_token_index {act['qualifying_token_index']} is outside tokens"
                )
