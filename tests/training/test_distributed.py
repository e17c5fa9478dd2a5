"""``train`` under ``torchrun`` (sae_lens_t5gemma.training.distributed): 2 CPU processes, gloo.

Module-parallel against a one-process run with the same global batch (bit for bit, standard,
topk, batchtopk, matryoshka and jumprelu), also
through the ``train`` command line; data-parallel against the same one-process run (standard,
topk, batchtopk, matryoshka and jumprelu within 1e-5 relative in float32 over these 10 steps),
its no-sync control failing that tolerance,
its replicas bit-identical at the end; the output layout, the refusals made before any model
loads, and a failing rank bringing the job down.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchrun_jobs import (
    SAE_IDS,
    cli_fields,
    config,
    launch,
    one_process,
    relative,
    torchrun,
    train_argv,
    weights,
)

from sae_lens_t5gemma import training
from sae_lens_t5gemma.training import distributed

pytestmark = pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted")

WORKER = """
import json, os, sys
from pathlib import Path
from sae_lens_t5gemma.training import TrainConfig, distributed, train
# The no-sync control switches gradient averaging off; every rank records its replicas' digests.
distributed.AVERAGE_GRADIENTS = os.environ.get("TEST_AVERAGE_GRADIENTS", "1") == "1"
verify = distributed.verify_replicas
def recorded(saes, ranks):
    try:
        digests, error = verify(saes, ranks), None
    except RuntimeError as e:  # the no-sync control goes on to save rank 0's replica
        if distributed.AVERAGE_GRADIENTS:
            raise
        digests, error = {}, str(e)
    cfg = json.loads(sys.argv[1])
    Path(cfg["out"] + f".digests{ranks.rank}.json").write_text(json.dumps({"digests": digests, "error": error}))
    return digests
distributed.verify_replicas = recorded
train(TrainConfig(**json.loads(sys.argv[1])))
"""


FAILING_WORKER = """
import os, sys
from sae_lens_t5gemma.cli.main import main
from sae_lens_t5gemma.training import runner
if os.environ["RANK"] == "1":
    def broken(plan):
        raise RuntimeError("rank 1 cannot load its model")
    runner._load_model = broken
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # per architecture: one torchrun job and a one-process run, about 15 s
@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "matryoshka", "jumprelu"])
def test_module_parallel_equals_one_process_bit_for_bit(tiny_model_dir, files, tmp_path, arch):
    sharded, reference = files
    extra = DATA_CASES[arch]
    run = torchrun(
        config(tiny_model_dir, sharded, tmp_path / "two", parallel="modules", **extra), tmp_path, WORKER
    )
    assert run.returncode == 0, run.stderr[-4000:]

    one = _reference(arch, tiny_model_dir, reference, tmp_path / "one")

    for sae_id in ("encoder.0.attn_out", "encoder.1.attn_out"):
        a, b = weights(tmp_path / "two", sae_id), weights(tmp_path / "one", sae_id)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (sae_id, name, (a[name] - b[name]).abs().max())
        # The saved folder looks like a one-process run's.
        cfg_two = json.loads((tmp_path / "two" / sae_id / "cfg.json").read_text())
        cfg_one = json.loads((tmp_path / "one" / sae_id / "cfg.json").read_text())
        cfg_two["metadata"].pop("dataset_path"), cfg_one["metadata"].pop("dataset_path")
        assert cfg_two == cfg_one
    names = lambda p: sorted(str(q.relative_to(p)) for q in p.rglob("*") if ".lock" not in q.name)  # noqa: E731
    assert names(tmp_path / "two") == names(tmp_path / "one")
    assert one.paths.keys() == {"encoder.0.attn_out", "encoder.1.attn_out"}
    # runner_cfg.json names every SAE, as one process's does; the summary records the job.
    runner_two = json.loads((tmp_path / "two" / "runner_cfg.json").read_text())
    runner_one = json.loads((tmp_path / "one" / "runner_cfg.json").read_text())
    assert (
        runner_two["hook_names"] == runner_one["hook_names"]
        and runner_two["saes"].keys() == runner_one["saes"].keys()
    )
    summary = lambda p: json.loads((p / "training_summary.json").read_text())["processes"]  # noqa: E731
    assert summary(tmp_path / "one") == {"world_size": 1, "parallel": None}
    assert summary(tmp_path / "two") == {
        "world_size": 2, "parallel": "modules", "final_evals": "on rank 0, on batches of its shard of the documents"
    }  # fmt: skip


