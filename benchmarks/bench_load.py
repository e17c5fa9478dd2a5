"""Load benchmark (issue 9, item 1): all 36 mindchain SAEs through ``SAE.from_pretrained``
against a raw ``torch.load(weights_only=True)`` of the same files.

Real dimensions (d_in 640, d_sae 4096, float32: 21 MB a file, 756 MB in all), random
weights, in a throwaway hub cache laid out as huggingface_hub's (``synthetic``), with the
hub online in principle (``HF_HUB_OFFLINE`` unset): the package finds each file in the
cache without asking the hub. The cache is warm (page cache) after one untimed pass of
each side. Every validation stays on (shapes, fields, strides, storages, dtypes, NaN/Inf).

What each side does, exactly:

- *raw torch.load* (the baseline): ``torch.load(f, weights_only=True)`` of the 36 files,
  all 36 results kept until the side ends, as a user keeps 36 SAEs. It copies every byte
  of the file into fresh memory (so it reads all the data).
- *raw torch.load, each dropped at once*: the same, but each result is freed before the
  next file is read, so the allocator hands the same warm 21 MB buffers back 36 times. A
  best case for the baseline, shown for reference; the ratio is against the row above.
- *torch.load(mmap=True) + one sum per tensor*: the floor of a validated load (maps the
  file, reads every byte once on one thread as the package does, copies nothing),
  without SAELens.
- *SAE.from_pretrained*: the package (``torch.load(mmap=True)``, checks, one sum per
  tensor, SAELens builds the SAE on the meta device and takes the mapped tensors).

The sides alternate within each run; each number is the median of ``--runs`` runs, and
the ratios are from the same process. Wall time and process CPU time (all threads) are
both reported: on a shared machine the CPU time is the less noisy of the two.

Run: ``python benchmarks/bench_load.py [--runs 7]``; prints a table and writes
``benchmarks/results/bench_load.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

BASE = "raw torch.load(weights_only=True)"
PACKAGE = "SAE.from_pretrained (this package)"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_load.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # SAELens warns on every SAE with model_from_pretrained_kwargs

    from sae_lens import SAE

    import sae_lens_t5gemma  # noqa: F401  (registers the release)
    from sae_lens_t5gemma.loading.mindchain import _one_thread
    from sae_lens_t5gemma.loading.registration import PACKAGE_RELEASE
    from sae_lens_t5gemma.stand_in import synthetic as synthetic

    ids = [f"{s}/layer_{n}" for s in ("encoder", "decoder") for n in range(18)]
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        cache = Path(tmp)
        snapshot = synthetic.write_mindchain_repo(cache, 18, d_in=640, d_sae=4096)
        files = [
            snapshot / synthetic.mindchain_filename(s, n) for s in ("encoder", "decoder") for n in range(18)
        ]
        total = sum(f.stat().st_size for f in files)

        def raw() -> list[object]:
            return [torch.load(f, weights_only=True) for f in files]

        def raw_dropped() -> None:
            for f in files:
                torch.load(f, weights_only=True)

        def floor() -> list[object]:
            out = []
            for f in files:
                d = torch.load(f, weights_only=True, mmap=True)
                with _one_thread():  # summed as the package sums (see mindchain._one_thread)
                    out.append([float(t.sum()) for t in d.values() if isinstance(t, torch.Tensor)])
            return out

        def package() -> list[object]:
            return [SAE.from_pretrained(release=PACKAGE_RELEASE, sae_id=sid) for sid in ids]

        sides = {
            BASE: raw,
            "raw torch.load, each dropped at once": raw_dropped,
            "torch.load(mmap=True) + sum": floor,
            PACKAGE: package,
        }
        times: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        load_before = os.getloadavg()
        with synthetic.hub_settings(cache, offline=False):
            for fn in sides.values():  # warm the page cache and the code paths
                fn()
            for _ in range(args.runs):
                for name, fn in sides.items():
                    gc.collect()
                    c, t = time.process_time(), time.perf_counter()
                    kept = fn()
                    times[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
                    del kept  # freed outside the timed region, on both sides
        load_after = os.getloadavg()

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    rows = [
        {"side": k, "median_s": med[k], "runs_s": times[k], "ratio_vs_raw": med[k] / med[BASE],
         "median_cpu_s": med_cpu[k], "runs_cpu_s": cpu[k], "cpu_ratio_vs_raw": med_cpu[k] / med_cpu[BASE],
         "MB_per_s": total / 1e6 / med[k]}
        for k in sides
    ]  # fmt: skip
    print(
        f"36 SAEs, 640x4096 float32, {total / 1e6:.0f} MB, warm cache, {args.runs} runs, {args.threads} threads; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (1-minute)"
    )
    print(f"{'side':<40}{'wall s':>8}{'ratio':>7}{'cpu s':>8}{'ratio':>7}{'MB/s':>7}")
    for r in rows:
        print(
            f"{r['side']:<40}{r['median_s']:>8.3f}{r['ratio_vs_raw']:>7.2f}"
            f"{r['median_cpu_s']:>8.3f}{r['cpu_ratio_vs_raw']:>7.2f}{r['MB_per_s']:>7.0f}"
        )
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
                "load_average_before": load_before,
                "load_average_after": load_after,
                "baseline": BASE,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
