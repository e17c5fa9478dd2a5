"""Train SAEs on T5Gemma 2 with SAELens' own runners.

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
Rows hold one document each (``disable_concat_sequences``). This module builds the runner configs from a checked ``TrainingPlan`` (``training_plan.py``:
model, hooks by friendly name with wildcards, dataset, architecture, width, sparsity, token
budget, all checked before any model is loaded), runs them, and writes SAELens-native
folders that ``SAE.load_from_disk`` reads, plus a release YAML so that
``SAE.from_pretrained(release=..., sae_id=...)`` loads them by name. The config API is
re-exported here, so ``from sae_lens_t5gemma.training.runner import TrainConfig, train`` is enough.

Evals use :func:`~sae_lens_t5gemma.analysis.evaluation.evaluate_sae` (covered positions only; CE and
KL on the continuation under ``prefix_lm``) rather than SAELens' ``run_evals``, which ignores
``seqpos_slice`` and would average the zero rows of uncovered positions into every metric.

A run holds the write lock on ``out`` (:func:`sae_lens_t5gemma.outputs.output_lock`). SIGINT
(Ctrl-C) or SIGTERM stops training between two steps and saves a SAELens checkpoint to
``out/checkpoints/<runner>/<samples seen>`` (SAELens 6.54's single-SAE runner would write it
into a folder it never creates, and without the SAE); ``TrainConfig.resume`` continues from the
latest one with SAELens' ``resume_from_checkpoint``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.model.dtypes import dtype_name, to_sae
from sae_lens_t5gemma.outputs import atomic_write, output_lock
from sae_lens_t5gemma.model.sites import Site

if TYPE_CHECKING:
    from sae_lens import SAE, TrainingSAE, TrainingSAEConfig
    from transformer_lens.hook_points import HookedRootModule

# Written into every trained SAE's metadata: how the hooked model feeds T5Gemma 2, so a
# reader of the SAE knows which activations it was trained on.
from sae_lens_t5gemma.training.plan import (  # noqa: F401 (re-exported: the training API in one import)
    ARCHITECTURES,
    INPUT_CONVENTION_KEY,
    PRESETS,
    ModelDims,
    TrainConfig,
    TrainingPlan,
    _check_release_name,
    _matryoshka_widths,
    expand_hooks,
    load_training_dataset,
    plan_training,
    preset_mindchain,
    preset_recommended,
    read_model_dims,
    resolve_dataset_files,
    write_text_dataset,
)

# ----------------------------------------------------------------------- SAE configs


def sae_metadata(site: Site, model_name: str, convention: dict[str, Any] | None = None) -> dict[str, Any]:
    """The T5Gemma 2 metadata every trained SAE carries (beyond SAELens' own fields).

    ``convention`` is :meth:`TrainingPlan.convention_metadata`: the convention, the split and
    the positions the SAE trained on.
    """
    return {
        "model_name": model_name,
        "model_class_name": "HookedT5Gemma2",
        "hook_name": site.hook_name,
        "hf_hook_name": f"{site.hf_module}.{site.kind.hf_io}",
        "t5gemma2_site": site.friendly,
        **(convention or {}),
    }


def build_sae_config(
    cfg: TrainConfig, d_in: int, site: Site, model_name: str, convention: dict[str, Any] | None = None
) -> TrainingSAEConfig:
    """The SAELens ``TrainingSAEConfig`` for one site, per the architecture and sparsity."""
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    warm = int(steps * cfg.sparsity_warm_up_fraction)
    common: dict[str, Any] = dict(
        d_in=d_in, d_sae=cfg.d_sae, dtype=cfg.dtype, device=cfg.device,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input, normalize_activations=cfg.normalize_activations,
        metadata=SAEMetadata(**sae_metadata(site, model_name, convention)),
    )  # fmt: skip
    arch = cfg.architecture
    if arch == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=cfg.l1, l1_warm_up_steps=warm, **common)  # type: ignore[arg-type]
    if arch == "topk":
        if cfg.sparse_decode:
            # SAELens' sparse backward cannot run its default decoder-norm rescaling (aten::view
            # on a sparse tensor, torch 2.13), so sparse decode trains without it.
            return TopKTrainingSAEConfig(
                k=int(cfg.k),  # type: ignore[arg-type]
                use_sparse_activations=True,
                rescale_acts_by_decoder_norm=False,
                **common,
            )
        return TopKTrainingSAEConfig(k=int(cfg.k), **common)  # type: ignore[arg-type]
    if arch == "batchtopk":
        return BatchTopKTrainingSAEConfig(k=float(cfg.k), **common)  # type: ignore[arg-type]
    if arch == "matryoshka":
        return MatryoshkaBatchTopKTrainingSAEConfig(
            k=float(cfg.k),  # type: ignore[arg-type]
            matryoshka_widths=_matryoshka_widths(cfg),
            **common,
        )
    # jumprelu: a target L0 means Gemma Scope 2's quadratic loss around it.
    if cfg.k is not None:
        return JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic", target_l0=float(cfg.k),
            l0_coefficient=cfg.l1 if cfg.l1 is not None else 1.0, l0_warm_up_steps=warm, **common,
        )  # fmt: skip
    return JumpReLUTrainingSAEConfig(l0_coefficient=cfg.l1, l0_warm_up_steps=warm, **common)  # type: ignore[arg-type]


def _logger_config(cfg: TrainConfig, run_name: str):
    from sae_lens import LoggingConfig

    # SAELens evals every wandb_log_frequency x eval_every_n_wandb_logs steps: pick a log
    # frequency (at most 10) that divides the eval period, so evals land exactly on it.
    n = cfg.eval_every_n_steps
    log_every = next(d for d in range(min(10, n), 0, -1) if n % d == 0)
    return LoggingConfig(
        # SAELens runs its in-training evals only inside its wandb branch. With wandb off we
        # keep that branch on against a disabled wandb run (see _wandb_mode), so the evals
        # still run; nothing is sent or written.
        log_to_wandb=True,
        wandb_project=cfg.wandb_project,
        run_name=run_name,
        wandb_log_frequency=log_every,
        eval_every_n_wandb_logs=n // log_every,
        log_weights_to_wandb=cfg.wandb,
    )


def _runner_common(plan: TrainingPlan, run_name: str, sites: Sequence[Site]) -> dict[str, Any]:
    """The runner-config fields that single- and multi-hook runs (of one stack) share."""
    cfg = plan.config
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    sizing = plan.store_sizing(sites)
    return dict(
        model_name=plan.dims.name,
        model_class_name="HookedT5Gemma2",
        dataset_path=plan.dataset_label,
        streaming=cfg.streaming,
        context_size=cfg.context_size,
        n_batches_in_buffer=sizing.n_batches_in_buffer,
        training_tokens=cfg.training_tokens,
        store_batch_size_prompts=sizing.store_batch_size_prompts,
        autocast=cfg.autocast,
        autocast_lm=cfg.autocast_lm,
        device=cfg.device,
        seed=cfg.seed,
        dtype=cfg.dtype,
        prepend_bos=True,
        exclude_special_tokens=cfg.exclude_special_tokens,
        n_eval_batches=cfg.n_eval_batches,
        eval_batch_size_prompts=cfg.eval_batch_size_prompts,
        logger=_logger_config(cfg, run_name),
        checkpoint_path=str(plan.out / CHECKPOINTS),  # SAELens appends a random id: _pin_checkpoints
        n_checkpoints=cfg.n_checkpoints,
        lr=cfg.lr,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=int(steps * cfg.lr_decay_fraction),
        train_batch_size_tokens=cfg.train_batch_size_tokens,
        seqpos_slice=plan.seqpos_slice(sites[0].stack),
        disable_concat_sequences=cfg.disable_concat_sequences,
    )


def build_runner_config(plan: TrainingPlan, site: Site, output_path: str | Path | None = None, **extra: Any):
    """SAELens' ``LanguageModelSAERunnerConfig`` for one site of a plan.

    ``extra`` goes to the config as is (e.g. ``use_cached_activations=True``).
    """
    from sae_lens import LanguageModelSAERunnerConfig

    cfg = plan.config
    out = Path(output_path) if output_path is not None else plan.out / site.friendly
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=build_sae_config(
            cfg, plan.dims.d_in(site), site, plan.dims.name, plan.convention_metadata(site.stack)
        ),
        hook_name=site.hook_name,
        is_dataset_tokenized=False,
        n_batches_for_norm_estimate=min(cfg.n_batches_for_norm_estimate, max(1, plan.total_steps)),
        output_path=str(out),
        verbose=False,
        **_runner_common(plan, f"{site.friendly}-{cfg.architecture}-{cfg.d_sae}", (site,)),
        **extra,
    )
    return _pin_checkpoints(runner_cfg, plan, site.friendly)


def build_multi_runner_config(plan: TrainingPlan):
    """SAELens' ``MultiSAETrainingRunnerConfig``: one SAE per site, named by SAE id (one stack only)."""
    from sae_lens import MultiSAETrainingRunnerConfig

    cfg = plan.config
    stacks = {s.stack for s in plan.sites}
    if len(stacks) != 1:
        raise ValueError(
            f"A multi-hook runner serves one stack (one seqpos_slice); got sites on {sorted(stacks)}"
        )
    stack = stacks.pop()
    saes = {
        s.friendly: build_sae_config(
            cfg, plan.dims.d_in(s), s, plan.dims.name, plan.convention_metadata(stack)
        )
        for s in plan.sites
    }
    # Norm estimation keeps every batch of every hook in memory at once: the sizing caps it
    # by what max_memory leaves after the store (a mean norm over one 4096-token batch is
    # already within a fraction of a percent).
    runner_cfg = MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names={s.friendly: s.hook_name for s in plan.sites},
        n_batches_for_norm_estimate=plan.store_sizing().n_batches_for_norm_estimate,
        output_path=str(plan.out),
        **_runner_common(plan, f"multi-{len(saes)}-{cfg.architecture}-{cfg.d_sae}", plan.sites),
    )
    return _pin_checkpoints(runner_cfg, plan, _multi_key(stack))


