"""``train`` under ``torchrun``: several processes (on one machine or several), one run.

``torchrun --nproc_per_node N -m sae_lens_t5gemma_cli train ... --parallel modules`` starts N
processes; each reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins one process group: gloo on CPU, nccl on
``cuda:LOCAL_RANK``. Multi-node runs use torchrun's own rendezvous (``--nnodes``,
``--rdzv-backend c10d``, ``--rdzv-endpoint host:port``); nothing here changes.

**Module-parallel** (``parallel="modules"``): the SAEs of each stack are dealt to the ranks
(site ``i`` to rank ``i % N``). Every rank reads its own shard of the documents (document ``j``
to rank ``j % N``, ``datasets.distributed.split_dataset_by_node``), harvests every hook of the
stack on it, and yields SAE batches of ``train_batch_size_tokens / N`` rows; one
``all_to_all_single`` per step hands each hook's rows, from every rank in rank order, to the
SAE's owner, which so steps on the whole global batch. SAELens' trainer, dead-feature
statistics, BatchTopK threshold, norm estimate, schedules and saving are untouched. With
``activations_mixing_fraction=0`` (SAELens' mixing buffer then keeps harvest order) the SAEs
equal, bit for bit, those of a one-process run whose data holds the same rows in the same
order (the shards' blocks of ``train_batch_size_tokens / N`` rows interleaved by rank). Every
rank initialises every SAE from the run's seed (so initialisation does not depend on N) and
keeps only its own.

**Data-parallel** (``parallel="data"``): every rank holds a replica of every SAE and steps it
on its own shard, ``train_batch_size_tokens / N`` rows per step. ``DistributedDataParallel``
cannot be used as is, because SAELens' ``SAETrainer._train_step`` calls
``sae.training_forward_pass()``, not ``sae(...)``; so :func:`replicate` and
``sae_lens_seams._replicate_trainer`` do by hand what
an exact replica needs: parameters and buffers broadcast from rank 0 at the start; gradients
averaged by one flat ``all_reduce`` from a post-accumulate-grad hook (so SAELens' gradient
clipping sees the global norm); after each step ``n_forward_passes_since_fired`` all-reduced
with MIN and the step's ``act_freq_scores`` increments with SUM; the sample counter global; the
norm-scaling estimate averaged (the mean norm over every rank's rows); and for BatchTopK (and
Matryoshka) the selection made global (each rank's top ``k * B`` values all-gathered, the
global ``k * B``-th value the cut) and the threshold EMA fed the global minimum. The replicas
end bit-identical (checked before saving: :func:`verify_replicas`) and equal a one-process run
with the same global batch within float32 rounding (measured: at most 1.6e-6 relative over
10 steps for standard, topk, batchtopk, matryoshka and jumprelu; 0.39 without gradient
averaging). Covariance whitening is refused. Data-parallel runs SAELens' multi-SAE
trainer for several hooks and SAELens' single-SAE one for a single hook (or ``multi_hook=False``);
a normalisation it does not synchronise is refused by name. Rank 0 alone saves.

``auto`` picks ``modules`` where every stack has at least N hooks, ``data`` otherwise.

Checkpoints and resume (:func:`checkpoint_per_rank`): one SAELens checkpoint folder for all
ranks, ``out/checkpoints/<runner>/<samples seen>``: each SAE's subfolder written by its owner
(data-parallel: by rank 0), each rank's activation-store state beside them
(:func:`store_state_name`), then, once every rank has written, rank 0 writes the whole run's
``runner_cfg.json`` and the record that marks the folder complete (with the number of
processes and the mode, which ``--resume`` must match: each rank continues its own shard). A
signal to any rank stops every rank at the same step (:func:`agree_on_stop`, one small
all-reduce per step) and they save that step's checkpoint together.

Saving: each SAE folder is written by its owner only (SAELens' ``_save_final_outputs``; under
data-parallel, by rank 0); rank 0
alone takes the output lock, prepares ``out``, runs the final evals, and writes the
training summary and the release YAML, so the folder looks like a one-process run's. A rank
that fails takes the others down: they see gloo's "Connection closed by peer" (or the
collective timeout, :data:`TIMEOUT_S`) and exit; torchrun then stops the job.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.training.checkpoints import ONE_PROCESS, _record_checkpoint
from sae_lens_t5gemma.training.memory import sae_state_bytes
from sae_lens_t5gemma.training.plan import TrainingPlan, per_stack

if TYPE_CHECKING:
    from sae_lens_t5gemma.model.sites import Site

PARALLEL_MODES = ("auto", "modules", "data")
TIMEOUT_S = 1800
"""Collective timeout: a rank that waits longer for the others fails (and so the job). A rank
that dies is seen at once (its connections close); this bounds a rank that hangs. It is long
because ranks legitimately wait for rank 0 while it alone runs a runner's final evals."""
DATA_PARALLEL_NORMALISATIONS = ("none", "expected_average_only_in", "layer_norm", "constant_norm_rescale")
"""Input normalisations data-parallel reproduces exactly: per-row ones, and the mean-norm
estimate (averaged over ranks). Anything needing other per-rank statistics is refused."""
AVERAGE_GRADIENTS = True
"""Data-parallel gradient averaging; False only for the no-sync control of the tests."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a ``torchrun`` job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Ranks | None:
    """The job torchrun started this process in; None for a one-process run.

    Raises:
        ValueError: torchrun's variables are malformed or inconsistent.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return None
    try:
        ranks = Ranks(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"torchrun environment: RANK/WORLD_SIZE/LOCAL_RANK malformed ({e})") from e
    if not 0 <= ranks.rank < ranks.world_size:
        raise ValueError(f"torchrun environment: RANK={ranks.rank} outside WORLD_SIZE={ranks.world_size}")
    return ranks


