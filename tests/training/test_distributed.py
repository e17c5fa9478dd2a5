"""``train`` under ``torchrun`` (sae_lens_t5gemma.training.distributed): 2 CPU processes, gloo.

Module-parallel against a one-process run with the same global batch (bit for bit), the output
layout, the refusals made before any model loads, and a failing rank bringing the job down.
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
import json, sys
from sae_lens_t5gemma.training import TrainConfig, train
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


def _torchrun(cfg: dict, tmp_path: Path, timeout: int = 240, worker: str = WORKER):
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(script), json.dumps(cfg),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


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

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as under torchrun: the same reduction order in every matmul
    try:
        one = training.train(training.TrainConfig(**_config(tiny_model_dir, reference, tmp_path / "one")))
    finally:
        torch.set_num_threads(threads)

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
    with pytest.raises(ValueError, match="at least 4 hooks per stack|parallel='data'"):
        distributed.choose_mode(plan, 4)
    modules = replace(plan, config=replace(plan.config, parallel="modules"))
    with pytest.raises(ValueError, match="at least 4 hooks per stack"):
        distributed.choose_mode(modules, 4)
    data = replace(plan, config=replace(plan.config, parallel="data"))
    with pytest.raises(ValueError, match="parallel='data'.*not available"):
        distributed.choose_mode(data, 2)
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
