"""Harvest speed and peak memory of hooked activations: HookedT5Gemma2 vs TransformerBridge vs the floor.

Setup: a random-init T5Gemma 2 with the real 270m-270m text dimensions (speed does not depend
on weight values), the same fixed token batch for every run (default 8 x 128), float32, CPU,
``--threads`` torch threads. Hooks: the o_proj output (the mindchain SAE site) of encoder
layers 0, 5 and 17 and of decoder layer 5.

Three ways to get one hook's activations, each as its user would call it:

- ``hooked``: ``HookedT5Gemma2.run_with_cache(tokens, names_filter=[hook], stop_at_layer=L+1)``
  exactly as SAELens' ActivationsStore calls it;
- ``bridge``: TransformerLens' ``TransformerBridge.run_with_cache(tokens, names_filter=[hook],
  decoder_input=<tokens shifted right>)`` (same encoder and decoder inputs);
- ``floor``: plain transformers, ``model(input_ids, decoder_input_ids)`` with a PyTorch forward
  hook on the target o_proj that stores its output and raises to stop the forward pass.

Each (way, hook) runs in a fresh subprocess that loads the saved model, so memory numbers
do not leak between configurations. Speed: tokens per second of the median of ``--repeats``
timed runs after one warm-up. Peak memory: growth of the process's peak RSS (``VmHWM``,
reset through ``/proc/self/clear_refs``) during the first (warm-up) run over its RSS right
before it (all weights already resident), i.e. what one harvest call needs on top of the
loaded model. The worker also
counts LM-head calls: a hook-only run must make none (no 262k-vocab logits).

Usage:
    python benchmarks/bench_hooks.py            # the full measurement (minutes; use a quiet machine)
    python benchmarks/bench_hooks.py --quick    # fewer tokens and repeats, to check the script

Writes ``benchmarks/results/bench_hooks.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOOKS = (
    "encoder_blocks.0.attn.hook_out",
    "encoder_blocks.5.attn.hook_out",
    "encoder_blocks.17.attn.hook_out",
    "decoder_blocks.5.self_attn.hook_out",
)
METHODS = ("hooked", "bridge", "floor")
TINY_HOOKS = (
    "encoder_blocks.0.attn.hook_out",
    "encoder_blocks.1.attn.hook_out",
    "decoder_blocks.1.self_attn.hook_out",
)
TARGET_HOOK = "encoder_blocks.5.attn.hook_out"
TARGET_VS_FLOOR = 0.8
TARGET_VS_BRIDGE = 5.0
RESULTS = Path(__file__).parent / "results" / "bench_hooks.json"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration

    from sae_lens_t5gemma.model import sites as sites

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir
    hf = T5Gemma2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, hf.config.decoder.vocab_size, (args.batch, args.seq), generator=g)
    tokens[:, 0] = 2
    decoder_input = hf.prepare_decoder_input_ids_from_labels(tokens)
    site = sites.resolve(args.hook)

    lm_head_calls = [0]
    hf.lm_head.register_forward_pre_hook(lambda m, a: lm_head_calls.__setitem__(0, lm_head_calls[0] + 1))

    if args.method == "hooked":
        from sae_lens_t5gemma.model.hooked import HookedT5Gemma2

        model = HookedT5Gemma2(hf, tok)

        def run() -> torch.Tensor:
            _, cache = model.run_with_cache(tokens, names_filter=[args.hook], stop_at_layer=site.layer + 1)
            return cache[args.hook]

    elif args.method == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(model_dir, hf_model=hf, tokenizer=tok)

        def run() -> torch.Tensor:
            _, cache = bridge.run_with_cache(tokens, names_filter=[args.hook], decoder_input=decoder_input)
            return cache[args.hook]

    elif args.method == "floor":

        class Stop(Exception):
            pass

        store: dict[str, torch.Tensor] = {}

        def grab(_m: Any, _a: Any, out: torch.Tensor) -> None:
            store["x"] = out
            raise Stop

        hf.get_submodule(site.hf_module).register_forward_hook(grab)

        def run() -> torch.Tensor:
            with contextlib.suppress(Stop):
                hf(input_ids=tokens, decoder_input_ids=decoder_input, use_cache=False)
            return store.pop("x")

    else:
        raise ValueError(f"unknown method {args.method!r}")

    with torch.no_grad():
        # from_pretrained may leave weights as lazily paged-in file mappings; touch them all so
        # that the memory measured below is what a harvest call allocates, not weight paging.
        for t in (*hf.parameters(), *hf.buffers()):
            t.sum()
        rss_before = _status_kib("VmRSS")
        peak_reset = _reset_peak()
        t0 = time.perf_counter()
        first = run()
        warmup_s = time.perf_counter() - t0
        peak = _status_kib("VmHWM")
        lm_calls_first = lm_head_calls[0]
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            act = run()
            times.append(time.perf_counter() - t0)
    assert act.shape == first.shape == (args.batch, args.seq, hf.config.decoder.hidden_size), act.shape
    n_tokens = args.batch * args.seq
    return {
        "method": args.method,
        "hook": args.hook,
        "tokens_per_s": n_tokens / statistics.median(times),
        "tokens_per_s_best": n_tokens / min(times),
        "times_s": times,
        "warmup_s": warmup_s,
        "peak_rss_delta_mib": (peak - rss_before) / 1024 if peak_reset else None,
        "peak_rss_mib": peak / 1024,
        "rss_before_mib": rss_before / 1024,
        "lm_head_calls_per_run": lm_calls_first,
        "activation_checksum": float(act.double().abs().sum()),
    }


# --------------------------------------------------------------------------- driver


def _build_model_dir(folder: Path, tiny: bool) -> None:
    import torch

    from sae_lens_t5gemma.stand_in import synthetic as synthetic

    torch.manual_seed(0)
    model = synthetic.build_t5gemma2(real_dims=not tiny)
    model.save_pretrained(folder)
    synthetic.build_tokenizer(folder)


def _run_worker(args: argparse.Namespace, method: str, hook: str, model_dir: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--method",
        method,
        "--hook",
        hook,
        "--model-dir",
        str(model_dir),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} {hook} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]], hooks: tuple[str, ...]) -> str:
    by = {(r["method"], r["hook"]): r for r in rows}
    head = (
        f"{'hook':<38}{'hooked tok/s':>13}{'bridge tok/s':>13}{'floor tok/s':>12}"
        f"{'vs floor':>9}{'vs bridge':>10}{'peak MiB h/b/f':>22}{'LM head h/b/f':>15}"
    )
    lines = [head, "-" * len(head)]
    for hook in hooks:
        h, b, f = (by.get((m, hook)) for m in METHODS)
        if not (h and b and f):
            continue

        def mib(r: dict[str, Any]) -> str:
            v = r["peak_rss_delta_mib"]
            return "?" if v is None else f"{v:.0f}"

        lines.append(
            f"{hook:<38}{h['tokens_per_s']:>13.0f}{b['tokens_per_s']:>13.0f}{f['tokens_per_s']:>12.0f}"
            f"{h['tokens_per_s'] / f['tokens_per_s']:>8.2f}x{h['tokens_per_s'] / b['tokens_per_s']:>9.1f}x"
            f"{mib(h) + '/' + mib(b) + '/' + mib(f):>22}"
            f"{str(h['lm_head_calls_per_run']) + '/' + str(b['lm_head_calls_per_run']) + '/' + str(f['lm_head_calls_per_run']):>15}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="2 x 64 tokens, 2 repeats: checks the script, not the numbers"
    )
    p.add_argument(
        "--tiny", action="store_true", help="the tiny 2-layer model, hooks at layers 0/1 (smoke test)"
    )
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8; quick 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; quick 64)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs per configuration (default 5; quick 2)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of hooked,bridge,floor"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    p.add_argument("--model-dir", type=Path, default=None, help="reuse a saved model folder")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--hook", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (64 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 5)

    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {METHODS}")
    hooks = TINY_HOOKS if args.tiny else HOOKS

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_hooks_model_") as tmp:
        model_dir = args.model_dir or Path(tmp)
        if args.model_dir is None:
            print(
                f"building a random {'tiny' if args.tiny else 'real-dimension 270m-270m'} model ...",
                flush=True,
            )
            _build_model_dir(model_dir, args.tiny)
        for hook in hooks:
            for method in methods:
                r = _run_worker(args, method, hook, model_dir)
                rows.append(r)
                mem = r["peak_rss_delta_mib"]
                print(
                    f"  {method:<7}{hook:<38}{r['tokens_per_s']:>9.0f} tok/s (best {r['tokens_per_s_best']:.0f})   peak +"
                    f"{'?' if mem is None else f'{mem:.0f}'} MiB   LM head calls {r['lm_head_calls_per_run']}",
                    flush=True,
                )

    by = {(r["method"], r["hook"]): r for r in rows}
    ratios = {}
    for hook in hooks:
        h, b, f = (by.get((m, hook)) for m in METHODS)
        ratios[hook] = {
            "vs_floor": h["tokens_per_s"] / f["tokens_per_s"] if h and f else None,
            "vs_bridge": h["tokens_per_s"] / b["tokens_per_s"] if h and b else None,
        }
    target = ratios.get(TARGET_HOOK, {})
    targets = {
        "hook": TARGET_HOOK,
        "vs_floor_min": TARGET_VS_FLOOR,
        "vs_bridge_min": TARGET_VS_BRIDGE,
        "vs_floor": target.get("vs_floor"),
        "vs_bridge": target.get("vs_bridge"),
        "met": bool(
            target.get("vs_floor") is not None
            and target.get("vs_bridge") is not None
            and target["vs_floor"] >= TARGET_VS_FLOOR
            and target["vs_bridge"] >= TARGET_VS_BRIDGE
        ),
        "hooked_never_runs_lm_head": all(
            r["lm_head_calls_per_run"] == 0 for r in rows if r["method"] == "hooked"
        ),
    }
    import torch

    result = {
        "setup": {
            "model": "random init, T5Gemma 2 270m-270m text dimensions"
            if not args.tiny
            else "tiny random T5Gemma 2",
            "batch": args.batch,
            "seq": args.seq,
            "tokens_per_run": args.batch * args.seq,
            "repeats": args.repeats,
            "threads": args.threads,
            "dtype": "float32",
            "quick": args.quick,
            "torch": torch.__version__,
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "speed": "tokens / median wall time of the timed runs after one warm-up (best: / fastest run)",
            "memory": "peak RSS growth during the first run over the RSS right before it (fresh process each)",
        },
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(args.out)
    print()
    print(_table(rows, hooks))
    print()
    if target.get("vs_floor") is not None:
        print(
            f"target at {TARGET_HOOK}: {target['vs_floor']:.2f}x floor (>= {TARGET_VS_FLOOR}), "
            f"{target['vs_bridge']:.1f}x bridge (>= {TARGET_VS_BRIDGE}): {'MET' if targets['met'] else 'NOT MET'}"
        )
    print(f"hooked runs never call the LM head: {targets['hooked_never_runs_lm_head']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