def choose_mode(plan: TrainingPlan, world_size: int) -> str:
    """The parallel mode of ``plan`` on ``world_size`` processes; refusals name the reason.

    Raises:
        ValueError: a global batch not divisible by N; for modules, too few hooks per stack or
            single-hook runners (``multi_hook=False``); for data, a normalisation it cannot
            synchronise.
    """
    cfg = plan.config
    wanted = cfg.parallel
    if wanted not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {wanted!r}")
    if cfg.train_batch_size_tokens % world_size:
        raise ValueError(
            f"train_batch_size_tokens={cfg.train_batch_size_tokens} (the global batch) is not divisible by the "
            f"{world_size} processes; each rank harvests an equal share"
        )
    stacks = per_stack(plan)
    fewest = min(len(sp.sites) for sp in stacks)
    if wanted == "auto":
        wanted = "modules" if fewest >= world_size and cfg.multi_hook else "data"
    if wanted == "data":
        if cfg.normalize_activations not in DATA_PARALLEL_NORMALISATIONS:
            raise ValueError(
                f"parallel='data' cannot synchronise normalize_activations={cfg.normalize_activations!r} exactly "
                f"(per-rank statistics); use one of {DATA_PARALLEL_NORMALISATIONS} or parallel='modules'"
            )
        return wanted
    if fewest < world_size:
        raise ValueError(
            f"parallel='modules' on {world_size} processes needs at least {world_size} hooks per stack (each rank "
            f"owns some SAEs); the fewest here is {fewest}"
        )
    if not cfg.multi_hook:
        raise ValueError("parallel='modules' shares one forward among SAEs: it needs multi_hook=True")
    return wanted


def job(plan: TrainingPlan, ranks: Ranks | None) -> dict[str, Any]:
    """What a checkpoint records of the processes that wrote it (``--resume`` must match it)."""
    if ranks is None:
        return dict(ONE_PROCESS)
    return {"world_size": ranks.world_size, "parallel": choose_mode(plan, ranks.world_size)}


class PeerFailed(RuntimeError):
    """Another rank of the job failed; its own error is reported by that rank."""


