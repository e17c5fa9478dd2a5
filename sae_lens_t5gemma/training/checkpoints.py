"""Interruption and resume: a signal stops training between two steps and saves a whole
SAELens checkpoint; ``resume`` finds the latest complete one and checks it comes from the same run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sae_lens_t5gemma.outputs import atomic_write, output_lock
from sae_lens_t5gemma.training.plan import TrainingPlan, per_stack

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
    {
        "out",
        "resume",
        "overwrite",
        "n_checkpoints",
        "wandb",
        "wandb_project",
        "device",
        "release_name",
        "parallel",
    }
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
    and the counters of the same step. Under ``torchrun`` ``agree`` (one small all-reduce per
    step) makes every rank stop at the same step when any of them got the signal.
    """

    def __init__(self, inner: Any, agree: Callable[[int | None], int | None] | None = None):
        self.inner = inner
        self.agree = agree
        self.pending: int | None = None
        self.pending_since = 0.0

    def __iter__(self) -> _StopBetweenSteps:
        return self

    def __next__(self) -> Any:
        if self.agree is not None:
            self.pending = self.agree(self.pending)
        if self.pending is not None:
            raise _Stop(self.pending, clean=True)
        return next(self.inner)


SAME_REQUEST_S = 2.0
"""A second signal this soon after the first is the same request delivered twice: Ctrl-C on
``torchrun`` reaches each worker from the terminal and again forwarded by torchrun."""


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
    context: _RunnerContext = runner.t5gemma2
    provider = trainer.data_provider = _StopBetweenSteps(trainer.data_provider, context.agree)

    def on_signal(signum: int, frame: Any) -> None:
        if provider.pending is not None and time.monotonic() - provider.pending_since < SAME_REQUEST_S:
            return
        if provider.pending is not None or trainer.n_training_samples == 0:
            raise _Stop(signum, clean=False)
        provider.pending, provider.pending_since = signum, time.monotonic()
        print(  # on a line of its own, below SAELens' progress bar
            f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(signal again to stop at once, without it)",
            file=sys.stderr,
        )

    with _signals_handled(on_signal):
        try:
            fitted = trainer.fit()
            # A signal during the last step: the runner finishes (its SAEs are saved next), and
            # train stops before the next runner (see train); under torchrun every rank does.
            context.stopped = context.agree(provider.pending) if context.agree else provider.pending
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


ONE_PROCESS = {"world_size": 1, "parallel": None}
"""The ``processes`` of a checkpoint record written by a one-process run."""


@dataclass
class _RunnerContext:
    """What one runner's checkpoints record (set on the runner as ``t5gemma2``)."""

    out: Path
    key: str
    sae_ids: list[str]
    fingerprint: dict[str, Any]
    stopped: int | None = None
    """A signal that came during the runner's last step (it finished; the run stops after it)."""
    job: dict[str, Any] = field(default_factory=lambda: dict(ONE_PROCESS))
    """The processes that train (:data:`ONE_PROCESS`, or what ``distributed.job`` records)."""
    agree: Callable[[int | None], int | None] | None = None
    """Under ``torchrun``: the stop signal any rank got (see :class:`_StopBetweenSteps`)."""
    replica: Any = None
    """Under ``torchrun``, data-parallel: the collectives a single-SAE runner's trainer syncs with."""


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
        "processes": context.job,
    }
    atomic_write(Path(checkpoint_path) / CHECKPOINT_RECORD, json.dumps(record, indent=1))


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
    for stack_plan in per_stack(plan):
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


def _prepare_out(plan: TrainingPlan, job: dict[str, Any] | None = None) -> dict[str, _Start]:
    """Decide where each runner starts (under the lock, before any model loads).

    Without ``resume``, checkpoints of an interrupted run in ``out`` are refused (so that
    nothing is lost) unless ``overwrite``, which removes them. With ``resume``, every
    runner's SAEs must be finished or its latest checkpoint must come from a run with the
    same settings and data, and with the same processes (``job``: number and parallel mode;
    each rank continues its own shard of the data).

    Raises:
        FileExistsError: checkpoints of an interrupted run, without resume or overwrite.
        FileNotFoundError: resume with nothing to resume.
        ValueError: resume from a checkpoint of another run (the differences are named).
    """
    job = job or ONE_PROCESS
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
            saved_job = record.get("processes") or ONE_PROCESS
            if saved_job != job:
                raise ValueError(
                    f"--resume: checkpoint {path} was written by {_describe_job(saved_job)}; this run has "
                    f"{_describe_job(job)}. Each process continues its own shard of the data: resume with "
                    + (
                        "one process (no torchrun)"
                        if saved_job.get("world_size", 1) == 1
                        else f"torchrun --nproc_per_node {saved_job['world_size']} ... --parallel {saved_job['parallel']}"
                    )
                )
        starts[key] = _Start(checkpoint=found[0] if found else None)
    if not any(st.finished or st.checkpoint for st in starts.values()):
        raise FileNotFoundError(
            f"--resume: {str(out)!r} holds no finished SAE and no checkpoint under {str(out / CHECKPOINTS)!r} "
            "for this run; run without --resume"
        )
    return starts


def _describe_job(job: dict[str, Any]) -> str:
    n = job.get("world_size", 1)
    return "one process" if n == 1 else f"{n} processes (parallel {job.get('parallel')})"


def _multi_key(stack: str) -> str:
    return f"multi-{stack}"