def _multi_key(stack: str) -> str:
    return f"multi-{stack}"


def _pin_checkpoints(runner_cfg: Any, plan: TrainingPlan, key: str) -> Any:
    """Checkpoints of one runner go to ``out/checkpoints/<key>`` (an SAE id, or ``multi-<stack>``).

    SAELens' ``__post_init__`` appends a random id to ``checkpoint_path``, so a later run could
    not tell which folder is its own; the trainer reads the path only when ``run`` starts.
    """
    runner_cfg.checkpoint_path = str(checkpoint_folder(plan.out, key))
    return runner_cfg


# ----------------------------------------------------------------------------- evals


@dataclass
class EvalRecorder:
    """The in-training eval: :func:`~sae_lens_t5gemma.analysis.evaluation.evaluate_sae` on the store's tokens.

    Covered positions only, CE-loss and KL scores on the continuation (``prefix_lm``); each
    result is kept in ``history``. SAELens' ``run_evals`` is not used: it ignores
    ``seqpos_slice`` and would average uncovered zero rows into every metric.
    """

    model: HookedRootModule
    activations_store: Any
    n_eval_batches: int
    eval_batch_size_prompts: int | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self, sae: SAE[Any], scaler: Any = None) -> dict[str, Any]:
        """One eval of ``sae``: a flat dict of metrics (see ``evaluate_sae``)."""
        from sae_lens_t5gemma.analysis.evaluation import evaluate_sae

        store = self.activations_store
        batches = [store.get_batch_tokens(self.eval_batch_size_prompts) for _ in range(self.n_eval_batches)]
        was_training = sae.training
        sae.eval()
        kwargs = dict(
            exclude_special_tokens=store.exclude_special_tokens is not None, activation_scaler=scaler
        )
        # An encoder-only run lets the encoder read whole rows (prefix_len = n). Reconstruction
        # metrics are measured on that input, the one the SAE trained on; CE/KL need a
        # continuation to score, so they come from a second eval with the default split (n // 2).
        full_row = getattr(self.model, "prefix_len", None) == store.context_size
        try:
            if not full_row:
                return evaluate_sae(self.model, sae, batches, **kwargs)
            recon = evaluate_sae(self.model, sae, batches, compute_downstream=False, **kwargs)
            with self.model.fed(prefix_len=None):
                downstream = evaluate_sae(self.model, sae, batches, **kwargs)
            return {**downstream, **recon}
        finally:
            sae.train(was_training)

    def __call__(self, sae: SAE[Any], data_provider: Any, activation_scaler: Any) -> dict[str, Any]:
        """SAELens' single-SAE ``Evaluator`` signature."""
        with _paused(data_provider):
            metrics = self.evaluate(sae, activation_scaler)
        self.history.append(copy.deepcopy(metrics))
        return metrics


