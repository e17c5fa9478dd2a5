"""Load benchmark (issue 9, item 1): all 36 mindchain SAEs through ``SAE.from_pretrained``
against a raw ``torch.load(weights_only=True)`` of the same files.

Real dimensions (d_in 640, d_sae 4096, float32: 21 MB a file, 755 MB in all), random
weights, in a throwaway hub cache laid out as huggingface_hub's (``synthetic``), with the
hub online in principle (``HF_HUB_OFFLINE`` unset): the package finds each file in the
cache without asking the hub. The cache is warm (page cache) after one untimed pass of
each side. The sides alternate within each run; each number is the median of ``--runs``
runs, and the ratio is from the same process. Every validation stays on (shapes, fields,
strides, storages, dtypes, NaN/Inf).

Run: ``python benchmarks/bench_load.py [--runs 5]``; prints a table and writes
``benchmarks/results/bench_load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_load.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # SAELens warns on every SAE with model_from_pretrained_kwargs

    from sae_lens import SAE

    import sae_lens_t5gemma  # noqa: F401  (registers the release)
    from sae_lens_t5gemma import synthetic
    from sae_lens_t5gemma.registration import PACKAGE_RELEASE

    ids = [f"{s}/layer_{n}" for s in ("encoder", "decoder") for n in range(18)]
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        cache = Path(tmp)
        snapshot = synthetic.write_mindchain_repo(cache, 18, d_in=640, d_sae=4096)
        files = [
            snapshot / synthetic.mindchain_filename(s, n) for s in ("encoder", "decoder") for n in range(18)
        ]
        total = sum(f.stat().st_size for f in files)

        def raw() -> None:
            for f in files:
                torch.load(f, weights_only=True)

        def package() -> None:
            for sid in ids:
                SAE.from_pretrained(release=PACKAGE_RELEASE, sae_id=sid)

        sides = {"raw torch.load(weights_only=True)": raw, "SAE.from_pretrained (this package)": package}
        times: dict[str, list[float]] = {k: [] for k in sides}
        with synthetic.hub_settings(cache, offline=False):
            for fn in sides.values():  # warm the page cache and the code paths
                fn()
            for _ in range(args.runs):
                for name, fn in sides.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["raw torch.load(weights_only=True)"]
    rows = [
        {"side": k, "median_s": med[k], "runs_s": times[k], "ratio_vs_raw": med[k] / base, "MB_per_s": total / 1e6 / med[k]}
        for k in sides
    ]  # fmt: skip
    print(
        f"36 SAEs, 640x4096 float32, {total / 1e6:.0f} MB, warm cache, {args.runs} runs, {args.threads} threads"
    )
    print(f"{'side':<38}{'median s':>10}{'ratio':>8}{'MB/s':>9}")
    for r in rows:
        print(f"{r['side']:<38}{r['median_s']:>10.3f}{r['ratio_vs_raw']:>8.2f}{r['MB_per_s']:>9.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "load 36 mindchain SAEs (synthetic, real dims 640x4096, float32)",
                "synthetic": True,
                "site": "attn_out (o_proj output), encoder and decoder layers 0-17",
                "width": 4096,
                "bytes": total,
                "runs": args.runs,
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
