"""CLI start-up benchmark (issue 14, item 6): how long ``sae-lens-t5gemma`` takes to answer
``--help``, ``list``, an argument error and ``train --help``, in a fresh interpreter each time.

Two entries, run as the console script runs them:

- *entry*: ``sae_lens_t5gemma_cli.main`` (today's ``[project.scripts]`` target), which
  imports the package without registering it with SAELens;
- *old*: ``sae_lens_t5gemma.cli.main.main`` (the former target), which imports the package root
  and so SAELens and torch, to register the release, before it parses anything.

Each number is the median wall time of ``--runs`` subprocess runs (interpreter start
included); the two entries alternate within each round, and the ratio is old / entry from
the same rounds. The OS page cache is warm after one untimed round.

Run: ``python benchmarks/bench_cli.py [--runs 5]``; prints a table and writes
``benchmarks/results/bench_cli.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_cli.json"
ENTRIES = {
    "entry": "import sys, sae_lens_t5gemma_cli; sys.exit(sae_lens_t5gemma_cli.main())",
    "old": "import sys; from sae_lens_t5gemma.cli.main import main; sys.exit(main())",
}
# ``train --help`` reads each preset's values from TrainConfig (so torch loads): the one help page
# that is not instant, measured so that it stays a few seconds.
COMMANDS = {
    "--help": ["--help"],
    "list": ["list"],
    "bad argument": ["train", "--d-sae", "x"],
    "train --help": ["train", "--help"],
}
EXPECTED_RC = {"--help": 0, "list": 0, "bad argument": 2, "train --help": 0}


def _run(entry: str, argv: list[str], expected_rc: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", ENTRIES[entry], *argv], capture_output=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if p.returncode != expected_rc:
        raise RuntimeError(
            f"{entry} {argv}: exit {p.returncode}, expected {expected_rc}: {p.stderr[-500:]!r}"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    times: dict[str, dict[str, list[float]]] = {c: {e: [] for e in ENTRIES} for c in COMMANDS}
    for round_ in range(args.runs + 1):  # round 0 warms the page cache and is not counted
        for command, argv in COMMANDS.items():
            order = list(ENTRIES) if round_ % 2 == 0 else list(reversed(ENTRIES))
            for entry in order:
                t = _run(entry, argv, EXPECTED_RC[command])
                if round_:
                    times[command][entry].append(t)

    rows = []
    for command in COMMANDS:
        med = {e: statistics.median(times[command][e]) for e in ENTRIES}
        rows.append(
            {
                "command": command,
                "entry_s": round(med["entry"], 4),
                "old_s": round(med["old"], 4),
                "speedup": round(med["old"] / med["entry"], 1),
                "entry_runs_s": [round(t, 4) for t in times[command]["entry"]],
                "old_runs_s": [round(t, 4) for t in times[command]["old"]],
            }
        )
    print(f"{'command':<14}{'entry s':>10}{'old s':>10}{'old/entry':>11}")
    for r in rows:
        print(f"{r['command']:<14}{r['entry_s']:>10.3f}{r['old_s']:>10.3f}{r['speedup']:>10.1f}x")

    load = os.getloadavg()
    result = {
        "benchmark": "CLI start-up: median wall time of a fresh `sae-lens-t5gemma` process",
        "runs": args.runs,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15": [round(x, 2) for x in load],
        },
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
