"""The GPU check: the first thing to run on a CUDA machine (``make gpu-check``), under 10 minutes.

Steps, each a subprocess with its own time limit, run in this order:

1. ``env``: torch and CUDA versions, the device's name, whether it runs bfloat16 natively and
   what ``dtype="auto"`` resolves to there (``sae_lens_t5gemma.model.dtypes``);
2. ``demo``: ``sae-lens-t5gemma demo --device DEVICE --dtype auto`` (bfloat16 on every CUDA GPU
   with bf16), every section;
3. ``tests``: the device-sensitive tests (the dtype contract, the HookedSAETransformer parity
   port, in float32, bfloat16 and float16) with ``SAE_LENS_T5GEMMA_TEST_DEVICE=DEVICE``;
4. ``bench_precision``: harvest speed and activation difference, float32 against bfloat16;
5. ``bench_training``: end-to-end training of one SAE (harvest + SAE step), model float32
   against the default ``auto``;
6. ``bench_distributed``: ``train`` under ``torchrun`` with nccl, tokens/s and memory per rank
   for N = 1 and, on a machine with 2 GPUs or more, N = 2 in both modes.

``--dry-run`` runs every step on the CPU at its smallest size (the demo's load and
hook-and-steer sections, the tests of the bfloat16 branch only, the benchmarks' ``--quick``
mode), so the script is exercised by the test suite and cannot rot on machines without a GPU.

Usage:
    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run       # anywhere: checks the script (about 1 minute)

Writes ``benchmarks/results/gpu_check.json`` (``gpu_check_dry_run.json`` with ``--dry-run``):
each step's command, exit code, wall time and output tail, plus the benchmarks' own JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
ENV_PROBE = """
import json, torch
from sae_lens_t5gemma.model import dtypes as dtypes
dev = {device!r}
cuda = torch.cuda.is_available()
print(json.dumps({{
    "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
    "device": dev, "device_name": torch.cuda.get_device_name(0) if cuda and dev.startswith("cuda") else "cpu",
    "cpu_native_bf16": dtypes.cpu_has_fast_bf16(), "fast_bf16_on_device": dtypes.fast_bf16(dev),
    "auto_dtype_on_device": str(dtypes.auto_dtype(dev)),
}}))
"""


def steps(device: str, dry_run: bool, out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) for each step."""
    py = sys.executable
    demo = [
        py,
        "-m",
        "sae_lens_t5gemma_cli",
        "demo",
        "--device",
        device,
        "--dtype",
        "auto",
        "--out",
        str(out / "demo"),
    ]
    tests = [
        py,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/model/test_dtypes.py",
        "tests/integration/test_hooked_sae_parity.py",
    ]
    precision = [
        py,
        "benchmarks/bench_precision.py",
        "--device",
        device,
        "--out",
        str(out / "bench_precision.json"),
    ]
    training = [py, "benchmarks/bench_training.py", "--only", "one", "--model-dtypes", "float32,auto",
                "--device", device, "--out", str(out / "bench_training.json")]  # fmt: skip
    distributed = [py, "benchmarks/bench_distributed.py", "--device", device,
                   "--out", str(out / "bench_distributed.json")]  # fmt: skip
    if dry_run:
        distributed.append("--quick")
        demo += ["--sections", "load,hook_and_steer"]
        tests += ["-k", "bfloat16"]
        precision.append("--quick")
        training.append("--quick")
    return [
        ("env", [py, "-c", ENV_PROBE.format(device=device)], 60),
        ("demo", demo, 180),
        ("tests", tests, 180),
        ("bench_precision", precision, 150),
        ("bench_training", training, 150),
        ("bench_distributed", distributed, 240),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="the device to check (default cuda)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at its smallest size")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default under benchmarks/results/)")
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run else args.device
    out_json = args.out or RESULTS / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    env = {**os.environ, "SAE_LENS_T5GEMMA_TEST_DEVICE": device, "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}  # fmt: skip
    env.pop("SAE_LENS_T5GEMMA_DTYPE", None)  # the check measures the defaults
    record: dict = {"device": device, "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d"), "steps": {}}
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, cmd, limit in steps(device, args.dry_run, Path(tmp)):
            print(f"== {name}: {' '.join(cmd[:2] if name == 'env' else cmd[:6])} ...", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
                rc, text, err = proc.returncode, proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as e:
                rc, text, err = 124, f"timed out after {limit} s\n{(e.stdout or b'')[-2000:]!r}", ""
            wall = time.perf_counter() - t0
            step = {
                "command": cmd,
                "rc": rc,
                "wall_s": round(wall, 1),
                "stdout": text[-3000:],
                "stderr": err[-2000:],
            }
            bench = Path(tmp) / f"{name}.json"
            if bench.is_file():
                step["result"] = json.loads(bench.read_text())
            if name == "env" and rc == 0:
                step["result"] = json.loads(text.strip().splitlines()[-1])
            record["steps"][name] = step
            print(f"   rc {rc} in {wall:.1f} s", flush=True)
            if rc != 0:
                failed.append(name)
                print(text[-1500:] + err[-1500:], flush=True)
    record["failed"] = failed
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out_json}; " + (f"FAILED: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
