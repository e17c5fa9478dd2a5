"""Checkpoints, resume and failure of ``train`` under ``torchrun`` (2 CPU processes, gloo).

- A SIGTERM to one rank stops both at the same step; they save one checkpoint folder (each SAE
  by its owner, each rank's store state, rank 0's record naming the processes), rank 0 alone
  reports; a one-process ``--resume`` and one in the other mode are refused by name; the same
  command under torchrun with ``--resume`` continues and ends near the uninterrupted run.
- A SIGTERM to one rank during the last step of a runner (one runner per hook): every rank
  finishes that runner and stops before the next (before: the ranks disagreed and the job hung);
  ``--resume`` keeps the finished SAE and trains the other.
- A rank killed (SIGKILL) while a data-parallel checkpoint is being written: the job ends soon,
  the other rank says in one line that another process failed, the half-written checkpoint has no
  record (and so is passed over), no SAE folder looks finished, and ``--resume`` continues from
  the last complete checkpoint.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torchrun_jobs import BATCH, SAE_IDS, cli_fields, launch, one_process, train_argv

from sae_lens_t5gemma import training
from sae_lens_t5gemma.cli.main import main
from sae_lens_t5gemma.training import checkpoints

pytestmark = [
    pytest.mark.slow,  # each test: two or three torchrun jobs, 20 to 45 s
    pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted"),
]

SIGNALLING_WORKER = """
import os, signal, sys
from sae_lens_t5gemma.cli.main import main
from sae_lens_t5gemma.training import checkpoints
# TEST_SIGNAL_RANK gets SIGTERM as the trainer asks for its TEST_SIGNAL_AT-th batch (the first
# 10 estimate the activations' norm: n_batches_for_norm_estimate capped at the run's 10 steps),
# or, with TEST_SIGNAL_AFTER=1, just after that batch was handed out (during that step).
if os.environ.get("TEST_SIGNAL_RANK") == os.environ["RANK"]:
    base, calls = checkpoints._StopBetweenSteps.__next__, [0]
    after = os.environ.get("TEST_SIGNAL_AFTER") == "1"
    def next_and_signal(self):
        calls[0] += 1
        if calls[0] == int(os.environ["TEST_SIGNAL_AT"]) and not after:
            os.kill(os.getpid(), signal.SIGTERM)
        batch = base(self)
        if calls[0] == int(os.environ["TEST_SIGNAL_AT"]) and after:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch
    checkpoints._StopBetweenSteps.__next__ = next_and_signal
sys.exit(main(sys.argv[1:]))
"""

KILLED_WORKER = """
import os, signal, sys
from sae_lens.training.activations_store import ActivationsStore
from sae_lens_t5gemma.cli.main import main
# Rank 1 dies (SIGKILL) as it writes its store state into the second checkpoint.
if os.environ["RANK"] == "1":
    base, calls = ActivationsStore.save, [0]
    def save_or_die(self, path):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return base(self, path)
    ActivationsStore.save = save_or_die
