"""``train`` under ``torchrun`` (sae_lens_t5gemma.training.distributed): 2 CPU processes, gloo.

Module-parallel against a one-process run with the same global batch (bit for bit), also
through the ``train`` command line; data-parallel against the same one-process run (standard,
topk, batchtopk, matryoshka and jumprelu within 1e-5 relative in float32 over these 10 steps),
its no-sync control failing that tolerance,
its replicas bit-identical at the end; the output layout, the refusals made before any model
loads, and a failing rank bringing the job down.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_t5gemma import training
from sae_lens_t5gemma.stand_in import synthetic as synthetic
from sae_lens_t5gemma.training import distributed

pytestmark = pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted")

CONTEXT = 33  # 32 rows per document once BOS is dropped
BATCH = 256  # global batch: 8 documents, 4 per rank
DOCS_PER_RANK_BATCH = 4
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _documents() -> list[str]:
    """128 documents, each longer than a row (so every one gives exactly CONTEXT - 1 rows)."""
    texts = synthetic.stand_in_texts()
    return [" ".join(texts[(i + j) % len(texts)] for j in range(4)) for i in range(128)]


def _interleaved(docs: list[str], n: int) -> list[str]:
    """The order in which a one-process run reads the rows that N ranks read: rank r holds
    documents r, r + N, ... (``split_dataset_by_node``); each global batch is rank 0's block,
    then rank 1's, ..."""
    shards = [docs[r::n] for r in range(n)]
    out = []
    for k in range(0, len(shards[0]), DOCS_PER_RANK_BATCH):
        for shard in shards:
            out += shard[k : k + DOCS_PER_RANK_BATCH]
    return out


def _config(model_dir: Path, data: Path, out: Path, **overrides) -> dict:
    cfg = dict(
        model=str(model_dir), hooks=["encoder.0.attn_out", "encoder.1.attn_out"], dataset=str(data),
        out=str(out), architecture="topk", k=8, d_sae=64, training_tokens=10 * BATCH,
        train_batch_size_tokens=BATCH, context_size=CONTEXT, store_batch_size_prompts=4, lr=3e-3,
        activations_mixing_fraction=0.0, n_batches_for_norm_estimate=2, eval_every_n_steps=10_000,
        n_eval_batches=1, eval_batch_size_prompts=2, model_dtype="float32", seed=7,
    )  # fmt: skip
    cfg.update(overrides)
    return cfg


FAILING_WORKER = """
import json, os, sys
from sae_lens_t5gemma.training import TrainConfig, runner, train
if os.environ["RANK"] == "1":
    def broken(plan):
        raise RuntimeError("rank 1 cannot load its model")
    runner._load_model = broken
train(TrainConfig(**json.loads(sys.argv[1])))
"""


def _torchrun(cfg: dict, tmp_path: Path, timeout: int = 240, worker: str = WORKER, env: dict | None = None):
    script = tmp_path / "worker.py"
    script.write_text(worker)
    return _launch([str(script), json.dumps(cfg)], timeout, env)