class MultiEvalRecorder(EvalRecorder):
    """:class:`EvalRecorder` for ``MultiSAETrainingRunner``'s evaluator signature.

    Returns keys prefixed by SAE name, as SAELens' ``MultiSAEEvaluator`` does (for wandb);
    ``history`` entries are ``{sae name: metrics}``.
    """

    def __call__(  # type: ignore[override]
        self,
        saes: dict[str, SAE[Any]],
        data_provider: Any,
        activation_scalers: dict[str, Any],
        hook_names: Any = None,
    ) -> dict[str, Any]:
        with _paused(data_provider):
            per_sae = {name: self.evaluate(sae, activation_scalers[name]) for name, sae in saes.items()}
        self.history.append(copy.deepcopy(per_sae))
        return {f"{name}/{k}": v for name, metrics in per_sae.items() for k, v in metrics.items()}


def _paused(data_provider: Any) -> AbstractContextManager[None]:
    from sae_lens.training.prefetch import PrefetchingIterator

    # Evals pull tokens from the same store as a prefetch thread would: pause it.
    inner = data_provider.inner if isinstance(data_provider, _StopBetweenSteps) else data_provider
    return inner.paused() if isinstance(inner, PrefetchingIterator) else nullcontext()


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"model_performance_preservation": {"ce_loss_score": x}}`` -> ``{"model_performance_preservation/ce_loss_score": x}``."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, key + "/"))
        else:
            flat[key] = v
    return flat


@contextlib.contextmanager
def _wandb_mode(enabled: bool) -> Iterator[None]:
    """With wandb off, make SAELens' ``wandb.init`` a disabled run (no network, no files)."""
    if enabled:
        yield
        return
    saved = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = saved


class _DropOverrideNotices(logging.Filter):
    """SAELens warns that ``override_model``/``override_dataset`` make a run irreproducible
    from its config alone; here overriding is the design (the config records both), so the
    notices are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not msg.startswith(
            ("You just passed in a", "override_dataset overrides", "override_model overrides")
        )


@contextlib.contextmanager
def _quiet_runner_setup() -> Iterator[None]:
    sae_lens_logger = logging.getLogger("sae_lens")
    notice_filter = _DropOverrideNotices()
    sae_lens_logger.addFilter(notice_filter)
    try:
        with warnings.catch_warnings():
            # Text is tokenised on the fly by design; and SAELens compares a dataset's rows
            # with the token budget, which says nothing when rows are sentences.
            warnings.filterwarnings("ignore", message=".*(not tokenized|fewer samples).*")
            yield
    finally:
        sae_lens_logger.removeFilter(notice_filter)


# ------------------------------------------------------------------------------ train


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

CHECKPOINTS = "checkpoints"
"""The folder in ``out`` that holds SAELens' checkpoints, one subfolder per runner."""
CHECKPOINT_RECORD = "t5gemma2_checkpoint.json"
"""Written last into a checkpoint folder, whole or not at all: a folder without it is incomplete.
It records the samples seen and a fingerprint of the run (settings and data) for ``resume``."""
FINISHED = "eval_metrics.json"
"""Written last into a finished SAE folder (after SAELens' files): ``resume`` keeps such SAEs."""
RUN_RECORD = "t5gemma2_run.json"
"""Beside a finished SAE: the fingerprint of the run that trained it, which ``resume`` compares."""
# TrainConfig fields that do not change what a run computes: a resumed run may change them.
_RUN_ONLY_FIELDS = frozenset(
    {"out", "resume", "overwrite", "n_checkpoints", "wandb", "wandb_project", "device", "release_name"}
)