def from_main(compute: Any, ranks: Ranks) -> Any:
    """``compute()`` on rank 0, its value on every rank (``broadcast_object_list``).

    A failure on rank 0 is raised there, and as :class:`PeerFailed` on the others, so the
    job ends at once with the real error reported once.
    """
    import torch.distributed as dist

    box: list[Any] = [None]
    if ranks.is_main:
        try:
            box = [("ok", compute())]
        except Exception as e:
            dist.broadcast_object_list([("error", type(e).__name__)], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise PeerFailed(
            f"rank {ranks.rank} stopped: rank 0 failed with {value} (its error is reported there)"
        )
    return value


def peer_failure_line(e: BaseException, ranks: Ranks | None) -> str | None:
    """One line for a rank whose collective failed because another rank died (gloo's "Connection
    closed by peer", nccl's errors), or None if ``e`` is this rank's own error."""
    import torch.distributed as dist

    if ranks is None:
        return None
    if isinstance(e, PeerFailed):
        return str(e)
    if (
        isinstance(e, dist.DistError)
        or "Connection closed by peer" in str(e)
        or "Connection reset by peer" in str(e)
    ):
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return (
            f"rank {ranks.rank} stopped: another process of the job failed or was killed ({first[:200]}); "
            "torchrun's summary names it, and its own error is reported by it"
        )
    return None


def owners(sites: tuple[Site, ...] | list[Site], world_size: int) -> dict[str, int]:
    """SAE id -> the rank that trains it (site ``i`` of a stack to rank ``i % N``)."""
    return {s.friendly: i % world_size for i, s in enumerate(sites)}


def describe(plan: TrainingPlan, world_size: int, mode: str) -> str:
    """Lines for ``describe_plan``: which rank owns which SAE, and the memory per rank."""
    cfg = plan.config
    if mode == "data":
        lines = [
            f"parallel data on {world_size} processes: global batch {cfg.train_batch_size_tokens} tokens, "
            f"{cfg.train_batch_size_tokens // world_size} per rank per step; every rank holds every SAE"
        ]
        for sp in per_stack(plan):
            sizing = sp.store_sizing(sp.sites)
            state = sum(sae_state_bytes(plan.dims.d_in(s), cfg.d_sae) for s in sp.sites)
            lines.append(
                f"  each rank {sp.sites[0].stack}: {', '.join(s.friendly for s in sp.sites)}; memory above the "
                f"model ~{(sizing.activation_bytes + state) / 2**30:.2f} GiB (store "
                f"{sizing.activation_bytes / 2**30:.2f}, SAEs with Adam {state / 2**30:.2f})"
            )
        return "\n".join(lines)
    lines = [
        f"parallel {mode} on {world_size} processes: global batch {cfg.train_batch_size_tokens} tokens, "
        f"{cfg.train_batch_size_tokens // world_size} harvested per rank per step"
    ]
    for sp in per_stack(plan):
        own = owners(sp.sites, world_size)
        sizing = sp.store_sizing(sp.sites)
        for rank in range(world_size):
            mine = [s for s in sp.sites if own[s.friendly] == rank]
            state = sum(sae_state_bytes(plan.dims.d_in(s), cfg.d_sae) for s in mine)
            received = 4 * cfg.train_batch_size_tokens * sum(plan.dims.d_in(s) for s in mine)
            lines.append(
                f"  rank {rank} {sp.sites[0].stack}: {', '.join(s.friendly for s in mine)}; memory above the model "
                f"~{(sizing.activation_bytes + state + received) / 2**30:.2f} GiB (store "
                f"{sizing.activation_bytes / 2**30:.2f}, SAEs with Adam {state / 2**30:.2f}, all-to-all "
                f"{received / 2**30:.2f})"
            )
    return "\n".join(lines)


def init_process_group(ranks: Ranks, device: str) -> str:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); returns the device of this rank."""
    import torch.distributed as dist

    on_cuda = device.startswith("cuda")
    if on_cuda:
        device = f"cuda:{ranks.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if on_cuda else "gloo",
            rank=ranks.rank,
            world_size=ranks.world_size,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
    return device


def shard_dataset(dataset: Any, ranks: Ranks) -> Any:
    """Document ``j`` to rank ``j % N`` (``datasets``' ``split_dataset_by_node``)."""
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=ranks.rank, world_size=ranks.world_size)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def exchange_rows(
    batches: Iterator[dict[str, torch.Tensor]], owner_of: dict[str, int], ranks: Ranks
) -> Iterator[dict[str, torch.Tensor]]:
    """Each local multi-hook batch (``hook -> [B/N, d]``) becomes, on each rank, the global batch
    of the hooks it owns (``hook -> [B, d]``, rows of rank 0 first): one ``all_to_all_single``."""
    import torch.distributed as dist

    n = ranks.world_size
    by_rank = [[h for h, r in owner_of.items() if r == rank] for rank in range(n)]
    mine = by_rank[ranks.rank]
    for local in batches:
        rows = next(iter(local.values())).shape[0]
        widths = {h: local[h].shape[1] for h in owner_of}
        send = torch.cat([torch.cat([local[h] for h in hooks], dim=1).reshape(-1) for hooks in by_rank])
        width_mine = sum(widths[h] for h in mine)
        recv = send.new_empty(n * rows * width_mine)
        dist.all_to_all_single(
            recv,
            send.contiguous(),
            output_split_sizes=[rows * width_mine] * n,
            input_split_sizes=[rows * sum(widths[h] for h in hooks) for hooks in by_rank],
        )
        packed = recv.view(n * rows, width_mine)
        out, start = {}, 0
        for h in mine:
            out[h] = packed[:, start : start + widths[h]]
            start += widths[h]
        yield out