def _launch(args: list[str], timeout: int, env: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


REPO = Path(__file__).resolve().parents[2]


def _one_process(cfg: dict | training.TrainConfig) -> training.TrainingResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as under torchrun: the same reduction order in every matmul
    try:
        return training.train(cfg if isinstance(cfg, training.TrainConfig) else training.TrainConfig(**cfg))
    finally:
        torch.set_num_threads(threads)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _weights(out: Path, sae_id: str) -> dict[str, torch.Tensor]:
    return load_file(out / sae_id / "sae_weights.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist_data")
    docs = _documents()
    sharded = training.write_text_dataset(docs, folder / "sharded.jsonl")
    reference = training.write_text_dataset(_interleaved(docs, 2), folder / "reference.jsonl")
    return sharded, reference


@pytest.mark.slow  # two torchrun jobs and a reference run: about 70 s together
def test_module_parallel_equals_one_process_bit_for_bit(tiny_model_dir, files, tmp_path):
    sharded, reference = files
    run = _torchrun(_config(tiny_model_dir, sharded, tmp_path / "two", parallel="modules"), tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]

    one = _reference("topk", tiny_model_dir, reference, tmp_path / "one")

    for sae_id in ("encoder.0.attn_out", "encoder.1.attn_out"):
        a, b = _weights(tmp_path / "two", sae_id), _weights(tmp_path / "one", sae_id)
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


def test_refusals_name_the_reason(tiny_model_dir, files, tmp_path):
    sharded, _ = files
    plan = training.plan_training(training.TrainConfig(**_config(tiny_model_dir, sharded, tmp_path / "o")))
    assert distributed.choose_mode(plan, 2) == "modules"  # auto: 2 encoder hooks, 2 ranks
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        distributed.choose_mode(plan, 3)
    modules = replace(plan, config=replace(plan.config, parallel="modules"))
    with pytest.raises(ValueError, match="at least 4 hooks per stack"):
        distributed.choose_mode(modules, 4)
    data = replace(plan, config=replace(plan.config, parallel="data"))
    assert distributed.choose_mode(data, 2) == "data"
    assert distributed.choose_mode(plan, 4) == "data"  # auto: fewer hooks than ranks
    single = replace(data, config=replace(data.config, multi_hook=False))
    with pytest.raises(ValueError, match="parallel='data'.*multi_hook=True"):
        distributed.choose_mode(single, 2)
    whitened = replace(data, config=replace(data.config, normalize_activations="covariance_whitening"))
    with pytest.raises(ValueError, match="cannot synchronise normalize_activations='covariance_whitening'"):
        distributed.choose_mode(whitened, 2)
    assert "every rank holds every SAE" in distributed.describe(plan, 2, "data")
    with pytest.raises(ValueError, match="parallel must be auto, modules or data"):
        training.plan_training(
            training.TrainConfig(**_config(tiny_model_dir, sharded, tmp_path / "o", parallel="x"))
        )
    lines = distributed.describe(plan, 2, "modules")
    assert "rank 0 encoder: encoder.0.attn_out" in lines and "rank 1 encoder: encoder.1.attn_out" in lines


@pytest.mark.slow
def test_failing_rank_brings_the_job_down(tiny_model_dir, files, tmp_path):
    """Rank 1 refuses its model (no such folder): the job ends with an error, soon, not a hang."""
    sharded, _ = files
    cfg = _config(tiny_model_dir, sharded, tmp_path / "out", parallel="modules")
    run = _torchrun(cfg, tmp_path, timeout=200, worker=FAILING_WORKER)
    assert run.returncode != 0
    assert run.stderr.count("rank 1 cannot load its model") >= 1
    assert not (tmp_path / "out" / "encoder.0.attn_out" / "eval_metrics.json").exists()


SAE_IDS = ("encoder.0.attn_out", "encoder.1.attn_out")
_REFERENCES: dict[str, tuple[Path, training.TrainingResult]] = {}


def _reference(arch: str, model_dir: Path, data: Path, out: Path) -> training.TrainingResult:
    """The one-process run of ``DATA_CASES[arch]`` on the interleaved data, trained once per session
    and copied to ``out`` (the module-parallel, data-parallel and control tests share it)."""
    import shutil

    if arch not in _REFERENCES:
        first = out.parent / f"reference_{arch}"
        _REFERENCES[arch] = (first, _one_process(_config(model_dir, data, first, **DATA_CASES[arch])))
    first, result = _REFERENCES[arch]
    if out != first:
        shutil.copytree(first, out)
    return result


TOLERANCE = 1e-5


def _largest_difference(two: Path, one: Path) -> float:
    worst = 0.0
    for sae_id in SAE_IDS:
        a, b = _weights(two, sae_id), _weights(one, sae_id)
        assert a.keys() == b.keys()
        worst = max(worst, *(_relative(a[k], b[k]) for k in a))
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
    run = _torchrun(_config(tiny_model_dir, sharded, tmp_path / "two", parallel="data", **extra), tmp_path)
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


@pytest.mark.slow
def test_data_parallel_without_gradient_averaging_fails_the_tolerance(tiny_model_dir, files, tmp_path):
    """The control: each replica steps on its own gradient; the run must not pass as equal."""
    sharded, reference = files
    cfg = _config(tiny_model_dir, sharded, tmp_path / "two", parallel="data")
    run = _torchrun(cfg, tmp_path, env={"TEST_AVERAGE_GRADIENTS": "0"})
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
    fields = dict(
        model=str(tiny_model_dir), hooks=list(SAE_IDS), architecture="topk", k=8, d_sae=64,
        training_tokens=10 * BATCH, train_batch_size_tokens=BATCH, context_size=CONTEXT,
        store_batch_size_prompts=4, lr=3e-3, activations_mixing_fraction=0.0, eval_every_n_steps=10_000,
        n_eval_batches=1, model_dtype="float32", seed=7, device="cpu",
    )  # fmt: skip
    args = ["-m", "sae_lens_t5gemma_cli", "train", str(tiny_model_dir), "--parallel", "modules"]
    for name, value in fields.items():
        if name == "hooks":
            args += [a for h in value for a in ("--hook", h)]
        elif name != "model":
            args += ["--top-k" if name == "k" else "--" + name.replace("_", "-"), str(value)]
    args += ["--dataset", str(sharded), "--out", str(tmp_path / "two")]
    run = _launch(args, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("parallel modules on 2 processes") == 1  # rank 0 alone reports
    one = _one_process(
        training.TrainConfig.from_preset(
            "recommended", **fields, dataset=str(reference), out=str(tmp_path / "one")
        )
    )
    for sae_id in SAE_IDS:
        loaded = SAE.load_from_disk(str(tmp_path / "two" / sae_id))
        assert loaded.cfg.metadata.hook_name == one.saes[sae_id].cfg.metadata.hook_name
        for name, value in one.saes[sae_id].state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), (sae_id, name)