def test_refusals_name_the_reason(tiny_model_dir, files, tmp_path):
    sharded, _ = files
    plan = training.plan_training(training.TrainConfig(**config(tiny_model_dir, sharded, tmp_path / "o")))
    assert distributed.choose_mode(plan, 2) == "modules"  # auto: 2 encoder hooks, 2 ranks
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        distributed.choose_mode(plan, 3)
    modules = replace(plan, config=replace(plan.config, parallel="modules"))
    with pytest.raises(ValueError, match="at least 4 hooks per stack"):
        distributed.choose_mode(modules, 4)
    data = replace(plan, config=replace(plan.config, parallel="data"))
    assert distributed.choose_mode(data, 2) == "data"
    assert distributed.choose_mode(plan, 4) == "data"  # auto: fewer hooks than ranks
    assert distributed.choose_mode(replace(data, config=replace(data.config, multi_hook=False)), 2) == "data"
    single = replace(modules, config=replace(modules.config, multi_hook=False))
    with pytest.raises(
        ValueError, match="parallel='modules' shares one forward among SAEs: it needs multi_hook=True"
    ):
        distributed.choose_mode(single, 2)
    whitened = replace(data, config=replace(data.config, normalize_activations="covariance_whitening"))
    with pytest.raises(ValueError, match="cannot synchronise normalize_activations='covariance_whitening'"):
        distributed.choose_mode(whitened, 2)
    assert "every rank holds every SAE" in distributed.describe(plan, 2, "data")
    with pytest.raises(ValueError, match="parallel must be auto, modules or data"):
        training.plan_training(
            training.TrainConfig(**config(tiny_model_dir, sharded, tmp_path / "o", parallel="x"))
        )
    lines = distributed.describe(plan, 2, "modules")
    assert "rank 0 encoder: encoder.0.attn_out" in lines and "rank 1 encoder: encoder.1.attn_out" in lines


@pytest.mark.slow
def test_failing_rank_brings_the_job_down(tiny_model_dir, files, tmp_path):
    """Rank 1 fails to load its model (``train`` on the command line): the job ends soon, not in a
    hang, with rank 1's error printed once (rank 0 is stopped by torchrun, or says in one line that
    another process failed), and no SAE folder looks finished."""
    import time

    sharded, _ = files
    script = tmp_path / "failing.py"
    script.write_text(FAILING_WORKER)
    started = time.monotonic()
    args = train_argv(cli_fields(tiny_model_dir), sharded, tmp_path / "out", "--parallel", "modules")
    run = launch([str(script), *args], timeout=200)
    took = time.monotonic() - started
    print(f"failing rank: the job ended after {took:.0f} s")
    assert run.returncode != 0 and took < 120
    assert run.stderr.count("error: rank 1: RuntimeError: rank 1 cannot load its model") == 1, run.stderr[
        -3000:
    ]
    assert run.stderr.count("cannot load its model") == 1  # no second report from rank 0
    assert not list((tmp_path / "out").glob("*/eval_metrics.json"))


_REFERENCES: dict[str, tuple[Path, training.TrainingResult]] = {}


def _reference(arch: str, model_dir: Path, data: Path, out: Path) -> training.TrainingResult:
    """The one-process run of ``DATA_CASES[arch]`` on the interleaved data, trained once per session
    and copied to ``out`` (the module-parallel, data-parallel and control tests share it)."""
    import shutil

    if arch not in _REFERENCES:
        first = out.parent / f"reference_{arch}"
        _REFERENCES[arch] = (first, one_process(config(model_dir, data, first, **DATA_CASES[arch])))
    first, result = _REFERENCES[arch]
    if out != first:
        shutil.copytree(first, out)
    return result


TOLERANCE = 1e-5


def _largest_difference(two: Path, one: Path) -> float:
    worst = 0.0
    for sae_id in SAE_IDS:
        a, b = weights(two, sae_id), weights(one, sae_id)
        assert a.keys() == b.keys()
        worst = max(worst, *(relative(a[k], b[k]) for k in a))
    return worst


DATA_CASES = {
    "standard": dict(architecture="standard", k=None, l1=1e-3),
    "topk": dict(architecture="topk"),
    "batchtopk": dict(architecture="batchtopk"),
    "matryoshka": dict(architecture="matryoshka"),
    "jumprelu": dict(architecture="jumprelu"),
}


