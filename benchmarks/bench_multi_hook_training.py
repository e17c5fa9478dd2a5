"""Model-forward cost of harvesting SAE training activations at all 36 o_proj outputs: one pass vs one per hook.

Training SAEs on every o_proj output of T5Gemma 2 (``encoder.*.attn_out`` and
``decoder.*.attn_out``, the 36 mindchain sites) needs, for every token batch, the
activations at 36 hooks. Two ways, each exactly as SAELens' runners ask for them:

- ``one pass``: ``MultiSAETrainingRunner``'s store, ``ActivationsStore.get_multi_hook_activations``:
  one ``run_with_cache(tokens, names_filter=<36 hooks>, stop_at_layer=18)``;
- ``per hook``: 36 ``LanguageModelSAETrainingRunner`` runs, each store calling
  ``ActivationsStore.get_activations``: ``run_with_cache(tokens, names_filter=[hook],
  stop_at_layer=L+1)``, 36 passes. Encoder hooks run L+1 encoder layers; decoder hooks run the
  whole encoder and L+1 decoder layers.

Counting layer runs predicts the ratio: 36 for one pass against 171 + 495 = 666 per hook,
18.5x (decoder layers attend to the encoder too, so they cost a little more than encoder layers).
Neither way runs the 262k-vocab LM head. The SAE updates themselves are not timed: they
are the same in both ways.

Setup: a random-init T5Gemma 2 with the real 270m-270m text dimensions (speed does not depend
on weight values) wrapped in ``HookedT5Gemma2``, one fixed random token batch (default
8 x 128), float32. Before timing, both ways' activations are checked equal for every hook.
Speed: tokens of the batch divided by the time to get all 36 hooks' activations for it;
median of ``--repeats`` timed runs after the warm-up (which is the equality check).

Usage:
    python benchmarks/bench_multi_hook_training.py            # full measurement (use a quiet machine)
    python benchmarks/bench_multi_hook_training.py --quick    # 1 x 32 tokens, 1 timed run: checks the script
    python benchmarks/bench_multi_hook_training.py --device cuda

Writes ``benchmarks/results/bench_multi_hook_training.json`` (``..._quick.json`` with
``--quick``, or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _layer_runs(n_layers: int) -> tuple[int, int]:
    """Transformer layer runs for all 2 x n_layers o_proj hooks: (one pass, one pass per hook)."""
    encoder = sum(layer + 1 for layer in range(n_layers))
    decoder = sum(n_layers + layer + 1 for layer in range(n_layers))
    return 2 * n_layers, encoder + decoder


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def run(
    batch: int, context: int, repeats: int, device: str, threads: int, real_dims: bool = True
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    from sae_lens_t5gemma.model import sites as sites
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
    from sae_lens_t5gemma.stand_in import synthetic as synthetic

    torch.set_num_threads(threads)
    # The stores are fed token batches directly: their dataset warnings do not apply.
    warnings.filterwarnings("ignore", message=".*(fewer samples|not tokenized).*")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = synthetic.build_tokenizer(tmp)
    hf_model = synthetic.build_t5gemma2(real_dims=real_dims).to(device)
    model = HookedT5Gemma2(hf_model, tokenizer, model_name="random T5Gemma 2 (real 270m-270m dims)")
    n_layers = model.cfg.n_layers
    hooks = [s.hook_name for s in sites.all_sites(n_layers, ("attn_out",))]
    d_model = model.cfg.d_model

    # SAELens' stores need a dataset to exist; the benchmark feeds them token batches directly.
    dataset = Dataset.from_dict({"text": ["benchmark"] * 4})
    common = dict(
        context_size=context, n_batches_in_buffer=8, store_batch_size_prompts=batch,
        train_batch_size_tokens=context, prepend_bos=True, normalize_activations="none",
        device=torch.device(device), dtype="float32",
    )  # fmt: skip
    multi_store = ActivationsStore.from_config_multi_hook(
        model, dataset=dataset, hook_names=hooks, hook_d_ins={h: d_model for h in hooks}, streaming=False,
        total_training_tokens=10**6, **common,
    )  # fmt: skip
    single_stores = [
        ActivationsStore(
            model=model,
            dataset=dataset,
            streaming=False,
            hook_name=h,
            hook_head_index=None,
            d_in=d_model,
            total_training_tokens=10**6,
            **common,
        )  # fmt: skip
        for h in hooks
    ]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (batch, context), generator=generator).to(device)

    with torch.no_grad():
        # The warm-up of both ways, doubling as the check that they harvest the same activations.
        shared = multi_store.get_multi_hook_activations(tokens)
        for store in single_stores:
            torch.testing.assert_close(
                store.get_activations(tokens), shared[store.hook_name], rtol=1e-4, atol=1e-5
            )

        def one_pass() -> None:
            multi_store.get_multi_hook_activations(tokens)

        def per_hook() -> None:
            for store in single_stores:
                store.get_activations(tokens)

        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        t_one = _timed(one_pass, repeats, sync)
        t_per = _timed(per_hook, repeats, sync)

    n_tokens = batch * context
    one_layers, per_layers = _layer_runs(n_layers)
    med_one, med_per = statistics.median(t_one), statistics.median(t_per)
    return {
        "benchmark": "bench_multi_hook_training",
        "what": "model forward to harvest activations at all 36 o_proj outputs for one token batch",
        "setup": {
            "model": model.cfg.model_name,
            "n_layers_per_stack": n_layers,
            "d_model": d_model,
            "hooks": len(hooks),
            "batch": batch,
            "context": context,
            "tokens_per_batch": n_tokens,
            "dtype": "float32",
            "device": device,
            "threads": threads,
            "repeats": repeats,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        },
        "one_pass": {
            "seconds": t_one,
            "median_s": med_one,
            "tokens_per_s": n_tokens / med_one,
            "forward_passes": 1,
        },
        "per_hook": {
            "seconds": t_per,
            "median_s": med_per,
            "tokens_per_s": n_tokens / med_per,
            "forward_passes": len(hooks),
        },
        "speedup": med_per / med_one,
        "expected_speedup_from_layer_counts": per_layers / one_layers,
        "layer_runs": {"one_pass": one_layers, "per_hook": per_layers},
        "activations_checked_equal": True,
    }


def table(result: dict[str, Any]) -> str:
    s = result["setup"]
    rows = [
        f"{s['hooks']} o_proj hooks, batch {s['batch']} x {s['context']} tokens, {s['device']}, "
        f"{s['threads']} threads, median of {s['repeats']}",
        f"{'way':10s} {'passes':>6s} {'median s':>10s} {'tokens/s':>10s}",
    ]
    for key, label in (("one_pass", "one pass"), ("per_hook", "per hook")):
        r = result[key]
        rows.append(f"{label:10s} {r['forward_passes']:6d} {r['median_s']:10.3f} {r['tokens_per_s']:10.1f}")
    rows.append(
        f"one pass is {result['speedup']:.1f}x faster "
        f"(layer counts predict {result['expected_speedup_from_layer_counts']:.1f}x)"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 x 32 tokens, 1 repeat: checks the script")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.repeats = 1, 32, 1
    result = run(args.batch, args.context, args.repeats, args.device, args.threads)
    result["quick"] = args.quick
    out = args.out or RESULTS / (
        "bench_multi_hook_training_quick.json" if args.quick else "bench_multi_hook_training.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
