"""What saving the activation cache shuffled costs: ``cache_activations`` with and without the rewrite.

SAELens' ``CacheActivationsRunner(shuffle=True)`` shuffles a view it never saves; this package
saves the shuffled rows (``training.sae_lens_seams._save_shuffled``), which writes the cache a
second time. Setup: the random T5Gemma 2 with the real 270m-270m dimensions (as
``bench_training.py``), one encoder hook (``encoder.5.attn_out``, d_in 640), float32, contexts
of 512 tokens, ``--tokens`` tokens cached. Timed: the whole ``cache_activations`` call (harvest,
SAELens' shards and consolidation, then the rewrite) against the same call with the rewrite
switched off, in the same process; medians of ``--repeats`` runs, interleaved. The CPU model
and its bf16 support are recorded in ``benchmarks/results/bench_cache_shuffle.json``.

Usage:
    python benchmarks/bench_cache_shuffle.py             # 65,536 tokens (168 MB), 3 repeats
    python benchmarks/bench_cache_shuffle.py --quick     # 8,192 tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import _config, _setup  # noqa: E402

from sae_lens_t5gemma.model.dtypes import cpu_has_fast_bf16, cpu_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HOOK = "encoder.5.attn_out"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 8192, 1

    from sae_lens_t5gemma import training
    from sae_lens_t5gemma.training import sae_lens_seams

    saved = sae_lens_seams._save_shuffled
    times: dict[str, list[float]] = {"saved shuffled": [], "harvest order (SAELens)": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model, model_dir, data = _setup(tmp_path, args.threads)
        cfg = _config(
            model_dir, data, tmp_path / "out", hooks=[HOOK], training_tokens=args.tokens, context_size=512
        )
        size = 0
        for i in range(args.repeats):
            for name in times:
                sae_lens_seams._save_shuffled = saved if name == "saved shuffled" else (lambda d, f: d)
                cache = tmp_path / f"cache{i}-{len(times[name])}-{name[:5]}"
                t0 = time.perf_counter()
                paths = training.cache_activations(cfg, cache, model=model)
                times[name].append(time.perf_counter() - t0)
                size = sum(f.stat().st_size for f in paths[HOOK].rglob("*") if f.is_file())
                shutil.rmtree(cache)
        sae_lens_seams._save_shuffled = saved
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_native_bf16": cpu_has_fast_bf16(),
        "threads": args.threads,
        "setup": f"random T5Gemma 2 (real 270m-270m dims, SYNTHETIC weights), {HOOK}, float32, context 512",
        "tokens": args.tokens,
        "cache_mb": round(size / 1e6, 1),
        "repeats": args.repeats,
        "seconds": times,
        "median_s": medians,
        "ratio_saved_shuffled_over_harvest_order": medians["saved shuffled"]
        / medians["harvest order (SAELens)"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_cache_shuffle.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
