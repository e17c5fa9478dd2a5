"""``train`` under ``torchrun`` on CPU: tokens/s and peak RSS per rank for N = 1, 2, both modes.

Setup: the 2-layer stand-in T5Gemma 2 (``stand_in.synthetic.save_stand_in_model``; its width is
the tiny stand-in's, so the SAE step dominates, as it does at scale: see FACTS.md), four
encoder hooks (``encoder.{0,1}.attn_out`` and ``encoder.{0,1}.mlp_out``), BatchTopK k=32, d_sae
4096, global batches of 1024 tokens, float32, the stand-in corpus. Each run is a fresh
``torchrun`` job (N = 1: a plain process, which ignores ``parallel``); every rank times its own
``training.train`` call and reads its peak RSS (``ru_maxrss``) at the end.

- N = 1 runs with ``OMP_NUM_THREADS`` = the cores used by N = 2 (the whole budget in one
  process); N = 2 runs with ``OMP_NUM_THREADS=1`` per rank (torchrun's default), so both use the
  same cores.
- tokens/s = training tokens (SAE batches x global batch) / the slowest rank's ``train`` time
  (model load, norm estimate, training, saving and final evals included); medians of
  ``--repeats`` runs, interleaved.

Results go to ``benchmarks/results/distributed_<cpu>.json`` with the CPU model from
``/proc/cpuinfo``.

On CUDA (``--device cuda``, the GPU check's ``bench_distributed`` step) rank r runs on
``cuda:r`` with nccl and each rank also records its peak CUDA memory; with fewer than 2 GPUs
only N = 1 runs, and the JSON says why.

Usage:
    python benchmarks/bench_distributed.py            # 3 repeats (about 5 minutes on 2 cores)
    python benchmarks/bench_distributed.py --quick    # 1 repeat, fewer tokens: checks the script
    python benchmarks/bench_distributed.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HOOKS = ["encoder.0.attn_out", "encoder.1.attn_out", "encoder.0.mlp_out", "encoder.1.mlp_out"]

WORKER = """
import json, os, resource, sys, time
import torch
from sae_lens_t5gemma.training import TrainConfig, train
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
train(TrainConfig(**cfg))
if cfg["device"].startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
rank = int(os.environ.get("RANK", "0"))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cuda = torch.cuda.max_memory_allocated() / 2**20 if cfg["device"].startswith("cuda") else None
with open(cfg["out"] + f".rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "seconds": seconds, "peak_rss_mib": rss, "peak_cuda_mib": cuda}, f)
"""


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else "unknown"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:60]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(model: Path, data: Path, out: Path, tokens: int, mode: str, device: str) -> dict:
    return dict(device=device,
        model=str(model), hooks=HOOKS, dataset=str(data), out=str(out), architecture="batchtopk", k=32,
        d_sae=4096, training_tokens=tokens, train_batch_size_tokens=1024, context_size=33,
        store_batch_size_prompts=8, lr=3e-4, n_batches_for_norm_estimate=4, eval_every_n_steps=10**6,
        n_eval_batches=1, eval_batch_size_prompts=2, model_dtype="float32", seed=1, parallel=mode,
    )  # fmt: skip


def run_once(
    n: int, mode: str, model: Path, data: Path, folder: Path, tokens: int, threads: int, device: str
) -> dict:
    out = folder / f"{mode}_{n}_{time.monotonic_ns()}"
    script = folder / "worker.py"
    script.write_text(WORKER)
    cfg = json.dumps(_config(model, data, out, tokens, mode, device))
    if n == 1:
        cmd = [sys.executable, str(script), cfg]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), cfg,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{mode} N={n} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(n)]
    seconds = max(r["seconds"] for r in ranks)
    return {
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mib_per_rank": [round(r["peak_rss_mib"], 1) for r in ranks],
        "peak_cuda_mib_per_rank": [r["peak_cuda_mib"] and round(r["peak_cuda_mib"], 1) for r in ranks],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40 * 1024, help="training tokens per run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: rank r on cuda:r (nccl)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.tokens = 1, 8 * 1024
    import torch

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    # nccl puts each rank on its own GPU: N = 2 needs two of them.
    cases = (
        [(1, "modules"), (2, "modules"), (2, "data")]
        if args.device == "cpu" or gpus >= 2
        else [(1, "modules")]
    )
    skipped = None if len(cases) == 3 else f"N = 2 needs 2 GPUs (nccl, one per rank); this machine has {gpus}"

    from sae_lens_t5gemma import training
    from sae_lens_t5gemma.stand_in import synthetic

    cpu = cpu_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = synthetic.save_stand_in_model(folder / "model")
        texts = synthetic.stand_in_texts()
        docs = [" ".join(texts[(i + j) % len(texts)] for j in range(4)) for i in range(256)]
        data = training.write_text_dataset(docs, folder / "data.jsonl")
        runs: dict[str, list[dict]] = {f"{mode}_N{n}": [] for n, mode in cases}
        for _ in range(args.repeats):  # interleaved, so drift hits every case alike
            for n, mode in cases:
                run = run_once(n, mode, model, data, folder, args.tokens, threads=2, device=args.device)
                runs[f"{mode}_N{n}"].append(run)
                print(f"{mode} N={n}: {runs[f'{mode}_N{n}'][-1]}", flush=True)

    def summary(rs: list[dict]) -> dict:
        return {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 1),
            "seconds": round(statistics.median(r["seconds"] for r in rs), 2),
            "peak_rss_mib_per_rank": [
                round(statistics.median(r["peak_rss_mib_per_rank"][i] for r in rs), 1)
                for i in range(len(rs[0]["peak_rss_mib_per_rank"]))
            ],
            "peak_cuda_mib_per_rank": rs[-1]["peak_cuda_mib_per_rank"],
            "runs": rs,
        }

    results = {key: summary(rs) for key, rs in runs.items()}
    # N = 1 is one process whatever the mode: it is both modes' baseline.
    results["data_N1"] = results["modules_N1"]
    for mode in ("modules", "data"):
        if f"{mode}_N2" in results:
            results[f"{mode}_N2"]["speedup_over_N1"] = round(
                results[f"{mode}_N2"]["tokens_per_s"] / results[f"{mode}_N1"]["tokens_per_s"], 2
            )
    doc = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if gpus else None,
        "skipped": skipped,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "setup": {
            "model": "2-layer stand-in T5Gemma 2",
            "hooks": HOOKS,
            "architecture": "batchtopk k=32 d_sae=4096",
            "global_batch_tokens": 1024,
            "training_tokens": args.tokens,
            "threads": "N=1: OMP_NUM_THREADS=2; N=2: 1 per rank",
            "repeats": args.repeats,
            "tokens_per_s": "training tokens / the slowest rank's train() time (load, norm estimate, "
            "training, saving, final evals)",
        },
        "results": results,
    }
    where = _slug(torch.cuda.get_device_name(0)) if gpus else _slug(cpu)
    out = args.out or RESULTS / f"distributed_{where}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for key in [k for k in ("modules_N1", "modules_N2", "data_N2") if k in results]:
        r = results[key]
        print(
            f"{key:11s} {r['tokens_per_s']:9.1f} tokens/s  peak RSS per rank {r['peak_rss_mib_per_rank']} MiB"
            + (f"  x{r['speedup_over_N1']}" if "speedup_over_N1" in r else "")
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
