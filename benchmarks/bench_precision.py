"""Harvest speed in float32 and bfloat16, each against the plain-transformers floor in the same precision.

Setup: a random-init T5Gemma 2 with the real 270m-270m text dimensions, in float32 and (a
copy) in bfloat16, both in one process; one fixed batch (default 8 x 128 tokens); CPU,
``--threads`` torch threads. Hooks: the o_proj output of encoder layer 5 and decoder layer 5.

For each hook, per repeat and in turn: ``HookedT5Gemma2.run_with_cache(..., stop_at_layer=L+1)``
(as SAELens' store calls it) and the floor (``bench_hooks``' floor: plain transformers with a
forward hook that raises right after the o_proj), in float32, then the same two in bfloat16.
Medians of ``--repeats`` repeats after a warm-up. Every ratio comes from this one process.

Also: the relative difference of the activations, ||a_bf16 - a_fp32|| / ||a_fp32||; the weights'
bytes in each precision; and whether this CPU has native bf16 (``dtypes.cpu_has_fast_bf16``),
which is what ``dtype="auto"`` decides by.

Usage:
    python benchmarks/bench_precision.py            # about 3 minutes here
    python benchmarks/bench_precision.py --quick    # 2 x 32 tokens, 1 repeat: checks the script

Writes ``benchmarks/results/bench_precision.json`` (``..._quick.json`` with ``--quick``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
HOOKS = ("encoder_blocks.5.attn.hook_out", "decoder_blocks.5.self_attn.hook_out")


class _Stop(Exception):
    pass


def _floor(hf: Any, module: str, tokens: Any, decoder_input: Any) -> Any:
    """Plain transformers up to the hooked o_proj (bench_hooks.py's floor)."""
    store: dict[str, Any] = {}

    def grab(_m: Any, _a: Any, out: Any) -> None:
        store["x"] = out
        raise _Stop

    handle = hf.get_submodule(module).register_forward_hook(grab)
    try:
        with contextlib.suppress(_Stop):
            hf(input_ids=tokens, decoder_input_ids=decoder_input, use_cache=False)
    finally:
        handle.remove()
    return store.pop("x")


def run(batch: int, seq: int, repeats: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    from sae_lens_t5gemma.model import dtypes as dtypes
    from sae_lens_t5gemma.model import sites as sites
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
    from sae_lens_t5gemma.stand_in import synthetic as synthetic

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = synthetic.build_tokenizer(tmp)
    hf32 = synthetic.build_t5gemma2(real_dims=True).to(device)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)

    def sync() -> None:  # CUDA runs asynchronously: time whole kernels
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    models = {
        "float32": (hf32, HookedT5Gemma2(hf32, tokenizer, convention="reconstruct")),
        "bfloat16": (hf16, HookedT5Gemma2(hf16, tokenizer, convention="reconstruct")),
    }
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, hf32.config.decoder.vocab_size, (batch, seq), generator=g)
    tokens[:, 0] = 2
    tokens = tokens.to(device)
    # The floor feeds what the hooked model feeds under "reconstruct": the row, shifted right.
    decoder_input = hf32.prepare_decoder_input_ids_from_labels(tokens)
    rows: dict[str, Any] = {}
    with torch.no_grad():
        for hook in HOOKS:
            site = sites.resolve(hook)
            times: dict[str, list[float]] = {}
            acts: dict[str, Any] = {}
            for _ in range(repeats + 1):
                for dtype, (hf, model) in models.items():
                    sync()
                    t0 = time.perf_counter()
                    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=site.layer + 1)
                    sync()
                    times.setdefault(f"hooked_{dtype}", []).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    floor = _floor(hf, site.hf_module, tokens, decoder_input)
                    sync()
                    times.setdefault(f"floor_{dtype}", []).append(time.perf_counter() - t0)
                    acts[dtype] = cache[hook].float()
                    acts[f"floor_{dtype}"] = floor.float()
            med = {k: statistics.median(v[1:]) for k, v in times.items()}
            n = batch * seq
            a32, a16 = acts["float32"], acts["bfloat16"]
            rows[hook] = {
                "tokens_per_s": {k: n / v for k, v in med.items()},
                "median_s": med,
                "seconds": times,
                "hooked_vs_floor_fp32": med["floor_float32"] / med["hooked_float32"],
                "hooked_vs_floor_bf16": med["floor_bfloat16"] / med["hooked_bfloat16"],
                "bf16_vs_fp32_hooked": med["hooked_float32"] / med["hooked_bfloat16"],
                "bf16_vs_fp32_floor": med["floor_float32"] / med["floor_bfloat16"],
                "relative_difference": float((a16 - a32).norm() / a32.norm()),
                "hooked_equals_floor_fp32": bool(torch.equal(a32, acts["floor_float32"])),
            }
    weight_bytes = {
        d: sum(t.numel() * t.element_size() for t in (*hf.parameters(), *hf.buffers()))
        for d, (hf, _) in models.items()
    }
    return {
        "benchmark": "bench_precision",
        "setup": {
            "model": "random init, T5Gemma 2 270m-270m text dimensions",
            "batch": batch,
            "seq": seq,
            "repeats": repeats,
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "device": device,
            "cpu_model": dtypes.cpu_model(),
            "cpu_native_bf16": dtypes.cpu_has_fast_bf16(),
            "auto_dtype_here": str(dtypes.auto_dtype("cpu")),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "weights_gib": {d: b / 2**30 for d, b in weight_bytes.items()},
        "hooks": rows,
        "note": "ratios > 1: the numerator's time is longer, i.e. the second-named side is faster "
        "(bf16_vs_fp32 > 1 means bfloat16 is faster)",
    }


def table(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"batch {s['batch']} x {s['seq']} tokens, {s['threads']} threads, median of {s['repeats']}; "
        f"native bf16 on this CPU: {s['cpu_native_bf16']} (auto -> {s['auto_dtype_here']})",
        f"{'hook':<38}{'fp32 tok/s':>11}{'floor':>9}{'bf16 tok/s':>11}{'floor':>9}{'bf16/fp32':>10}{'rel.diff':>10}",
    ]
    for hook, r in result["hooks"].items():
        t = r["tokens_per_s"]
        lines.append(
            f"{hook:<38}{t['hooked_float32']:>11.0f}{t['floor_float32']:>9.0f}{t['hooked_bfloat16']:>11.0f}"
            f"{t['floor_bfloat16']:>9.0f}{r['bf16_vs_fp32_hooked']:>9.2f}x{r['relative_difference']:>9.2%}"
        )
    w = result["weights_gib"]
    lines.append(f"weights: float32 {w['float32']:.2f} GiB, bfloat16 {w['bfloat16']:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 x 32 tokens, 1 repeat: checks the script")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (gpu_check.py)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 32, 1
    load_before = os.getloadavg()
    result = run(args.batch, args.seq, args.repeats, args.threads, args.device)
    result["setup"]["load_average_before"] = load_before
    result["setup"]["load_average_after"] = os.getloadavg()
    result["quick"] = args.quick
    out = args.out or RESULTS / ("bench_precision_quick.json" if args.quick else "bench_precision.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"load average before/after: {load_before} / {result['setup']['load_average_after']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
