"""Launching ``train`` under ``torchrun`` in tests: 2 CPU processes, gloo on 127.0.0.1, each job
with a timeout; the data and the one-process reference they are compared with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_lens_t5gemma import training
from sae_lens_t5gemma.stand_in import synthetic

SAE_IDS = ("encoder.0.attn_out", "encoder.1.attn_out")
CONTEXT = 33  # 32 rows per document once BOS is dropped
BATCH = 256  # global batch: 8 documents, 4 per rank
DOCS_PER_RANK_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def documents() -> list[str]:
    """128 documents, each longer than a row (so every one gives exactly CONTEXT - 1 rows)."""
    texts = synthetic.stand_in_texts()
    return [" ".join(texts[(i + j) % len(texts)] for j in range(4)) for i in range(128)]


def interleaved(docs: list[str], n: int) -> list[str]:
    """The order in which a one-process run reads the rows that N ranks read: rank r holds
    documents r, r + N, ... (``split_dataset_by_node``); each global batch is rank 0's block,
    then rank 1's, ..."""
    shards = [docs[r::n] for r in range(n)]
    out = []
    for k in range(0, len(shards[0]), DOCS_PER_RANK_BATCH):
        for shard in shards:
            out += shard[k : k + DOCS_PER_RANK_BATCH]
    return out


def config(model_dir: Path, data: Path, out: Path, **overrides) -> dict:
    cfg = dict(
        model=str(model_dir), hooks=["encoder.0.attn_out", "encoder.1.attn_out"], dataset=str(data),
        out=str(out), architecture="topk", k=8, d_sae=64, training_tokens=10 * BATCH,
        train_batch_size_tokens=BATCH, context_size=CONTEXT, store_batch_size_prompts=4, lr=3e-3,
        activations_mixing_fraction=0.0, n_batches_for_norm_estimate=2, eval_every_n_steps=10_000,
        n_eval_batches=1, eval_batch_size_prompts=2, model_dtype="float32", seed=7,
    )  # fmt: skip
    cfg.update(overrides)
    return cfg


def torchrun(cfg: dict, tmp_path: Path, worker: str, timeout: int = 240, env: dict | None = None):
    """``worker`` (a Python script reading the config from argv[1]) under torchrun, 2 processes."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    return launch([str(script), json.dumps(cfg)], timeout, env)


def launch(args: list[str], timeout: int, env: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


REPO = Path(__file__).resolve().parents[2]


def one_process(cfg: dict | training.TrainConfig) -> training.TrainingResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as under torchrun: the same reduction order in every matmul
    try:
        return training.train(cfg if isinstance(cfg, training.TrainConfig) else training.TrainConfig(**cfg))
    finally:
        torch.set_num_threads(threads)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def weights(out: Path, sae_id: str) -> dict[str, torch.Tensor]:
    return load_file(out / sae_id / "sae_weights.safetensors")


def cli_fields(model_dir: Path) -> dict:
    """The settings of :func:`config` that ``train``'s command line takes (for ``from_preset``)."""
    return dict(
        model=str(model_dir), hooks=list(SAE_IDS), architecture="topk", k=8, d_sae=64,
        training_tokens=10 * BATCH, train_batch_size_tokens=BATCH, context_size=CONTEXT,
        store_batch_size_prompts=4, lr=3e-3, activations_mixing_fraction=0.0, eval_every_n_steps=10_000,
        n_eval_batches=1, model_dtype="float32", seed=7, device="cpu",
    )  # fmt: skip


def train_argv(fields: dict, data: Path, out: Path, *extra: str) -> list[str]:
    """``train MODEL --hook ... --dataset DATA --out OUT *extra`` for :func:`cli_fields`."""
    args = ["train", fields["model"]]
    for name, value in fields.items():
        if name == "hooks":
            args += [a for h in value for a in ("--hook", h)]
        elif name != "model":
            args += ["--top-k" if name == "k" else "--" + name.replace("_", "-"), str(value)]
    return [*args, "--dataset", str(data), "--out", str(out), *extra]
