"""Every place training reaches into SAELens' internals, each with why (checked against SAELens 6.54.12).

SAELens has no hooks for what this package needs around its runners, so the adaptations live
here, in one module, and :func:`check_sae_lens_version` warns when the installed SAELens is not
the minor version they were written against. Documented extension points (subclassing a runner
and overriding a public method, passing ``override_model``/``override_dataset``, setting
``runner.evaluator``) are used as such; the rest are patches:

- :func:`_runner_classes`: subclasses of both training runners. The single-SAE runner's
  ``run_trainer_with_interruption_handling`` and ``save_checkpoint`` are public; the multi-SAE
  runner's ``_run_with_interruption_handling`` and ``_save_runner_checkpoint_files`` are
  private (a patch). Why: SAELens 6.54's single-SAE interruption save writes into a folder it
  never created and without the SAE; and every checkpoint must be marked complete.
- :func:`_lean_multi_sae_steps`: swaps the module attribute ``multi_sae_training_runner.MultiSAETrainer``
  for the duration of a run (a patch). Why: SAELens keeps every SAE's step tensors alive until
  all SAEs have stepped (gigabytes at 18 hooks) and builds the trainer with no hook to reach it.
- :func:`_replicate`: makes an ``SAETrainer`` (the single-SAE runner's, or each per-SAE one of a
  ``MultiSAETrainer``: :func:`_replicate_trainer`) a data-parallel replica (instance patches of
  ``step``, ``save_checkpoint``, the scaler's ``estimate_scaling_factor``, the SAE's
  ``activation_fn`` and ``update_topk_threshold``, plus gradient hooks). Why: SAELens'
  ``_train_step`` calls ``sae.training_forward_pass()``, so ``DistributedDataParallel`` cannot
  wrap the SAE, and the dead-feature statistics, sample counter, norm estimate and BatchTopK
  selection live in the trainer and the SAE, not in anything DDP syncs.
- :func:`_cast_multi_hook_activations`: replaces a store's ``get_multi_hook_activations`` on the
  instance (a patch). Why: the multi-hook path passes the model's dtype through.
- :func:`_cache_runner_class`: a ``CacheActivationsRunner`` subclass whose ``__init__`` rebuilds
  SAELens' own with the private ``_mk_activations_store`` (a patch), and whose ``run`` saves the
  shuffle (:func:`_save_shuffled`). Why: that runner has no ``override_model``, and its
  ``shuffle=True`` is never written to disk.
- :func:`_wandb_mode` and :func:`_quiet_runner_setup`: environment and logging only (no patch):
  SAELens runs in-training evals only in its wandb branch, and warns about overrides by design.

``sae_lens_t5gemma.training.distributed`` adds the seams of multi-process training the same way,
each with its why in its docstring, all instance patches made before ``run()``: ``own_modules``
(the runner's ``saes`` and ``cfg`` cut to this rank's SAEs, with SAELens' private per-SAE tables;
the store's batch size and multi-hook loader: SAELens has no seam for the data provider),
``replicate`` (``_save_final_outputs`` / ``save_final_sae`` on rank 0 after the replica check)
and ``checkpoint_per_rank`` (the store's ``save_to_checkpoint`` / ``load_from_checkpoint`` per
rank; the runner's checkpoint hook ``_save_runner_checkpoint_files`` / ``save_checkpoint``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.training.checkpoints import _fit_or_checkpoint, _record_checkpoint, _RunnerContext

CHECKED_SAE_LENS = "6.54"
"""The SAELens minor version the seams below were written and tested against."""


@functools.cache
def check_sae_lens_version() -> str:
    """The installed SAELens version; warns once if its minor version is not :data:`CHECKED_SAE_LENS`."""
    try:
        installed = version("sae-lens")
    except PackageNotFoundError:
        return "unknown"
    if not (installed == CHECKED_SAE_LENS or installed.startswith(CHECKED_SAE_LENS + ".")):
        warnings.warn(
            f"sae_lens_t5gemma's training adapts SAELens {CHECKED_SAE_LENS} internals (runner methods, "
            f"MultiSAETrainer, CacheActivationsRunner.__init__); SAELens {installed} is installed: check "
            "sae_lens_t5gemma/training/sae_lens_seams.py against it",
            stacklevel=2,
        )
    return installed


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


@functools.cache
def _runner_classes() -> tuple[type, type]:
    """SAELens' two training runners, with the interruption save of :func:`_fit_or_checkpoint`
    and a :data:`CHECKPOINT_RECORD` written last into every checkpoint.

    The overridden methods are SAELens 6.54's: ``run_trainer_with_interruption_handling`` and
    ``save_checkpoint`` (the trainer's ``save_checkpoint_fn``) of the single-SAE runner,
    ``_run_with_interruption_handling`` and ``_save_runner_checkpoint_files`` of the multi-SAE one.
    """
    from sae_lens import LanguageModelSAETrainingRunner, MultiSAETrainingRunner

    check_sae_lens_version()

    class Runner(LanguageModelSAETrainingRunner):  # type: ignore[misc]
        t5gemma2: _RunnerContext

        def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
            if self.t5gemma2.replica is not None:  # data-parallel under torchrun
                _replicate(trainer, self.t5gemma2.replica)
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


@contextlib.contextmanager
def _lean_multi_sae_steps(collectives: Any = None) -> Iterator[None]:
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
    With ``collectives`` (``distributed.Collectives``) the trainer is made a data-parallel
    replica first (:func:`_replicate_trainer`).
    """
    from sae_lens import multi_sae_training_runner as msr

    check_sae_lens_version()
    from sae_lens.training.sae_trainer import SAETrainer

    base = msr.MultiSAETrainer

    class LeanMultiSAETrainer(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if collectives is not None:
                _replicate_trainer(self, collectives)
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


class _GlobalBatchTopK(torch.nn.Module):
    """SAELens' ``BatchTopK`` over the global batch of a data-parallel job.

    SAELens keeps the ``k * B`` largest activations of the batch. Each rank sends its own
    ``k * B`` largest (B the global batch: no more can come from one rank), the ``k * B``-th
    largest of them all is the cut, and each rank keeps its activations at or above it: the
    rows a one-process run keeps, with the same values and gradients (ties at the cut aside).
    In eval mode (evals run on one rank) it is SAELens' own, local selection.
    """

    def __init__(self, local: torch.nn.Module, collectives: Any) -> None:
        super().__init__()
        self.local = local
        self.k = local.k
        self.collectives = collectives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.local(x)
        acts = x.relu()
        flat = acts.flatten()
        n_global = acts.shape[:-1].numel() * self.collectives.world_size
        k = int(self.k * n_global)
        with torch.no_grad():
            top = torch.topk(flat.detach(), min(k, flat.numel())).values
            cut = self.collectives.kth_largest(top, k)
        return acts * (acts >= cut)


def _replicate_trainer(multi: Any, collectives: Any) -> None:
    """Make each per-SAE ``SAETrainer`` of SAELens' ``MultiSAETrainer`` ``multi`` a data-parallel replica."""
    for trainer in multi.trainers.values():
        _replicate(trainer, collectives)


def _replicate(trainer: Any, collectives: Any) -> None:
    """Make SAELens' ``SAETrainer`` ``trainer`` one data-parallel replica of N (SAELens 6.54).

    Parameters and buffers broadcast from rank 0; gradients averaged by one flat all-reduce
    once every parameter's gradient has accumulated (a post-accumulate-grad hook, so
    ``_train_step``'s ``clip_grad_norm_`` sees the global norm); after each ``step``
    ``n_forward_passes_since_fired`` all-reduced with MIN and the step's ``act_freq_scores``
    increments with SUM, and ``n_training_samples`` counting every rank's rows; BatchTopK's
    selection global (:class:`_GlobalBatchTopK`) and its threshold EMA fed the global minimum;
    the norm-scaling estimate the mean norm over every rank's rows; the SAE's checkpoint files
    written by rank 0 alone (the runner's own checkpoint files still on every rank).
    """
    from sae_lens.saes.batchtopk_sae import BatchTopK

    sae = trainer.sae
    with torch.no_grad():
        collectives.broadcast_(list(sae.state_dict().values()))
    params = [p for p in sae.parameters() if p.requires_grad]
    arrived: list[torch.nn.Parameter] = []

    def grad_ready(p: torch.nn.Parameter) -> None:
        arrived.append(p)
        if len(arrived) == len(params):
            arrived.clear()
            with torch.no_grad():
                collectives.average_([q.grad for q in params])

    for p in params:
        p.register_post_accumulate_grad_hook(grad_ready)

    def check_all_arrived(optimizer: Any, args: Any, kwargs: Any) -> None:
        if arrived:  # some parameter got no gradient: the average never ran
            raise RuntimeError(
                f"data-parallel: {len(arrived)} of the SAE's parameters got gradients this step, not all; "
                "the gradient average did not run"
            )

    trainer.optimizer.register_step_pre_hook(check_all_arrived)
    if not collectives.ranks.is_main:
        trainer.save_checkpoint = _runner_files_only(trainer)
    if isinstance(sae.activation_fn, BatchTopK):
        sae.activation_fn = _GlobalBatchTopK(sae.activation_fn, collectives)
    if hasattr(sae, "update_topk_threshold"):
        sae.update_topk_threshold = _global_threshold_update(sae, collectives)
    trainer.step = _synced_step(trainer, collectives)
    scaler = trainer.activation_scaler
    estimate = scaler.estimate_scaling_factor

    def estimate_over_ranks(d_in: int, data_provider: Any, n_batches_for_norm_estimate: int) -> None:
        estimate(
            d_in=d_in, data_provider=data_provider, n_batches_for_norm_estimate=n_batches_for_norm_estimate
        )
        root_d = d_in**0.5
        scaler.scaling_factor = root_d / collectives.mean(root_d / scaler.scaling_factor)

    scaler.estimate_scaling_factor = estimate_over_ranks


def _runner_files_only(trainer: Any) -> Any:
    """``SAETrainer.save_checkpoint`` on a replica other than rank 0: the SAE's files are rank 0's
    (the replicas are identical); the runner's own files (``save_checkpoint_fn``: this rank's
    store state, and the wait for the others) are still written."""

    def save_checkpoint(checkpoint_name: str, base_path: Any = None, wandb_aliases: Any = None) -> None:
        if trainer.save_checkpoint_fn is None:  # a MultiSAETrainer's per-SAE trainer: nothing of its own
            return
        base = base_path if base_path is not None else trainer.cfg.checkpoint_path
        path = Path(base) / checkpoint_name if base is not None else None
        if path is not None:
            path.mkdir(exist_ok=True, parents=True)
        trainer.save_checkpoint_fn(checkpoint_path=path)

    return save_checkpoint


def _synced_step(trainer: Any, collectives: Any) -> Any:
    step = trainer.step

    def synced(batch: torch.Tensor) -> Any:
        before = trainer.act_freq_scores.clone()
        out = step(batch)
        trainer.n_training_samples += batch.shape[0] * (collectives.world_size - 1)
        collectives.min_(trainer.n_forward_passes_since_fired)
        increments = collectives.sum_(trainer.act_freq_scores - before)
        trainer.act_freq_scores = before + increments
        return out

    return synced


def _global_threshold_update(sae: Any, collectives: Any) -> Any:
    """SAELens' ``BatchTopKTrainingSAE.update_topk_threshold`` fed the minimum positive
    activation over every rank (the same EMA, under the same disabled autocast)."""

    @torch.no_grad()
    def update(acts_topk: torch.Tensor) -> None:
        positive = acts_topk > 0
        lr = sae.cfg.topk_threshold_lr
        with torch.autocast(sae.topk_threshold.device.type, enabled=False):
            local = acts_topk[positive].min() if positive.any() else acts_topk.new_tensor(float("inf"))
            smallest = collectives.min_(local.reshape(1).clone())[0]
            if torch.isfinite(smallest):
                sae.topk_threshold = (1 - lr) * sae.topk_threshold + lr * smallest.to(
                    sae.topk_threshold.dtype
                )

    return update


def _cache_runner_class():
    from sae_lens import CacheActivationsRunner
    from sae_lens.cache_activations_runner import _mk_activations_store

    class T5Gemma2CacheActivationsRunner(CacheActivationsRunner):
        """SAELens' ``CacheActivationsRunner`` with a model passed in.

        SAELens' runner has no ``override_model`` and loads its model with ``load_model``,
        which knows only TransformerLens and causal-LM classes. This subclass takes the
        hooked model and otherwise builds exactly what SAELens' ``__init__`` builds; ``run``
        (sharding, consolidation, shuffling) is SAELens' own, followed by :func:`_save_shuffled`.
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

        def run(self) -> Any:
            dataset = super().run()
            if self.cfg.shuffle:
                dataset = _save_shuffled(dataset, Path(self.cfg.new_cached_activations_path))
            return dataset

    return T5Gemma2CacheActivationsRunner


def _save_shuffled(dataset: Any, folder: Path) -> Any:
    """Write the rows of a cache in the shuffled order SAELens' ``run`` returns (SAELens 6.54).

    With ``shuffle=True``, ``CacheActivationsRunner.run`` shuffles the dataset after saving it,
    which only attaches an index mapping to the returned object: the folder keeps harvest order,
    and a run with ``use_cached_activations=True`` reads it in that order (training from a
    "shuffled" cache was bit-identical to an unshuffled one). So the shuffled rows are saved
    to a sibling folder, which then replaces the cache (the disk briefly holds it twice).
    """
    import shutil

    import datasets

    staged = folder.with_name(folder.name + ".shuffling")
    harvest_order = folder.with_name(folder.name + ".harvest-order")
    for leftover in (staged, harvest_order):
        if leftover.exists():
            shutil.rmtree(leftover)
    dataset.save_to_disk(str(staged))
    folder.rename(harvest_order)
    staged.rename(folder)
    shutil.rmtree(harvest_order)
    return datasets.load_from_disk(str(folder))