def own_modules(runner: Any, plan: TrainingPlan, ranks: Ranks) -> Any:
    """Make a ``MultiSAETrainingRunner`` (built with every SAE of its stack) module-parallel on this rank.

    Keeps this rank's SAEs (``runner.saes``, and a copy of ``runner.cfg`` naming only them, since
    SAELens' trainer wants the two to agree: its private per-SAE tables are set too), makes the
    store yield ``1/N`` of each SAE batch, and routes its multi-hook loader through
    :func:`exchange_rows` (patches of the runner and store instances, checked against SAELens
    6.54 as :mod:`sae_lens_seams` describes: SAELens has no seam for the data provider).

    Returns:
        The runner's whole config, for :func:`write_runner_cfg` (rank 0 writes it after the run,
        so ``runner_cfg.json`` is a one-process run's).
    """
    whole = runner.cfg
    own = owners(plan.sites, ranks.world_size)
    hook_of = whole.hook_names_per_sae
    owner_of_hook = {hook_of[name]: rank for name, rank in own.items()}
    mine = [name for name in whole.saes if own[name] == ranks.rank]
    cfg = copy.copy(whole)
    cfg.saes = {n: whole.saes[n] for n in mine}
    cfg.hook_names = {n: hook_of[n] for n in mine}
    cfg._hook_names_per_sae = dict(cfg.hook_names)
    cfg._hook_head_indices_per_sae = {n: whole.hook_head_indices_per_sae[n] for n in mine}
    runner.cfg = cfg
    runner.saes = {name: runner.saes[name] for name in mine}
    store = runner.activations_store
    store.train_batch_size_tokens = plan.config.train_batch_size_tokens // ranks.world_size
    loader = store.get_multi_hook_data_loader

    def exchanged() -> Iterator[dict[str, torch.Tensor]]:
        return exchange_rows(loader(), owner_of_hook, ranks)

    store.get_multi_hook_data_loader = exchanged
    return whole


def write_runner_cfg(whole_cfg: Any, out: Any) -> None:
    """Rank 0: SAELens' ``runner_cfg.json`` of the whole run (each rank's runner wrote its own share)."""
    import json

    from sae_lens.constants import RUNNER_CFG_FILENAME

    from sae_lens_t5gemma.outputs import atomic_write

    atomic_write(Path(out) / RUNNER_CFG_FILENAME, json.dumps(whole_cfg.to_dict()))


# ------------------------------------------------------------------ data-parallel


class Collectives:
    """The collectives a data-parallel replica needs (``torch.distributed``, default group).

    :func:`sae_lens_seams._replicate_trainer` calls these from inside SAELens' trainer; they are
    kept here so the seams hold no process-group code.
    """

    def __init__(self, ranks: Ranks, device: str | torch.device = "cpu") -> None:
        self.ranks = ranks
        self.world_size = ranks.world_size
        self.device = torch.device(device)  # nccl reduces CUDA tensors only

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's ``tensors`` (one flat broadcast)."""
        import torch.distributed as dist

        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(self.device)
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, tensors)

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace ``tensors`` by their mean over ranks: one flat ``all_reduce`` (the gradients)."""
        import torch.distributed as dist

        if not AVERAGE_GRADIENTS:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(self.device)
        dist.all_reduce(flat)
        flat /= self.world_size
        _unflatten_into(flat, tensors)

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (in float64)."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def kth_largest(self, local_top: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k``-th largest value over every rank's ``local_top`` (equal lengths on every rank)."""
        import torch.distributed as dist

        gathered = [torch.empty_like(local_top) for _ in range(self.world_size)]
        dist.all_gather(gathered, local_top.contiguous())
        return torch.topk(torch.cat(gathered), k).values[-1]


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    start = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[start : start + n].view_as(t))
        start += n