def checkpoint_folder(out: str | Path, key: str) -> Path:
    """Where the checkpoints of one runner go: ``out/checkpoints/<key>/<samples seen>``."""
    return Path(out) / CHECKPOINTS / key


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped training; raised after the progress was saved.

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        checkpoint: the SAELens checkpoint folder written (None when training stopped before
            its first step, or a second signal stopped it at once).
        n_training_samples: activations trained on, of ``total``, by the interrupted runner.
        sae_ids: the SAEs of the interrupted runner.
        finished: the signal came in the runner's last step: it finished, and the run
            stopped before the next runner.
    """

    def __init__(
        self,
        signum: int,
        out: Path,
        checkpoint: Path | None,
        n_training_samples: int = 0,
        total: int = 0,
        sae_ids: Sequence[str] = (),
        finished: bool = False,
    ):
        self.signum, self.out, self.checkpoint = int(signum), Path(out), checkpoint
        self.n_training_samples, self.total, self.sae_ids = n_training_samples, total, list(sae_ids)
        self.finished = finished
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line: what was saved and how to go on."""
        who = ", ".join(self.sae_ids) or "training"
        if self.finished:
            return (
                f"{who} finished as the signal came, and the run stopped before its next runner; the finished SAEs "
                f"are in {self.out}: the same command with --resume continues with the rest."
            )
        if self.checkpoint is not None:
            return (
                f"{who} stopped after {self.n_training_samples:,} of {self.total:,} tokens; checkpoint "
                f"{self.checkpoint} (SAEs finished earlier stay in {self.out}). The same command with --resume "
                "(TrainConfig.resume=True) continues from it."
            )
        return (
            f"{who} stopped before a checkpoint could be saved (before its first step, or on a second signal); "
            f"SAEs finished earlier and earlier checkpoints stay in {self.out}: the same command with --resume "
            "continues from them, if any."
        )


class _Stop(BaseException):
    """A signal that stops training. ``clean``: raised between two steps, so the state is whole."""

    def __init__(self, signum: int, clean: bool):
        super().__init__(signum)
        self.signum, self.clean = signum, clean