sys.exit(main(sys.argv[1:]))
"""


def _worker(tmp_path, text: str, name: str) -> str:
    script = tmp_path / name
    script.write_text(text)
    return str(script)


def _uninterrupted(tiny_model_dir, reference, tmp_path, hooks=SAE_IDS) -> dict:
    """The uninterrupted run: a one-process run on the interleaved data equals either mode's
    (bit for bit for modules, within 1e-5 for data: tests/training/test_distributed.py)."""
    fields = {**cli_fields(tiny_model_dir), "hooks": list(hooks)}
    cfg = training.TrainConfig.from_preset(
        "recommended", **fields, dataset=str(reference), out=str(tmp_path / "one")
    )
    return one_process(cfg).saes


def _close_to(out, whole: dict, sae_ids=SAE_IDS) -> list[tuple[float, float]]:
    """Per SAE: (mean cosine of the decoder rows, relative difference of W_dec) against ``whole``."""
    from sae_lens import SAE

    found = []
    for sae_id in sae_ids:
        resumed = SAE.load_from_disk(str(out / sae_id)).state_dict()["W_dec"]
        base = whole[sae_id].state_dict()["W_dec"]
        cosine = torch.nn.functional.cosine_similarity(resumed, base, dim=1).mean().item()
        found.append((cosine, float((resumed - base).norm() / base.norm())))
    return found


MULTI_FILES = ["activations_store_state.rank0-of-2.safetensors", "activations_store_state.rank1-of-2.safetensors",
               *SAE_IDS, "runner_cfg.json", "t5gemma2_checkpoint.json"]  # fmt: skip
SINGLE_FILES = ["activation_scaler.json", "activations_store_state.rank0-of-2.safetensors",
                "activations_store_state.rank1-of-2.safetensors", "cfg.json", "runner_cfg.json",
                "sae_weights.safetensors", "sparsity.safetensors", "t5gemma2_checkpoint.json",
                "trainer_state.pt"]  # fmt: skip
CASES = {
    # Two hooks, module-parallel: one MultiSAETrainingRunner, each SAE's subfolder by its owner.
    "modules": dict(hooks=SAE_IDS, key="multi-encoder", files=MULTI_FILES, subfolders=SAE_IDS),
    # One hook, data-parallel: the single-SAE runner; rank 0 writes the SAE, each rank its store state.
    "data, one hook": dict(hooks=SAE_IDS[1:], key=SAE_IDS[1], files=SINGLE_FILES, subfolders=("",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_to_one_rank_checkpoints_both_and_resume_continues(
    tiny_model_dir, files, tmp_path, capsys, case
):
    sharded, reference = files
    hooks, key = CASES[case]["hooks"], CASES[case]["key"]
    mode = case.split(",")[0]
    fields, out = {**cli_fields(tiny_model_dir), "hooks": list(hooks)}, tmp_path / "two"
    worker = _worker(tmp_path, SIGNALLING_WORKER, "signalling.py")
    args = train_argv(fields, sharded, out, "--parallel", mode)
    run = launch([worker, *args], timeout=240, env={"TEST_SIGNAL_RANK": "1", "TEST_SIGNAL_AT": "15"})
    assert run.returncode != 0
    # Both ranks stopped before the 5th training batch: 4 steps of the global batch.
    ckpt = out / "checkpoints" / key / str(4 * BATCH)
    line = (
        f"terminated (SIGTERM): train stopped; {', '.join(hooks)} stopped after {4 * BATCH:,} of {10 * BATCH:,} "
        f"tokens; checkpoint {ckpt} "
    )
    assert run.stderr.count(line) == 1, run.stderr[-4000:]  # rank 0 speaks for the job
    # One folder: the SAEs' files, each rank's store state, rank 0's record and runner config.
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(CASES[case]["files"])
    record = json.loads((ckpt / "t5gemma2_checkpoint.json").read_text())
    assert record["processes"] == {"world_size": 2, "parallel": mode}
    assert record["n_training_samples"] == 4 * BATCH and record["sae_ids"] == list(hooks)
    for sub in CASES[case]["subfolders"]:
        state = torch.load(ckpt / sub / "trainer_state.pt", weights_only=False)
        assert (state["n_training_steps"], state["n_training_samples"]) == (4, 4 * BATCH)
    assert not list(out.glob("*/eval_metrics.json"))

    # Resumed by another kind of job: refused by name, before any model loads.
    assert main([*args, "--resume"]) == 2
    assert (
        f"error: --resume: checkpoint {ckpt} was written by 2 processes (parallel {mode}); this run has one "
        f"process. Each process continues its own shard of the data: resume with torchrun --nproc_per_node 2 ... "
        f"--parallel {mode}"
    ) in capsys.readouterr().err
    other = {"world_size": 2, "parallel": "data" if mode == "modules" else "modules"}
    plan = training.plan_training(
        training.TrainConfig.from_preset(
            "recommended", **fields, dataset=str(sharded), out=str(out), resume=True
        )
    )
    with pytest.raises(ValueError, match=rf"this run has 2 processes \(parallel {other['parallel']}\)"):
        checkpoints._prepare_out(plan, other)

    # The same command with --resume under torchrun continues from the checkpoint.
    run = launch(["-m", "sae_lens_t5gemma_cli", *args, "--resume"], timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count(f"resume   {key}: from {ckpt}") == 1
    assert all((out / s / "eval_metrics.json").is_file() for s in hooks)
    close = _close_to(out, _uninterrupted(tiny_model_dir, reference, tmp_path, hooks), hooks)
    print(f"{case}, resumed against uninterrupted (mean cosine, relative W_dec difference):", close)
    # The resumed run skips the rows its store had harvested but not trained on (SAELens saves the
    # store's position, not its buffer), so it is near the uninterrupted run, not equal. Measured
    # (modules): mean cosine 0.999 and 0.998, W_dec within 4.7% and 5.6%. The control, another
    # seed, is far.
    for cosine, difference in close:
        assert cosine > 0.99 and 0 < difference < 0.2, close
    if mode == "modules":
        other_seed = training.TrainConfig.from_preset(
            "recommended", **{**fields, "seed": 8}, dataset=str(reference), out=str(tmp_path / "seed8")
        )
        far = _close_to(out, one_process(other_seed).saes, hooks)
        print("control, another seed:", far)
        assert all(cosine < 0.5 and difference > 0.5 for cosine, difference in far), far


def test_a_signal_in_a_runners_last_step_stops_every_rank_before_the_next_runner(
    tiny_model_dir, files, tmp_path
):
    """One runner per hook (``--no-multi-hook``, data-parallel): SIGTERM to rank 1 during the first
    runner's last step. Every rank finishes that runner (saved and evaluated) and stops before the
    next; --resume keeps it and trains the second."""
    sharded, _ = files
    out = tmp_path / "two"
    args = train_argv(cli_fields(tiny_model_dir), sharded, out, "--parallel", "data", "--no-multi-hook")
    worker = _worker(tmp_path, SIGNALLING_WORKER, "signalling.py")
    env = {"TEST_SIGNAL_RANK": "1", "TEST_SIGNAL_AT": "20", "TEST_SIGNAL_AFTER": "1"}  # 10 norm + 10 steps
    run = launch([worker, *args], timeout=240, env=env)
    assert run.returncode != 0
    line = (
        f"terminated (SIGTERM): train stopped; {SAE_IDS[0]} finished as the signal came, and the run stopped "
        f"before its next runner; the finished SAEs are in {out}: the same command with --resume continues"
    )
    assert run.stderr.count(line) == 1, run.stderr[-4000:]
    assert (out / SAE_IDS[0] / "eval_metrics.json").is_file() and not (out / SAE_IDS[1]).exists()
    run = launch(["-m", "sae_lens_t5gemma_cli", *args, "--resume"], timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count(f"resume   {SAE_IDS[0]}: finished, kept") == 1
    assert run.stdout.count(f"resume   {SAE_IDS[1]}: from the start") == 1
    assert all((out / s / "eval_metrics.json").is_file() for s in SAE_IDS)


def test_a_rank_killed_while_checkpointing_leaves_no_complete_folder_and_resume_continues(
    tiny_model_dir, files, tmp_path
):
    sharded, reference = files
    fields, out = cli_fields(tiny_model_dir), tmp_path / "two"
    args = train_argv(fields, sharded, out, "--parallel", "data", "--n-checkpoints", "3")
    started = time.monotonic()
    run = launch([_worker(tmp_path, KILLED_WORKER, "killed.py"), *args], timeout=240)
    took = time.monotonic() - started
    assert run.returncode != 0
    print(f"killed rank: the job ended after {took:.0f} s")
    assert took < 120  # bounded: gloo sees the closed connection at once, torchrun stops the job
    assert "Signal 9 (SIGKILL)" in run.stderr, run.stderr[-4000:]
    assert run.stderr.count("error: rank 0 stopped: another process of the job failed or was killed") == 1
    # Checkpoint thresholds every 640 tokens: the first (768) is complete, the second (1536) is
    # not (rank 1 died writing it): no record, so resume passes it over.
    folder = out / "checkpoints" / "multi-encoder"
    assert (folder / "768" / "t5gemma2_checkpoint.json").is_file()
    assert (folder / "1536").is_dir() and not (folder / "1536" / "t5gemma2_checkpoint.json").exists()
    assert not list(out.glob("*/eval_metrics.json"))
    assert checkpoints.latest_checkpoint(out, "multi-encoder")[0] == folder / "768"

    run = launch(["-m", "sae_lens_t5gemma_cli", *args, "--resume"], timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count(f"resume   multi-encoder: from {folder / '768'}") == 1
    close = _close_to(out, _uninterrupted(tiny_model_dir, reference, tmp_path))
    print("data, resumed against uninterrupted (mean cosine, relative W_dec difference):", close)
    for cosine, difference in close:  # measured: 0.997 and 0.996, within 7.6% and 9.2%
        assert cosine > 0.99 and 0 < difference < 0.2, close