def agree_on_stop(pending: int | None, device: str | torch.device = "cpu") -> int | None:
    """The stop signal any rank got before this step (None if none did): one all-reduce (MAX)."""
    import torch.distributed as dist

    t = torch.tensor([pending or 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def store_state_name(ranks: Ranks) -> str:
    """Each rank's activation-store state in a checkpoint (SAELens' one file, per rank)."""
    from sae_lens.constants import ACTIVATIONS_STORE_STATE_FILENAME

    stem, suffix = ACTIVATIONS_STORE_STATE_FILENAME.rsplit(".", 1)
    return f"{stem}.rank{ranks.rank}-of-{ranks.world_size}.{suffix}"


def checkpoint_per_rank(runner: Any, plan: TrainingPlan, ranks: Ranks, whole_cfg: Any, hook: str) -> None:
    """One checkpoint folder for every rank of a runner (instance patches, SAELens 6.54).

    SAELens' trainer writes its SAEs' files, then calls the runner's checkpoint ``hook``
    (``_save_runner_checkpoint_files`` of the multi-SAE runner, ``save_checkpoint`` of the
    single-SAE one), which here writes this rank's store state
    (:func:`store_state_name`), waits for every rank, and on rank 0 writes the whole run's
    ``runner_cfg.json`` and the record that marks the folder complete; the store reads its
    own rank's file back on resume. The run's context records the job and agrees on stops.
    """
    store = runner.activations_store
    name = store_state_name(ranks)
    store.save_to_checkpoint = lambda path: store.save(str(Path(path) / name))
    store.load_from_checkpoint = lambda path: store.load(str(Path(path) / name))
    device = plan.config.device
    runner.t5gemma2.job = job(plan, ranks)
    runner.t5gemma2.agree = lambda pending: agree_on_stop(pending, device)

    def save_files(checkpoint_path: Path | None) -> None:
        if checkpoint_path is None:
            return
        store.save_to_checkpoint(checkpoint_path)
        barrier()  # every rank's SAEs and store state are written
        if ranks.is_main:
            write_runner_cfg(whole_cfg, checkpoint_path)
            _record_checkpoint(runner, checkpoint_path)
        barrier()

    setattr(runner, hook, save_files)


def verify_replicas(saes: dict[str, Any], ranks: Ranks) -> dict[str, str]:
    """The sha256 of every SAE's state on this rank; raises if any rank's differs from rank 0's.

    Data-parallel replicas must end bit-identical; a difference means a missed synchronisation,
    and saving rank 0's copy would hide it.
    """
    import hashlib

    import torch.distributed as dist

    mine = {}
    for name, sae in saes.items():
        h = hashlib.sha256()
        for key, t in sorted(sae.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        mine[name] = h.hexdigest()
    every: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(every, mine)
    differ = sorted({n for d in every for n in d if d[n] != every[0][n]})
    if differ:
        raise RuntimeError(f"data-parallel replicas differ between ranks at the end of training: {differ}")
    return mine


def replicate(runner: Any, plan: TrainingPlan, ranks: Ranks) -> Collectives:
    """Make a SAELens runner (multi-SAE, or single-SAE) a data-parallel replica on this rank.

    The store yields ``1/N`` of each SAE batch (this rank's shard); rank 0 alone saves, after
    :func:`verify_replicas`. The trainer-side synchronisation is applied when SAELens builds its
    trainer (``sae_lens_seams._replicate``, with the returned collectives).
    """
    runner.activations_store.train_batch_size_tokens = plan.config.train_batch_size_tokens // ranks.world_size
    if hasattr(runner, "saes"):  # MultiSAETrainingRunner
        save = runner._save_final_outputs

        def save_on_rank_0(saes: dict[str, Any], trainer: Any) -> None:
            verify_replicas(saes, ranks)
            if ranks.is_main:
                save(saes, trainer)

        runner._save_final_outputs = save_on_rank_0
    else:  # LanguageModelSAETrainingRunner: one site
        save_sae = runner.save_final_sae

        def save_sae_on_rank_0(sae: Any, output_path: str, log_feature_sparsity: Any = None) -> None:
            verify_replicas({plan.sites[0].friendly: sae}, ranks)
            if ranks.is_main:
                save_sae(sae=sae, output_path=output_path, log_feature_sparsity=log_feature_sparsity)

        runner.save_final_sae = save_sae_on_rank_0
    return Collectives(ranks, plan.config.device)


def prepare_runner(runner: Any, plan: TrainingPlan, ranks: Ranks) -> tuple[Any, Collectives | None]:
    """This rank's part of a multi-SAE runner in the mode :func:`choose_mode` picks.

    Returns:
        ``(whole runner config for rank 0 to write, or None; the collectives of a data-parallel
        replica, or None)``.
    """
    if choose_mode(plan, ranks.world_size) == "data":
        collectives = replicate(runner, plan, ranks)
        checkpoint_per_rank(runner, plan, ranks, runner.cfg, "_save_runner_checkpoint_files")
        return None, collectives
    whole = own_modules(runner, plan, ranks)
    checkpoint_per_rank(runner, plan, ranks, whole, "_save_runner_checkpoint_files")
    return whole, None


def prepare_single_runner(runner: Any, plan: TrainingPlan, ranks: Ranks) -> None:
    """A single-SAE runner (one site of ``plan``) as a data-parallel replica on this rank (the only
    mode a single hook can take: module-parallel needs N hooks)."""
    runner.t5gemma2.replica = replicate(runner, plan, ranks)
    checkpoint_per_rank(runner, plan, ranks, runner.cfg, "save_checkpoint")