class _StopBetweenSteps:
    """A trainer's data provider that raises a pending stop before it hands out the next batch.

    SAELens' trainers pull one batch at the start of each step, after the previous step, its
    logging and its checkpoint are complete: a stop raised there leaves the SAEs, the optimiser
    and the counters of the same step.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.pending: int | None = None

    def __iter__(self) -> _StopBetweenSteps:
        return self

    def __next__(self) -> Any:
        if self.pending is not None:
            raise _Stop(self.pending, clean=True)
        return next(self.inner)


@contextlib.contextmanager
def _signals_handled(handler: Callable[[int, Any], None] | int) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` for the block (main thread only); the handlers
    before are restored after (SAELens' runners leave theirs installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _fit_or_checkpoint(runner: Any, trainer: Any) -> Any:
    """``trainer.fit()``; on SIGINT or SIGTERM, stop between two steps, save a checkpoint, and
    raise :class:`TrainingInterrupted`.

    SAELens 6.54's single-SAE runner saves on interruption with the runner's own
    ``save_checkpoint`` (the store's position and the runner config only) into a folder it never
    creates, so the save fails and nothing is kept. The trainer's ``save_checkpoint`` is the
    whole checkpoint (SAE, optimiser, counters, then the runner's files), as SAELens'
    multi-SAE runner uses it. A first signal waits for the step to finish (a stop inside
    Adam's update would save half-updated weights); a second one, or one before the first
    step, stops at once without saving.
    """
    provider = trainer.data_provider = _StopBetweenSteps(trainer.data_provider)
    context: _RunnerContext = runner.t5gemma2

    def on_signal(signum: int, frame: Any) -> None:
        if provider.pending is not None or trainer.n_training_samples == 0:
            raise _Stop(signum, clean=False)
        provider.pending = signum
        print(  # on a line of its own, below SAELens' progress bar
            f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(signal again to stop at once, without it)",
            file=sys.stderr,
        )

    with _signals_handled(on_signal):
        try:
            fitted = trainer.fit()
            # A signal during the last step: the runner finishes (its SAEs are saved next), and
            # train stops before the next runner (see train).
            context.stopped = provider.pending
            return fitted
        except _Stop as stop:
            saved = None
            if stop.clean:
                with _signals_handled(signal.SIG_IGN):  # the save is not cut short
                    trainer.save_checkpoint(checkpoint_name=str(trainer.n_training_samples))
                saved = checkpoint_folder(context.out, context.key) / str(trainer.n_training_samples)
            raise TrainingInterrupted(
                stop.signum, context.out, saved, trainer.n_training_samples, trainer.cfg.total_training_samples,
                context.sae_ids,
            ) from None  # fmt: skip


@dataclass
class _RunnerContext:
    """What one runner's checkpoints record (set on the runner as ``t5gemma2``)."""

    out: Path
    key: str
    sae_ids: list[str]
    fingerprint: dict[str, Any]
    stopped: int | None = None
    """A signal that came during the runner's last step (it finished; the run stops after it)."""


def _record_checkpoint(runner: Any, checkpoint_path: Path | None) -> None:
    """Called by SAELens last in every checkpoint save: mark the folder complete."""
    if checkpoint_path is None:
        return
    context: _RunnerContext = runner.t5gemma2
    name = Path(checkpoint_path).name
    record = {
        "written_by": "sae_lens_t5gemma.training.runner",
        "n_training_samples": int(name) if name.isdigit() else None,
        "sae_ids": context.sae_ids,
        "fingerprint": context.fingerprint,
    }
    atomic_write(Path(checkpoint_path) / CHECKPOINT_RECORD, json.dumps(record, indent=1))


@functools.cache
def _runner_classes() -> tuple[type, type]:
    """SAELens' two training runners, with the interruption save of :func:`_fit_or_checkpoint`
    and a :data:`CHECKPOINT_RECORD` written last into every checkpoint.

    The overridden methods are SAELens 6.54's: ``run_trainer_with_interruption_handling`` and
    ``save_checkpoint`` (the trainer's ``save_checkpoint_fn``) of the single-SAE runner,
    ``_run_with_interruption_handling`` and ``_save_runner_checkpoint_files`` of the multi-SAE one.
    """
    from sae_lens import LanguageModelSAETrainingRunner, MultiSAETrainingRunner

    class Runner(LanguageModelSAETrainingRunner):  # type: ignore[misc]
        t5gemma2: _RunnerContext

        def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
            return _fit_or_checkpoint(self, trainer)

        def save_checkpoint(self, checkpoint_path: Path | None) -> None:
            super().save_checkpoint(checkpoint_path)
            _record_checkpoint(self, checkpoint_path)

    class MultiRunner(MultiSAETrainingRunner):  # type: ignore[misc]
        t5gemma2: _RunnerContext

        def _run_with_interruption_handling(self, trainer: Any) -> Any:
            return _fit_or_checkpoint(self, trainer)

        def _save_runner_checkpoint_files(self, checkpoint_path: Path | None) -> None:
            super()._save_runner_checkpoint_files(checkpoint_path)
            _record_checkpoint(self, checkpoint_path)

    return Runner, MultiRunner


_HELD_LOCKS: set[Path] = set()


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Hold the write lock on ``out`` (``outputs.output_lock``) for the block; re-entrant."""
    key = out.resolve()
    if key in _HELD_LOCKS:
        yield
        return
    with output_lock(out, "train"):
        _HELD_LOCKS.add(key)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(key)


def _runner_groups(plan: TrainingPlan) -> list[tuple[str, TrainingPlan, bool]]:
    """``(checkpoint key, the plan of one runner, multi-hook)``, in the order :func:`train` runs them."""
    groups = []
    for stack_plan in _per_stack(plan):
        if len(stack_plan.sites) > 1 and plan.config.multi_hook:
            groups.append((_multi_key(stack_plan.sites[0].stack), stack_plan, True))
        else:
            groups.extend((s.friendly, replace(stack_plan, sites=(s,)), False) for s in stack_plan.sites)
    return groups


_SHA256: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def run_fingerprint(plan: TrainingPlan) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: every setting that changes what
    is computed, and the dataset's contents (sha256 of each local file, else its name and split)."""
    cfg = plan.config
    settings = {k: v for k, v in cfg.to_dict().items() if k not in _RUN_ONLY_FIELDS}
    data = [_sha256(f) for f in plan.dataset_files] or [f"{cfg.dataset}:{cfg.dataset_split}"]
    return {"settings": json.loads(json.dumps(settings, default=str)), "dataset": data}


def _fingerprint_differences(saved: Any, now: dict[str, Any]) -> str:
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        return "it records no settings"
    diffs = [
        f"{k} {saved['settings'].get(k)!r} there, {v!r} here"
        for k, v in now["settings"].items()
        if saved["settings"].get(k) != v
    ]
    if saved.get("dataset") != now["dataset"]:
        diffs.append("the dataset's contents differ (sha256)")
    return "; ".join(diffs)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint record ({str(e)[:200]})") from e
    n = record.get("n_training_samples") if isinstance(record, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0 or str(n) != path.parent.name:
        raise ValueError(f"{path}: n_training_samples {n!r} does not name its folder {path.parent.name!r}")
    return record


def latest_checkpoint(out: str | Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """The complete checkpoint of runner ``key`` in ``out`` with the most samples seen, and its record.

    Folders without :data:`CHECKPOINT_RECORD` (a save cut short) are passed over.

    Raises:
        ValueError: a record is unreadable or inconsistent with its folder (named).
    """
    folder = checkpoint_folder(out, key)
    found = [
        (p, _read_record(p / CHECKPOINT_RECORD))
        for p in (folder.iterdir() if folder.is_dir() else ())
        if (p / CHECKPOINT_RECORD).is_file()
    ]
    return max(found, key=lambda pr: pr[1]["n_training_samples"], default=None)


def _is_finished(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("cfg.json", "sae_weights.safetensors", FINISHED))


@dataclass(frozen=True)
class _Start:
    """Where one runner starts: done (its SAEs are finished in ``out``), a checkpoint, or afresh."""

    finished: bool = False
    checkpoint: Path | None = None


def _prepare_out(plan: TrainingPlan) -> dict[str, _Start]:
    """Decide where each runner starts (under the lock, before any model loads).

    Without ``resume``, checkpoints of an interrupted run in ``out`` are refused (so that
    nothing is lost) unless ``overwrite``, which removes them. With ``resume``, every
    runner's SAEs must be finished or its latest checkpoint must come from a run with the
    same settings and data.

    Raises:
        FileExistsError: checkpoints of an interrupted run, without resume or overwrite.
        FileNotFoundError: resume with nothing to resume.
        ValueError: resume from a checkpoint of another run (the differences are named).
    """
    cfg, out = plan.config, plan.out
    groups = _runner_groups(plan)
    if not cfg.resume:
        for key, _, _ in groups:
            if cfg.overwrite:
                if checkpoint_folder(out, key).is_dir():
                    shutil.rmtree(checkpoint_folder(out, key))
                continue
            found = latest_checkpoint(out, key)
            if found:
                raise FileExistsError(
                    f"Output folder {str(out)!r} holds a checkpoint of an interrupted run ({found[0]}); pass --resume "
                    "to continue it, overwrite to start over, or choose another --out"
                )
        return {}
    fingerprint = run_fingerprint(plan)
    starts: dict[str, _Start] = {}
    for key, sub, _ in groups:
        if all(_is_finished(out / s.friendly) for s in sub.sites):
            for s in sub.sites:
                run_file = out / s.friendly / RUN_RECORD
                try:
                    saved = json.loads(run_file.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise ValueError(f"--resume: {run_file}: not readable JSON ({str(e)[:200]})") from e
                saved = saved.get("run_fingerprint") if isinstance(saved, dict) else None
                diff = _fingerprint_differences(saved, fingerprint)
                if diff:
                    raise ValueError(
                        f"--resume: SAE {str(out / s.friendly)!r} was trained by another run: {diff}"
                    )
            starts[key] = _Start(finished=True)
            continue
        found = latest_checkpoint(out, key)
        if found is not None:
            path, record = found
            diff = _fingerprint_differences(record.get("fingerprint"), fingerprint)
            if diff:
                raise ValueError(
                    f"--resume: checkpoint {path} comes from a run with other settings or data: {diff}"
                )
        starts[key] = _Start(checkpoint=found[0] if found else None)
    if not any(st.finished or st.checkpoint for st in starts.values()):
        raise FileNotFoundError(
            f"--resume: {str(out)!r} holds no finished SAE and no checkpoint under {str(out / CHECKPOINTS)!r} "
            "for this run; run without --resume"
        )
    return starts


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


def _cast_multi_hook_activations(store: Any) -> None:
    """Make the multi-hook store hand SAELens activations in the store's dtype.

    SAELens' single-hook ``get_activations`` copies into a float32 tensor, but
    ``get_multi_hook_activations`` passes the model's dtype through; a bfloat16 model would
    then feed bfloat16 rows (with bfloat16 rounding in the mixing buffer) to float32 SAEs.
    """
    harvest = store.get_multi_hook_activations

    def cast(batch_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {h: t.to(store.dtype) for h, t in harvest(batch_tokens).items()}

    store.get_multi_hook_activations = cast


_EMPTY = torch.empty(0)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 2**20
"""Allocations from this size up are mapped and unmapped on their own during training (glibc)."""


def _return_freed_memory_to_the_os() -> bool:
    """Make glibc give freed activation buffers back to the OS at once (Linux/glibc; process-wide).

    glibc serves allocations below a threshold that it raises at run time, up to 32 MiB,
    from its heap, and a heap hole is returned to the OS only if nothing live lies above
    it. A training run interleaves long-lived 10 MiB tensors (gradients, Adam moments)
    with transient ones of the same size (per-hook batches, per-forward copies), so freed
    memory stays resident: 0.56 GiB above the live tensors of an 18-hook runner (SAELens'
    path at the real widths, fed by a stand-in for the model's forward), and the package's
    store estimate could not hold; with the setting, ``benchmarks/bench_training.py``
    (worker ``mem36``) measured the estimate exactly. A fixed 1 MiB threshold maps every larger tensor separately. The cost is
    a fresh mapping (page faults) per such allocation, small next to an SAE step.

    Returns:
        Whether the setting was applied (False off glibc).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


@contextlib.contextmanager
def _lean_multi_sae_steps() -> Iterator[None]:
    """Make SAELens' multi-SAE trainer drop each SAE's step tensors as soon as it has stepped.

    ``MultiSAETrainer.fit`` keeps every SAE's ``TrainStepOutput`` until all SAEs have
    stepped (for the progress bar and wandb), and each holds the step's ``sae_in``,
    ``sae_out``, ``feature_acts`` and ``hidden_pre``: 2 x batch x d_sae floats and more per
    SAE. With 18 hooks at d_sae 4096 that was 2.6 GiB alive at once (measured per phase, as
    ``benchmarks/bench_training.py`` does; about 9 GiB at d_sae 16384, computed). The
    progress bar reads only the loss. So each per-SAE ``step`` is wrapped to return the
    output without those tensors; on a wandb logging step the log dict is built first,
    from the full output, and handed to ``_log_train_step`` unchanged.

    SAELens builds the trainer inside ``MultiSAETrainingRunner.run`` with no hook to reach
    it, so this swaps in a subclass for the duration (SAELens 6.54's names; with
    :func:`_runner_classes`, the places this package reaches into SAELens' training internals).
    """
    from sae_lens import multi_sae_training_runner as msr
    from sae_lens.training.sae_trainer import SAETrainer

    base = msr.MultiSAETrainer

    class LeanMultiSAETrainer(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for trainer in self.trainers.values():
                trainer.step = self._lean(trainer)  # type: ignore[method-assign]

        def _lean(self, trainer: Any) -> Any:
            step = trainer.step

            def lean_step(batch: torch.Tensor) -> Any:
                out = step(batch)
                if self._is_logging_step():
                    log = SAETrainer.build_train_step_log_dict(trainer, out, trainer.n_training_samples)
                    trainer.build_train_step_log_dict = lambda output, n_training_samples: {
                        **log,
                        "details/n_training_samples": n_training_samples,
                    }
                return replace(
                    out, sae_in=_EMPTY, sae_out=_EMPTY, feature_acts=_EMPTY, hidden_pre=_EMPTY, metrics={}
                )

            return lean_step

    msr.MultiSAETrainer = LeanMultiSAETrainer
    try:
        yield
    finally:
        msr.MultiSAETrainer = base


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
    with _writing(plan.out):
        starts = _prepare_out(plan)
        dataset = dataset if dataset is not None else load_training_dataset(plan)
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
                train_runner = _train_multi if multi else _train_single_sites
                results.append(train_runner(sub, model, dataset, keep_initial, context, start.checkpoint))
                if context.stopped is not None and key != groups[-1][0]:
                    raise TrainingInterrupted(
                        context.stopped, plan.out, None, sae_ids=sub.sae_ids, finished=True
                    )
                # A finished runner is held by reference cycles (runner, store, trainers): free its
                # SAEs, optimiser states and mixing buffer before the next runner starts.
                gc.collect()
        return _finish(plan, _merge(plan, results))


def _per_stack(plan: TrainingPlan) -> list[TrainingPlan]:
    stacks = dict.fromkeys(s.stack for s in plan.sites)
    return [replace(plan, sites=tuple(s for s in plan.sites if s.stack == st)) for st in stacks]


def _merge(plan: TrainingPlan, results: list[TrainingResult]) -> TrainingResult:
    merged = TrainingResult(plan.out, {}, {}, {}, [], {})
    for r in results:
        merged.paths.update(r.paths)
        merged.eval_metrics.update(r.eval_metrics)
        merged.eval_history.extend(r.eval_history)
        merged.initial_saes.update(r.initial_saes)
    return merged


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
    **extra: Any,
) -> TrainingResult:
    """One ``LanguageModelSAETrainingRunner`` per site of ``plan`` (one site when ``context`` is
    its checkpoint key), continuing from ``resume_from`` if given."""
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
        with _quiet_runner_setup():
            runner.run()
        paths[site.friendly] = Path(runner_cfg.output_path)  # type: ignore[arg-type]
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
    with _quiet_runner_setup(), _lean_multi_sae_steps():
        runner.run()
    paths = {s.friendly: plan.out / s.friendly for s in plan.sites}
    evals = {k: _final_eval(recorder, p, plan, context.fingerprint) for k, p in paths.items()}
    return TrainingResult(plan.out, paths, {}, evals, list(recorder.history), initial)


def eval_feeds(plan: TrainingPlan) -> dict[str, str]:
    """What the model read for each group of eval metrics (the same for both unless the encoder
    trained on whole rows, when CE/KL need a split that training did not use)."""
    if plan.encoder_only and plan.config.convention == "prefix_lm" and plan.config.encoder_reads_full_row:
        return {
            "reconstruction": "the encoder read whole rows, as in training (EV, MSE, L0, dead/dense)",
            "downstream": "prefix_lm with p = n // 2: the encoder read half the row and CE/KL score the "
            "continuation (training never used this split)",
        }
    words = plan.convention_metadata(plan.sites[0].stack)[INPUT_CONVENTION_KEY] if plan.sites else ""
    return {"reconstruction": words, "downstream": words}


def _final_eval(
    recorder: EvalRecorder, path: Path, plan: TrainingPlan, fingerprint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Eval the SAE as saved (normalisation folded in), and store it next to the weights (last:
    the file marks the folder finished), after :data:`RUN_RECORD` (what ``resume`` compares)."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(path, device=plan.config.device)
    metrics = recorder.evaluate(sae)
    record = {
        **metrics,
        "model_dtype": plan.model_dtype,
        "sae_dtype": plan.config.dtype,
        "feeds": eval_feeds(plan),
    }
    if fingerprint is not None:
        atomic_write(path / RUN_RECORD, json.dumps({"run_fingerprint": fingerprint}, indent=1))
    atomic_write(path / FINISHED, json.dumps(record, indent=2, default=float))
    return metrics


def _finish(plan: TrainingPlan, result: TrainingResult) -> TrainingResult:
    from sae_lens import SAE

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
        "note": "Metrics over covered positions only (sae_lens_t5gemma.analysis.evaluation); CE/KL scored on the "
        "continuation under prefix_lm, on a copy task under reconstruct.",
    }
    atomic_write(plan.out / "training_summary.json", json.dumps(summary, indent=2, default=str))
    if plan.config.release_name:
        result.release_yaml = write_release_yaml(plan.out, plan.config.release_name, list(result.paths))
        result.release = register_release(result.release_yaml, replace=plan.config.overwrite)
    return result


# ------------------------------------------------------------------------ cached path


def _cache_runner_class():
    from sae_lens import CacheActivationsRunner
    from sae_lens.cache_activations_runner import _mk_activations_store

    class T5Gemma2CacheActivationsRunner(CacheActivationsRunner):
        """SAELens' ``CacheActivationsRunner`` with a model passed in.

        SAELens' runner has no ``override_model`` and loads its model with ``load_model``,
        which knows only TransformerLens and causal-LM classes. This subclass takes the
        hooked model and otherwise builds exactly what SAELens' ``__init__`` builds; ``run``
        (sharding, consolidation, shuffling) is SAELens' own.
        """

        def __init__(self, cfg: Any, model: Any, override_dataset: Any = None):
            from datasets import Array2D, Features, Sequence, Value

            self.cfg = cfg
            self.model = model
            self.activations_store = _mk_activations_store(model, cfg, override_dataset=override_dataset)
            self.context_size = self._get_sliced_context_size(cfg.context_size, cfg.seqpos_slice)
            self.features = Features(
                {
                    cfg.hook_name: Array2D(shape=(self.context_size, cfg.d_in), dtype=cfg.dtype),
                    "token_ids": Sequence(Value(dtype="int32"), length=self.context_size),
                }
            )

    return T5Gemma2CacheActivationsRunner


def build_cache_config(plan: TrainingPlan, site: Site, cache_dir: str | Path, shard_tokens: int = 2**20):
    """SAELens' ``CacheActivationsRunnerConfig`` for one site (``training_tokens`` of activations)."""
    from sae_lens import CacheActivationsRunnerConfig

    cfg = plan.config
    d_in = plan.dims.d_in(site)
    prompts = plan.store_sizing((site,)).store_batch_size_prompts
    batch_tokens = prompts * cfg.context_size
    bytes_per_token = d_in * torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    # SAELens sizes its shards in GB; pick a whole number of model batches per shard.
    per_shard = max(1, min(cfg.training_tokens, shard_tokens) // batch_tokens) * batch_tokens
    return CacheActivationsRunnerConfig(
        dataset_path=plan.dataset_label,
        model_name=plan.dims.name,
        model_class_name="HookedT5Gemma2",
        model_batch_size=prompts,
        hook_name=site.hook_name,
        d_in=d_in,
        training_tokens=cfg.training_tokens,
        context_size=cfg.context_size,
        new_cached_activations_path=str(cache_dir),
        seed=cfg.seed,
        dtype=cfg.dtype,
        device=cfg.device,
        buffer_size_gb=(per_shard * bytes_per_token + bytes_per_token // 2) / 1e9,
        prepend_bos=True,
        streaming=cfg.streaming,
        seqpos_slice=plan.seqpos_slice(site.stack),
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
    token ids; ``cfg.training_tokens`` tokens each. Returns SAE id -> folder.
    """
    plan = cfg if isinstance(cfg, TrainingPlan) else plan_training(cfg)
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
    for stack_plan in _per_stack(plan) if not cached else []:
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
        rows.append(f"  sae_lens_t5gemma.training.runner.register_release({str(result.release_yaml)!r})")
        rows.append(f"  SAE.from_pretrained(release={result.release!r}, sae_id={first!r})")
    elif first:
        rows.append(f"load: SAE.load_from_disk({str(result.paths[first])!r})")
    return "\n".join(rows)


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
    with _writing(plan.out):  # a second run into the same out fails here, at once
        starts = _prepare_out(plan)
        dataset = load_training_dataset(plan)
        echo(describe_plan(plan, cached=cache_dir is not None))
        for key, st in starts.items():
            echo(
                f"resume   {key}: "
                + ("finished, kept" if st.finished else f"from {st.checkpoint or 'the start'}")
            )
        model = _load_model(plan)
        if cache_dir is not None:
            paths = cache_activations(plan, cache_dir, model=model, dataset=dataset)
            echo(f"cached activations: {', '.join(str(p) for p in paths.values())}")
            result = train_from_cache(plan, cache_dir, model=model, dataset=load_training_dataset(plan))
        else:
            result = train(plan, model=model, dataset=dataset)
    echo(format_report(result))
    return result


# ------------------------------------------------------------------- measurements


@torch.no_grad()
def collect_activations(
    model: HookedRootModule, texts: Sequence[str], hook_names: Sequence[str], context_size: int = 128
) -> dict[str, torch.Tensor]:
    """Activations at ``hook_names`` for ``texts`` (one sequence each), flattened to ``[tokens, d]``.

    Padding positions, and positions the hook's stack does not compute under the model's
    convention, are dropped, so each row is a real token's activation.
    """
    from sae_lens_t5gemma.model import sites as sites_mod

    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    # Right padding whatever the tokenizer's own side: rows start at position 0 (the position
    # contract), and each row is split at its own length.
    batch = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=context_size,
        padding_side="right",
    )  # fmt: skip
    tokens = batch["input_ids"].to(model.cfg.device)  # type: ignore[attr-defined]
    mask = batch["attention_mask"].to(tokens.device)
    real = mask.bool()
    if hasattr(model, "covered_mask"):
        _, cache = model.run_with_cache(tokens, names_filter=list(hook_names), attention_mask=mask)
    else:
        _, cache = model.run_with_cache(tokens, names_filter=list(hook_names), prepend_bos=False)
    out = {}
    for h in hook_names:
        keep = real
        if hasattr(model, "covered_mask"):
            keep = real & model.covered_mask(tokens, sites_mod.resolve(model.canonical_name(h)).stack, mask)
        out[h] = cache[h].reshape(*tokens.shape, -1)[keep].float().cpu()
    return out


@torch.no_grad()
def reconstruction_mse(sae: SAE[Any], activations: torch.Tensor) -> float:
    """Mean squared reconstruction error per element of ``sae`` on ``[tokens, d_in]`` activations."""
    x = to_sae(sae, activations)
    was_training = sae.training
    sae.eval()
    try:
        recon = sae.decode(sae.encode(x))
    finally:
        sae.train(was_training)
    return float((recon.float() - x.float()).pow(2).mean())


# --------------------------------------------------------------------------- release


def write_release_yaml(folder: str | Path, release_name: str, sae_ids: Sequence[str] | None = None) -> Path:
    """Write ``<folder>/release.yaml`` in SAELens' ``pretrained_saes.yaml`` schema.

    Every subfolder holding a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) is one
    SAE, and its folder name is its SAE id (or pass ``sae_ids``). Entries carry the trained
    L0 and the final eval's explained variance where known. The release loads through this
    package's local-folder loader; :func:`register_release` registers it.
    """
    from sae_lens_t5gemma.loading import registration as registration

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
        meta = registration.check_cfg_json(folder / sae_id).get("metadata") or {}
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
    text = registration.release_yaml(
        release_name,
        repo_id=str(folder),
        model=model or "unknown",
        saes=entries,
        conversion_func=registration.LOCAL_LOADER,
        header="SAEs trained on T5Gemma 2 with sae_lens_t5gemma (SAELens pretrained_saes.yaml schema).\n"
        "Load by name after sae_lens_t5gemma.training.runner.register_release(<this file>).",
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
