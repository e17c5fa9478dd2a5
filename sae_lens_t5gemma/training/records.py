"""What a run leaves: the result, the training summary, the release YAML (and its
registration), and the lines printed before and after a run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lens_t5gemma.outputs import atomic_write
from sae_lens_t5gemma.training.checkpoints import ONE_PROCESS
from sae_lens_t5gemma.training.config import INPUT_CONVENTION_KEY, _check_release_name
from sae_lens_t5gemma.training.evals import eval_feeds, flatten_metrics
from sae_lens_t5gemma.training.plan import TrainingPlan, per_stack

if TYPE_CHECKING:
    from sae_lens import SAE, TrainingSAE


@dataclass
class TrainingResult:
    """What a run produced."""

    out: Path
    """The output folder."""
    paths: dict[str, Path]
    """SAE id -> its SAELens folder."""
    saes: dict[str, SAE[Any]]
    """SAE id -> the saved SAE, loaded back with ``SAE.load_from_disk``."""
    eval_metrics: dict[str, dict[str, Any]]
    """SAE id -> the final eval (CE-loss and KL scores, L0, explained variance...) of the saved SAE."""
    eval_history: list[dict[str, Any]]
    """Every in-training eval, in order, each ``{sae id: metrics}``."""
    initial_saes: dict[str, TrainingSAE[Any]] = field(default_factory=dict)
    """Copies of the SAEs as initialised (only with ``keep_initial=True``)."""
    release: str | None = None
    """The registered release name, if any."""
    convention: str = ""
    """How the model was fed (``TrainingPlan.convention_metadata``), in words."""
    release_yaml: Path | None = None


# ------------------------------------------------------------- interruption and resume


def _merge(plan: TrainingPlan, results: list[TrainingResult]) -> TrainingResult:
    merged = TrainingResult(plan.out, {}, {}, {}, [], {})
    for r in results:
        merged.paths.update(r.paths)
        merged.eval_metrics.update(r.eval_metrics)
        merged.eval_history.extend(r.eval_history)
        merged.initial_saes.update(r.initial_saes)
    return merged


def _finish(
    plan: TrainingPlan, result: TrainingResult, processes: dict[str, Any] | None = None
) -> TrainingResult:
    """Load the saved SAEs back, write ``training_summary.json`` and the release YAML.

    ``processes``: the ``torchrun`` job that trained (``distributed.job``), recorded in the
    summary with where its final evals read their data; one process when None.
    """
    from sae_lens import SAE

    processes = dict(processes or ONE_PROCESS)
    if processes["world_size"] > 1:
        processes["final_evals"] = "on rank 0, on batches of its shard of the documents"

    result.saes = {k: SAE.load_from_disk(p, device=plan.config.device) for k, p in result.paths.items()}
    result.convention = "; ".join(
        dict.fromkeys(plan.convention_metadata(s.stack)[INPUT_CONVENTION_KEY] for s in plan.sites)
    )
    summary = {
        "config": plan.config.to_dict(),
        "model_name": plan.dims.name,
        "model_dtype": plan.model_dtype,
        "eval_feeds": eval_feeds(plan),
        "saes": {k: str(p) for k, p in result.paths.items()},
        "eval_metrics": result.eval_metrics,
        "convention": {s.friendly: plan.convention_metadata(s.stack) for s in plan.sites},
        "processes": processes,
        "note": "Metrics over covered positions only (sae_lens_t5gemma.analysis.evaluation); CE/KL scored on the "
        "continuation under prefix_lm, on a copy task under reconstruct.",
    }
    atomic_write(plan.out / "training_summary.json", json.dumps(summary, indent=2, default=str))
    if plan.config.release_name:
        result.release_yaml = write_release_yaml(plan.out, plan.config.release_name, list(result.paths))
        result.release = register_release(result.release_yaml, replace=plan.config.overwrite)
    return result


# ------------------------------------------------------------------------ cached path


def describe_plan(plan: TrainingPlan, cached: bool = False) -> str:
    """A few lines saying what a run will do (printed before the model loads)."""
    cfg = plan.config
    parts = [f"k={cfg.k:g}"] if cfg.k is not None else []
    if cfg.l1 is not None:
        parts.append(f"{'l1' if cfg.architecture == 'standard' else 'l0_coefficient'}={cfg.l1:g}")
    sparsity = " ".join(parts)
    if cached:
        runner = "CacheActivationsRunner, then LanguageModelSAETrainingRunner on the cache (per hook)"
    elif len(plan.sites) > 1 and cfg.multi_hook:
        runner = "MultiSAETrainingRunner (one forward pass feeds all hooks)"
    else:
        runner = "LanguageModelSAETrainingRunner" + (" (one run per hook)" if len(plan.sites) > 1 else "")
    lines = [
        f"model    {plan.dims.name} ({plan.dims.n_layers['encoder']}+{plan.dims.n_layers['decoder']} layers)",
        f"dataset  {plan.dataset_label}",
        f"SAEs     {len(plan.sites)} x {cfg.architecture} d_sae={cfg.d_sae} {sparsity}, "
        f"{cfg.training_tokens:,} tokens each, lr {cfg.lr:g}, preset {cfg.preset or '-'}",
        f"runner   {runner}",
    ]
    lines += [f"  {s.friendly:24s} {s.hook_name:40s} d_in={plan.dims.d_in(s)}" for s in plan.sites]
    for stack_plan in per_stack(plan) if not cached else []:
        # One runner per stack, or one per site without multi_hook (the largest site then).
        z = stack_plan.store_sizing(stack_plan.sites if cfg.multi_hook else stack_plan.sites[:1])
        lines.append(
            f"memory   {stack_plan.sites[0].stack}: {z.store_batch_size_prompts} prompt(s) per forward, buffer "
            f"{z.n_batches_in_buffer} rows; estimated peak above the model {z.peak_bytes / 2**30:.2f} GiB = "
            f"activations {z.activation_bytes / 2**30:.2f} (store {z.estimate_bytes / 2**30:.2f} of its "
            f"{z.budget_bytes / 2**30:.2f} budget, one SAE step {z.step_bytes / 2**30:.2f}) + SAEs with Adam "
            f"{z.sae_state_bytes / 2**30:.2f}"
        )
    lines.append(f"out      {plan.out}" + (f" (release {cfg.release_name})" if cfg.release_name else ""))
    return "\n".join(lines)


def format_report(result: TrainingResult) -> str:
    """A table of the final evals of a run, and how to load the SAEs."""
    head = f"{'sae id':24s} {'L0':>8s} {'expl.var':>9s} {'CE score':>9s} {'KL score':>9s}  folder"
    rows = [head]
    for sae_id, path in result.paths.items():
        m = flatten_metrics(result.eval_metrics.get(sae_id, {}))

        def num(key: str, fmt: str, m: dict[str, float] = m) -> str:
            v = m.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        rows.append(
            f"{sae_id:24s} {num('l0', '8.1f')} {num('explained_variance', '9.3f')} "
            f"{num('ce_loss_score', '9.3f')} {num('kl_div_score', '9.3f')}  {path}"
        )
    rows.append(f"Metrics over covered positions; convention: {result.convention}.")
    first = next(iter(result.paths), None)
    if result.release and first:
        rows.append(f"release {result.release!r} registered; in a new process register it again first:")
        rows.append(f"  sae_lens_t5gemma.training.register_release({str(result.release_yaml)!r})")
        rows.append(f"  SAE.from_pretrained(release={result.release!r}, sae_id={first!r})")
    elif first:
        rows.append(f"load: SAE.load_from_disk({str(result.paths[first])!r})")
    return "\n".join(rows)


def write_release_yaml(folder: str | Path, release_name: str, sae_ids: Sequence[str] | None = None) -> Path:
    """Write ``<folder>/release.yaml`` in SAELens' ``pretrained_saes.yaml`` schema.

    Every subfolder holding a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) is one
    SAE, and its folder name is its SAE id (or pass ``sae_ids``). Entries carry the trained
    L0 and the final eval's explained variance where known. The release loads through this
    package's local-folder loader; :func:`register_release` registers it.
    """
    from sae_lens_t5gemma.loading import registration as registration
    from sae_lens_t5gemma.loading.release_yaml import release_yaml
    from sae_lens_t5gemma.loading.saelens_folder import check_cfg_json

    folder = Path(folder).resolve()
    _check_release_name(release_name)
    if sae_ids is None:
        sae_ids = sorted(
            p.name
            for p in folder.iterdir()
            if (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file()
        )
    if not sae_ids:
        raise ValueError(
            f"Folder {str(folder)!r} holds no SAELens SAE folders (cfg.json + sae_weights.safetensors)"
        )
    entries, model = [], None
    for sae_id in sae_ids:
        cfg_path = folder / sae_id / "cfg.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"SAE folder {str(folder / sae_id)!r} has no cfg.json")
        meta = check_cfg_json(folder / sae_id).get("metadata") or {}
        model = model or meta.get("model_name")
        entry: dict[str, Any] = {"id": sae_id, "path": sae_id}
        if meta.get("l0") is not None:
            entry["l0"] = round(float(meta["l0"]), 4)
        evals_path = folder / sae_id / "eval_metrics.json"
        if evals_path.is_file():
            try:
                ev = json.loads(evals_path.read_text(encoding="utf-8"))
                ev.get("explained_variance")
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{evals_path}: not a JSON object of eval metrics ({str(e)[:200]})") from e
            if "explained_variance" in ev:
                entry["variance_explained"] = round(float(ev["explained_variance"]), 4)
        entries.append(entry)
    text = release_yaml(
        release_name,
        repo_id=str(folder),
        model=model or "unknown",
        saes=entries,
        conversion_func=registration.LOCAL_LOADER,
        header="SAEs trained on T5Gemma 2 with sae_lens_t5gemma (SAELens pretrained_saes.yaml schema).\n"
        "Load by name after sae_lens_t5gemma.training.register_release(<this file>).",
    )
    path = folder / "release.yaml"
    atomic_write(path, text)  # a reader never sees half a YAML
    return path


def register_release(path: str | Path, replace: bool = False) -> str:
    """Register a release YAML written by :func:`write_release_yaml`; returns the release name.

    The SAE folders are looked up next to the YAML (so the folder may have moved since).
    A release registered before with other contents needs ``replace=True``; SAELens' and
    this package's own releases are never replaced (see
    :func:`sae_lens_t5gemma.loading.registration.register_local_release`).
    """
    from sae_lens_t5gemma.loading import registration as registration

    return registration.register_local_release(path, replace=replace)
