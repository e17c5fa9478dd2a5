"""``benchmarks/gpu_check.py --dry-run``: every step of the GPU check runs on the CPU, so it cannot rot.

The dry run executes the same six steps as on a CUDA machine (environment probe, the demo's
load and hook-and-steer sections with ``--dtype auto``, the bfloat16 tests of the dtype
contract and the parity port, ``bench_precision --quick``, ``bench_training --quick`` with
float32 against ``auto``, ``bench_distributed --quick`` under torchrun), each in a subprocess;
the test reads the JSON it writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert (record["device"], record["dry_run"], record["failed"]) == ("cpu", True, [])
    steps = record["steps"]
    assert list(steps) == ["env", "demo", "tests", "bench_precision", "bench_training", "bench_distributed"]
    assert all(s["rc"] == 0 for s in steps.values())
    env = steps["env"]["result"]
    assert env["device"] == "cpu" and env["auto_dtype_on_device"] in ("torch.bfloat16", "torch.float32")
    auto = env["auto_dtype_on_device"].removeprefix("torch.")
    assert f"(SYNTHETIC, {auto}), SAE encoder/layer_5" in steps["demo"]["stdout"]
    assert " passed" in steps["tests"]["stdout"] and " failed" not in steps["tests"]["stdout"]
    precision = steps["bench_precision"]["result"]
    assert all(h["relative_difference"] < 0.05 for h in precision["hooks"].values())
    training = steps["bench_training"]["result"]
    assert training["one"]["model_dtype"] == "float32"
    assert training["one@auto"]["model_dtype"] == auto
    distributed = steps["bench_distributed"]["result"]
    assert (distributed["device"], distributed["skipped"]) == ("cpu", None)
    assert set(distributed["results"]) == {"modules_N1", "data_N1", "modules_N2", "data_N2"}
    assert all(
        len(distributed["results"][k]["peak_rss_mib_per_rank"]) == 2 for k in ("modules_N2", "data_N2")
    )
