"""Run a training plan with SAELens' own runners: :func:`train`, the cached-activation path
and :func:`run_training` (what ``sae-lens-t5gemma train`` does).

SAELens trains SAEs with three runners, and each of them runs here unchanged on T5Gemma 2:

- ``LanguageModelSAETrainingRunner``: one SAE at one hook, any architecture;
- ``MultiSAETrainingRunner``: one SAE per hook, all fed by a single forward pass;
- ``CacheActivationsRunner``: activations cached to disk as a Hugging Face dataset, then
  trained from with ``use_cached_activations=True``.

They reach T5Gemma 2 through ``override_model=HookedT5Gemma2(...)``, which serves SAELens'
``run_with_cache(tokens, names_filter=..., stop_at_layer=...)`` calls under the run's input
convention. Under ``prefix_lm`` (the default) each row is split at ``p``: encoder SAEs train
on positions ``< p`` and decoder SAEs on positions ``>= p`` (SAELens' ``seqpos_slice``), so
no SAE sees a position its stack did not compute; a run over both stacks is split into one
runner per stack for that reason. An encoder-only run lets the encoder read the whole row.
Rows hold one document each (``disable_concat_sequences``). The runner configs come from a
checked ``TrainingPlan`` (``plan.py``, ``runner_configs.py``); the runs write SAELens-native
folders that ``SAE.load_from_disk`` reads, plus a release YAML (``records.py``).

A run holds the write lock on ``out`` (:func:`sae_lens_t5gemma.outputs.output_lock`). SIGINT
(Ctrl-C) or SIGTERM stops training between two steps and saves a SAELens checkpoint
(``checkpoints.py``); ``TrainConfig.resume`` continues from the latest one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.model.dtypes import dtype_name
from sae_lens_t5gemma.training import distributed
from sae_lens_t5gemma.training.checkpoints import (
    FINISHED,
    TrainingInterrupted,
    _prepare_out,
    _runner_groups,
    _RunnerContext,
    _Start,
    _writing,
    run_fingerprint,
)
from sae_lens_t5gemma.training.config import TrainConfig
from sae_lens_t5gemma.training.data import load_training_dataset
from sae_lens_t5gemma.training.evals import EvalRecorder, MultiEvalRecorder, _final_eval
from sae_lens_t5gemma.training.memory import _return_freed_memory_to_the_os
from sae_lens_t5gemma.training.plan import TrainingPlan, plan_training
from sae_lens_t5gemma.training.records import TrainingResult, _finish, _merge, describe_plan, format_report
from sae_lens_t5gemma.training.runner_configs import (
    build_cache_config,
    build_multi_runner_config,
    build_runner_config,
)
from sae_lens_t5gemma.training.sae_lens_seams import (
    _cache_runner_class,
    _cast_multi_hook_activations,
    _lean_multi_sae_steps,
    _quiet_runner_setup,
    _runner_classes,
    _wandb_mode,
)

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookedRootModule

_EVAL_RECORD_EXTRAS = ("model_dtype", "sae_dtype", "feeds")


def _finished_result(plan: TrainingPlan) -> TrainingResult:
    """A runner whose SAEs a resumed run keeps: their folders and their final evals as saved."""
    paths, evals = {}, {}
    for s in plan.sites:
        paths[s.friendly] = plan.out / s.friendly
        saved = json.loads((paths[s.friendly] / FINISHED).read_text(encoding="utf-8"))
        evals[s.friendly] = {k: v for k, v in saved.items() if k not in _EVAL_RECORD_EXTRAS}
    return TrainingResult(plan.out, paths, {}, evals, [], {})


def _load_model(plan: TrainingPlan):
    from sae_lens_t5gemma.model.hooked import load_t5gemma2

    return load_t5gemma2(plan.config.model, device=plan.config.device, dtype=plan.model_dtype)


def _check_model(model: Any, plan: TrainingPlan) -> None:
    cfg = getattr(model, "cfg", None)
    n, d = getattr(cfg, "n_layers", None), getattr(cfg, "d_model", None)
    want_n, want_d = max(plan.dims.n_layers.values()), plan.dims.d_model["decoder"]
    if (n, d) != (want_n, want_d) and None not in (n, d):
        raise ValueError(
            f"The model passed has {n} layers per stack and width {d}; the config of {plan.dims.name} "
            f"says {want_n} and {want_d}"
        )


def train(
    cfg: TrainConfig | TrainingPlan,
    model: HookedRootModule | None = None,
    dataset: Any = None,
    keep_initial: bool = False,
) -> TrainingResult:
    """Train one SAE per hook with SAELens' runners and save them.

    One hook: ``LanguageModelSAETrainingRunner``. Several hooks: ``MultiSAETrainingRunner``
    (one forward pass feeds them all) unless ``cfg.multi_hook`` is False, in which case one
    single-hook runner per site. Everything is checked before the model is loaded.

    Args:
        cfg: the run, or a plan from :func:`plan_training`.
        model: an already loaded ``HookedT5Gemma2`` (otherwise loaded from ``cfg.model``).
        dataset: a ``datasets`` dataset to use instead of ``cfg.dataset``.
        keep_initial: keep copies of the freshly initialised SAEs in the result.

    Returns:
        The saved SAEs (loaded back), their folders, the final evals and the in-training evals.

    Raises:
        TrainingInterrupted: SIGINT or SIGTERM stopped training; a checkpoint was saved in
            ``out/checkpoints`` (``cfg.resume`` continues from it).
        OutputLockedError: another run is writing ``cfg.out``.
    """
    plan = cfg if isinstance(cfg, TrainingPlan) else plan_training(cfg)
    plan, ranks = _join_job(plan)
    with _writing_on_main(plan.out, ranks):
        return _train(plan, ranks, _starts(plan, ranks), model, dataset, keep_initial)


def _writing_on_main(out: Path, ranks: distributed.Ranks | None) -> Any:
    """The write lock on ``out``, held by rank 0 alone under ``torchrun``."""
    return _writing(out) if ranks is None or ranks.is_main else contextlib.nullcontext()


def _starts(plan: TrainingPlan, ranks: distributed.Ranks | None) -> dict[str, _Start]:
    """Where each runner starts. Under ``torchrun`` rank 0 alone prepares ``out`` (it may remove an
    earlier run's checkpoints) and every rank gets its answer, or stops if it failed."""
    if ranks is None:
        return _prepare_out(plan)
    return distributed.from_main(lambda: _prepare_out(plan, distributed.job(plan, ranks)), ranks)


def _train(
    plan: TrainingPlan,
    ranks: distributed.Ranks | None,
    starts: dict[str, _Start],
    model: Any,
    dataset: Any,
    keep_initial: bool,
) -> TrainingResult:
    dataset = dataset if dataset is not None else load_training_dataset(plan)
    if ranks is not None:
        dataset = distributed.shard_dataset(dataset, ranks)
    model = model if model is not None else _load_model(plan)
    _check_model(model, plan)
    # What the SAEs' metadata records: the dtype the model really harvests in.
    weights = next(model.parameters(), None)
    if weights is not None:
        plan = dataclasses.replace(plan, harvest_dtype=dtype_name(weights.dtype))
    _return_freed_memory_to_the_os()
    torch.manual_seed(plan.config.seed)
    fingerprint = run_fingerprint(plan)
    results = []
    with _wandb_mode(plan.config.wandb), _fed_as_planned(model, plan):
        # One runner per stack: a runner has one seqpos_slice, and the stacks cover different
        # positions; and without multi_hook, one runner per site.
        groups = _runner_groups(plan)
        for key, sub, multi in groups:
            start = starts.get(key, _Start())
            if start.finished:
                results.append(_finished_result(sub))
                continue
            context = _RunnerContext(plan.out, key, sub.sae_ids, fingerprint)
            if multi:
                results.append(
                    _train_multi(sub, model, dataset, keep_initial, context, start.checkpoint, ranks)
                )
            else:
                results.append(
                    _train_single_sites(sub, model, dataset, keep_initial, context, start.checkpoint, ranks)
                )
            if context.stopped is not None and key != groups[-1][0]:
                raise TrainingInterrupted(context.stopped, plan.out, None, sae_ids=sub.sae_ids, finished=True)
            # A finished runner is held by reference cycles (runner, store, trainers): free its
            # SAEs, optimiser states and mixing buffer before the next runner starts.
            gc.collect()
    if ranks is not None and not ranks.is_main:
        return _merge(plan, results)  # rank 0 writes the summary and the release
    return _finish(plan, _merge(plan, results), distributed.job(plan, ranks))


def _join_job(plan: TrainingPlan) -> tuple[TrainingPlan, distributed.Ranks | None]:
    """Under ``torchrun``: check the parallel mode (before any model loads), join the process
    group, and put this rank on its device. A one-process run passes through."""
    ranks = distributed.from_environment()
    if ranks is None:
        return plan, None
    distributed.choose_mode(plan, ranks.world_size)
    device = distributed.init_process_group(ranks, plan.config.device)
    if device != plan.config.device:
        plan = replace(plan, config=replace(plan.config, device=device))
    return plan, ranks


@contextlib.contextmanager
def _fed_as_planned(model: Any, plan: TrainingPlan) -> Iterator[None]:
    """Set the model's convention and split to the plan's for the run (they fix the seqpos_slice)."""
    if not hasattr(model, "fed"):
        yield
        return
    with model.fed(plan.config.convention, plan.split):
        yield


def _train_single_sites(
    plan: TrainingPlan,
    model: Any,
    dataset: Any,
    keep_initial: bool,
    context: _RunnerContext,
    resume_from: Path | None = None,
    ranks: distributed.Ranks | None = None,
    **extra: Any,
) -> TrainingResult:
    """One ``LanguageModelSAETrainingRunner`` per site of ``plan`` (one site when ``context`` is
    its checkpoint key), continuing from ``resume_from`` if given; under ``torchrun`` each is a
    data-parallel replica (rank 0 saves and evaluates)."""
    runner_class = _runner_classes()[0]
    paths, evals, history, initial = {}, {}, [], {}
    for site in plan.sites:
        runner_cfg = build_runner_config(plan, site, **extra)
        runner_cfg.resume_from_checkpoint = str(resume_from) if resume_from is not None else None
        with _quiet_runner_setup():
            runner = runner_class(runner_cfg, override_dataset=dataset, override_model=model)
        runner.t5gemma2 = context
        recorder = EvalRecorder(
            model, runner.activations_store, plan.config.n_eval_batches, plan.config.eval_batch_size_prompts
        )
        runner.evaluator = recorder  # type: ignore[assignment]
        if keep_initial:
            initial[site.friendly] = copy.deepcopy(runner.sae).cpu()
        if ranks is not None:
            distributed.prepare_single_runner(runner, replace(plan, sites=(site,)), ranks)
        with _quiet_runner_setup():
            runner.run()
        paths[site.friendly] = Path(runner_cfg.output_path)  # type: ignore[arg-type]
        if ranks is not None and not ranks.is_main:
            continue
        evals[site.friendly] = _final_eval(recorder, paths[site.friendly], plan, context.fingerprint)
        history.extend({site.friendly: h} for h in recorder.history)
    return TrainingResult(plan.out, paths, {}, evals, history, initial)


def _train_multi(
    plan: TrainingPlan,
    model: Any,
    dataset: Any,
    keep_initial: bool,
    context: _RunnerContext,
    resume_from: Path | None = None,
    ranks: distributed.Ranks | None = None,
) -> TrainingResult:
    runner_cfg = build_multi_runner_config(plan)
    runner_cfg.resume_from_checkpoint = str(resume_from) if resume_from is not None else None
    with _quiet_runner_setup():
        runner = _runner_classes()[1](runner_cfg, override_dataset=dataset, override_model=model)
    runner.t5gemma2 = context
    _cast_multi_hook_activations(runner.activations_store)
    recorder = MultiEvalRecorder(
        model, runner.activations_store, plan.config.n_eval_batches, plan.config.eval_batch_size_prompts
    )
    runner.evaluator = recorder  # type: ignore[assignment]
    initial = {k: copy.deepcopy(v).cpu() for k, v in runner.saes.items()} if keep_initial else {}
    whole_cfg, replica = (
        distributed.prepare_runner(runner, plan, ranks) if ranks is not None else (None, None)
    )
    with _quiet_runner_setup(), _lean_multi_sae_steps(replica):
        runner.run()
    paths = {s.friendly: plan.out / s.friendly for s in plan.sites}
    distributed.barrier()  # every owner has saved its SAEs
    if ranks is not None:
        if not ranks.is_main:
            return TrainingResult(plan.out, paths, {}, {}, [], initial)
        if whole_cfg is not None:  # module-parallel: each rank's runner wrote its own share
            distributed.write_runner_cfg(whole_cfg, plan.out)
    evals = {k: _final_eval(recorder, p, plan, context.fingerprint) for k, p in paths.items()}
    return TrainingResult(plan.out, paths, {}, evals, list(recorder.history), initial)


def _one_process_only() -> None:
    """The activation-cache path runs in one process; under ``torchrun`` it is refused."""
    if distributed.from_environment() is not None:
        raise ValueError(
            "an activation cache (cache_dir) is not distributed: run it in one process; under torchrun, train from "
            "the model's activations (docs/training.md, 'Across processes and machines', says why)"
        )


def _check_cache_dir(plan: TrainingPlan, cache_dir: Path) -> None:
    taken = [
        s.friendly
        for s in plan.sites
        if (cache_dir / s.friendly).is_dir() and any((cache_dir / s.friendly).iterdir())
    ]
    if taken:
        raise FileExistsError(
            f"Activation cache {str(cache_dir)!r} already holds {taken}; choose another folder"
        )


def cache_activations(
    cfg: TrainConfig | TrainingPlan,
    cache_dir: str | Path,
    model: HookedRootModule | None = None,
    dataset: Any = None,
) -> dict[str, Path]:
    """Cache activations of every hook of ``cfg`` to disk with SAELens' ``CacheActivationsRunner``.

    Each hook gets ``<cache_dir>/<sae id>``, a Hugging Face dataset (``datasets.load_from_disk``)
    with one column of ``[context_size, d_in]`` activations named by the hook and one of
    token ids; ``cfg.training_tokens`` tokens each, its rows (one per document row) saved in a
    random order (``cfg.seed``), so that training from it mixes documents. Returns SAE id -> folder.
    """
    plan = cfg if isinstance(cfg, TrainingPlan) else plan_training(cfg)
    _one_process_only()
    cache_dir = Path(cache_dir)
    _check_cache_dir(plan, cache_dir)
    dataset = dataset if dataset is not None else load_training_dataset(plan)
    model = model if model is not None else _load_model(plan)
    _check_model(model, plan)
    runner_cls = _cache_runner_class()
    out: dict[str, Path] = {}
    with _fed_as_planned(model, plan):
        for site in plan.sites:
            cache_cfg = build_cache_config(plan, site, cache_dir / site.friendly)
            with _quiet_runner_setup():
                runner_cls(cache_cfg, model, override_dataset=dataset).run()
            out[site.friendly] = cache_dir / site.friendly
    return out


def train_from_cache(
    cfg: TrainConfig | TrainingPlan,
    cache_dir: str | Path,
    model: HookedRootModule | None = None,
    dataset: Any = None,
    keep_initial: bool = False,
) -> TrainingResult:
    """Train from activations cached by :func:`cache_activations` (``use_cached_activations=True``).

    Training reads the cache, not the model; the model and the dataset still serve the
    in-training and final evals (CE-loss and KL scores need forward passes).
    """
    plan = cfg if isinstance(cfg, TrainingPlan) else plan_training(cfg)
    _one_process_only()
    _no_resume_from_cache(plan)
    cache_dir = Path(cache_dir)
    missing = [s.friendly for s in plan.sites if not (cache_dir / s.friendly / "dataset_info.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"Activation cache {str(cache_dir)!r} has no cached activations for {missing}"
        )
    with _writing(plan.out):
        _prepare_out(plan)
        dataset = dataset if dataset is not None else load_training_dataset(plan)
        model = model if model is not None else _load_model(plan)
        _check_model(model, plan)
        torch.manual_seed(plan.config.seed)
        fingerprint = run_fingerprint(plan)
        results = []
        with _wandb_mode(plan.config.wandb), _fed_as_planned(model, plan):
            for site in plan.sites:
                sub = replace(plan, sites=(site,))
                context = _RunnerContext(plan.out, site.friendly, [site.friendly], fingerprint)
                results.append(
                    _train_single_sites(
                        sub,
                        model,
                        dataset,
                        keep_initial,
                        context,
                        use_cached_activations=True,
                        cached_activations_path=str(cache_dir / site.friendly),
                    )  # fmt: skip
                )
        return _finish(plan, _merge(plan, results))


def _no_resume_from_cache(plan: TrainingPlan) -> None:
    if plan.config.resume:
        raise ValueError(
            "resume continues runs that read the model's activations; a run from an activation cache "
            "(cache_dir) cannot resume: run it again without --resume --cache-dir, or without --cache-dir"
        )


# -------------------------------------------------------------------- one-call run


def run_training(cfg: TrainConfig, cache_dir: str | Path | None = None, echo: Any = print) -> TrainingResult:
    """Check, train (optionally via an activation cache) and report: what ``sae-lens-t5gemma train`` does.

    Args:
        cfg: the run.
        cache_dir: if given, first cache every hook's activations there with
            ``CacheActivationsRunner``, then train from the cache.
        echo: where progress lines go.
    """
    plan = plan_training(cfg)  # every input error surfaces here, before any model loads
    if cache_dir is not None:
        _no_resume_from_cache(plan)
        _check_cache_dir(plan, Path(cache_dir))
        _one_process_only()
    plan, ranks = _join_job(plan)  # under torchrun: the parallel mode checked, then the process group
    main = ranks is None or ranks.is_main
    with _writing_on_main(plan.out, ranks):  # a second run into the same out fails here, at once
        starts = _starts(plan, ranks)
        if main:
            echo(describe_plan(plan, cached=cache_dir is not None))
            if ranks is not None:
                echo(distributed.describe(plan, ranks.world_size, distributed.job(plan, ranks)["parallel"]))
            for key, st in starts.items():
                echo(
                    f"resume   {key}: "
                    + ("finished, kept" if st.finished else f"from {st.checkpoint or 'the start'}")
                )
        if ranks is not None:  # each rank loads the model on its own device and reads its shard
            result = _train(plan, ranks, starts, None, None, False)
        elif cache_dir is not None:
            model, dataset = _load_model(plan), load_training_dataset(plan)
            paths = cache_activations(plan, cache_dir, model=model, dataset=dataset)
            echo(f"cached activations: {', '.join(str(p) for p in paths.values())}")
            result = train_from_cache(plan, cache_dir, model=model, dataset=load_training_dataset(plan))
        else:
            result = _train(plan, None, starts, _load_model(plan), load_training_dataset(plan), False)
    if main:
        echo(format_report(result))
    return result


# ------------------------------------------------------------------- measurements