@pytest.mark.slow  # per architecture: one torchrun job and a one-process run, about 15 s
@pytest.mark.parametrize("arch", list(DATA_CASES))
def test_data_parallel_equals_one_process(tiny_model_dir, files, tmp_path, arch):
    sharded, reference = files
    extra = DATA_CASES[arch]
    run = torchrun(
        config(tiny_model_dir, sharded, tmp_path / "two", parallel="data", **extra), tmp_path, WORKER
    )
    assert run.returncode == 0, run.stderr[-4000:]
    _reference(arch, tiny_model_dir, reference, tmp_path / "one")
    difference = _largest_difference(tmp_path / "two", tmp_path / "one")
    print(f"{arch}: largest relative difference {difference:.2e}")
    assert difference <= TOLERANCE, difference
    # Replicas bit-identical at the end (sha256 of every SAE's state on each rank).
    digests = [json.loads((tmp_path / f"two.digests{r}.json").read_text())["digests"] for r in (0, 1)]
    assert digests[0] == digests[1] and digests[0].keys() == set(SAE_IDS)
    names = lambda p: sorted(str(q.relative_to(p)) for q in p.rglob("*") if ".lock" not in q.name)  # noqa: E731
    assert names(tmp_path / "two") == names(tmp_path / "one")


@pytest.mark.slow  # one torchrun job and a one-process run, about 15 s
def test_a_single_hook_trains_data_parallel(tiny_model_dir, files, tmp_path):
    """One hook (fewer than the ranks, so ``auto`` picks data): SAELens' single-SAE runner, its
    trainer a replica on each rank; BatchTopK with the norm estimate, against one process."""
    sharded, reference = files
    extra = dict(hooks=["encoder.1.attn_out"], architecture="batchtopk")
    run = torchrun(config(tiny_model_dir, sharded, tmp_path / "two", **extra), tmp_path, WORKER)
    assert run.returncode == 0, run.stderr[-4000:]
    one_process(config(tiny_model_dir, reference, tmp_path / "one", **extra))
    a, b = weights(tmp_path / "two", "encoder.1.attn_out"), weights(tmp_path / "one", "encoder.1.attn_out")
    difference = max(relative(a[k], b[k]) for k in b)
    print(f"single hook, batchtopk: largest relative difference {difference:.2e}")
    assert a.keys() == b.keys() and difference <= TOLERANCE, difference
    digests = [json.loads((tmp_path / f"two.digests{r}.json").read_text())["digests"] for r in (0, 1)]
    assert digests[0] == digests[1] and list(digests[0]) == ["encoder.1.attn_out"]
    names = lambda p: sorted(str(q.relative_to(p)) for q in p.rglob("*") if ".lock" not in q.name)  # noqa: E731
    assert names(tmp_path / "two") == names(tmp_path / "one")


@pytest.mark.slow
def test_data_parallel_without_gradient_averaging_fails_the_tolerance(tiny_model_dir, files, tmp_path):
    """The control: each replica steps on its own gradient; the run must not pass as equal."""
    sharded, reference = files
    cfg = config(tiny_model_dir, sharded, tmp_path / "two", parallel="data")
    run = torchrun(cfg, tmp_path, WORKER, env={"TEST_AVERAGE_GRADIENTS": "0"})
    assert run.returncode == 0, run.stderr[-4000:]
    # The replicas diverge, and the end-of-training check says so.
    record = json.loads((tmp_path / "two.digests0.json").read_text())
    assert "replicas differ between ranks" in record["error"], record
    _reference("topk", tiny_model_dir, reference, tmp_path / "one")
    difference = _largest_difference(tmp_path / "two", tmp_path / "one")
    print(f"no-sync control: largest relative difference {difference:.2e}")
    assert difference > 100 * TOLERANCE, difference


@pytest.mark.slow
def test_train_command_under_torchrun(tiny_model_dir, files, tmp_path):
    """``torchrun -m sae_lens_t5gemma_cli train ... --parallel modules``: plain SAELens loads the SAEs,
    and they equal a one-process run's bit for bit."""
    from sae_lens import SAE

    sharded, reference = files
    fields = cli_fields(tiny_model_dir)
    args = [
        "-m",
        "sae_lens_t5gemma_cli",
        *train_argv(fields, sharded, tmp_path / "two", "--parallel", "modules"),
    ]
    run = launch(args, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("parallel modules on 2 processes") == 1  # rank 0 alone reports
    one = one_process(
        training.TrainConfig.from_preset(
            "recommended", **fields, dataset=str(reference), out=str(tmp_path / "one")
        )
    )
    for sae_id in SAE_IDS:
        loaded = SAE.load_from_disk(str(tmp_path / "two" / sae_id))
        assert loaded.cfg.metadata.hook_name == one.saes[sae_id].cfg.metadata.hook_name
        for name, value in one.saes[sae_id].state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), (sae_id, name)
