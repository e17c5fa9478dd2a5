"""``sae-lens-t5gemma demo``: the main job on the embedded synthetic stand-in.

With no network it writes a throwaway hub cache with a tiny random T5Gemma 2 and 36
mindchain-format SAEs under the real repo ids, switches huggingface_hub offline, and runs
the same code a user runs online. Everything it prints is labelled SYNTHETIC.
Each issue's part of the job is one section function below. The stand-in is imported inside
them: the command line builds this module's parser on every start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sae_lens_t5gemma.cli.options import add_command, add_device, add_dtype, resolve_device
from sae_lens_t5gemma.model.sizes import T5GEMMA2_MODEL

BANNER = "SYNTHETIC STAND-IN: random weights, tiny model; numbers say nothing about the real SAEs."


def section_load(cache: Path, out: Path, device: str = "cpu") -> None:
    """Issue 2: load all 36 SAEs through SAE.from_pretrained."""
    import time

    from sae_lens import SAE

    from sae_lens_t5gemma.loading.mindchain_history import final_l0, training_history
    from sae_lens_t5gemma.loading.registration import PACKAGE_RELEASE, valid_sae_ids

    print(f"\n== load: every SAE of {PACKAGE_RELEASE!r} via SAE.from_pretrained (SYNTHETIC weights) ==")
    t0 = time.perf_counter()
    header = f"{'sae_id':<18}{'hook_name':<38}{'d_in':>5}{'d_sae':>7}  {'dtype':<8}{'|W_dec| mean':>13}{'final l0':>10}"
    print(header)
    ids = valid_sae_ids(PACKAGE_RELEASE)
    for sae_id in ids:
        sae = SAE.from_pretrained(release=PACKAGE_RELEASE, sae_id=sae_id, device=device)
        l0 = final_l0(training_history(sae))
        print(
            f"{sae_id:<18}{sae.cfg.metadata.hook_name:<38}{sae.cfg.d_in:>5}{sae.cfg.d_sae:>7}  {sae.cfg.dtype:<8}"
            f"{sae.W_dec.norm(dim=1).mean().item():>13.4f}{l0 if l0 is not None else float('nan'):>10.1f}"
        )
    print(f"loaded {len(ids)} SAEs in {time.perf_counter() - t0:.1f} s (SYNTHETIC stand-in weights)")


def section_hook_and_steer(
    cache: Path, out: Path, model_name: str | None = None, device: str = "cpu"
) -> None:
    """Issue 3: load the model, attach an SAE, top features on a sentence, steer one.

    Without ``model_name`` it runs on the stand-in (offline, from ``cache``); with one
    (``demo --model google/t5gemma-2-270m-270m``) it loads that model and the real mindchain
    SAE from the hub, online.
    """
    import json
    import time

    import torch
    from sae_lens import SAE

    import sae_lens_t5gemma  # noqa: F401 (registers the t5gemma2-270m-attn_out release)
    from sae_lens_t5gemma.model.dtypes import dtype_name
    from sae_lens_t5gemma.model.hooked import load_t5gemma2
    from sae_lens_t5gemma.model.steering import top_features
    from sae_lens_t5gemma.stand_in import synthetic

    t0 = time.perf_counter()
    online = model_name is not None
    label = "real weights, online" if online else "SYNTHETIC"
    with _online_hub() if online else contextlib.nullcontext():
        model = load_t5gemma2(model_name or synthetic.T5GEMMA2_MODEL, device=device)
        sae = SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id="encoder/layer_5", device=device)
    hook = sae.cfg.metadata.hook_name
    print(
        f"\n== hook and steer: {model.cfg.model_name} ({label}, {dtype_name(model.cfg.dtype)}), "
        f"SAE encoder/layer_5 at {hook} =="
    )
    text = "The cat sat on the mat."
    tokens = model.to_tokens(text)
    with torch.no_grad():
        clean_logits = model(tokens)
        spliced = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
    print(
        f"spliced with the error term: logits differ by at most {(spliced - clean_logits).abs().max().item():.2e} "
        "(unchanged, as it should be)"
    )

    rows = top_features(model, sae, text, k=8)
    print(f"top features on {text!r} (position, token, feature, activation):")
    for r in rows:
        print(f"  {r.position:>3}  {r.token!r:<12}{r.feature:>7}{r.activation:>10.4f}")
    if not rows:
        print("  (no feature fires)")
        return
    feature = rows[0].feature
    # Steer the strongest feature hard: add 20x its peak activation wherever the encoder runs.
    strength = 20.0 * rows[0].activation

    def next_token_top(logits: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        probs = logits[0, 0].softmax(-1)  # decoder position 0: the first output token
        p, i = probs.topk(k)
        return [(model.tokenizer.decode([t]), float(q)) for t, q in zip(i.tolist(), p.tolist(), strict=True)]

    prompt = model.to_tokens(text)
    bos = torch.tensor([[model.hf_model.config.decoder.bos_token_id]])
    with torch.no_grad():
        before = next_token_top(model(prompt, decoder_input_ids=bos, return_type="logits"))
        gen_before = model.generate(text, max_new_tokens=8)
        with model.steer(sae, feature, add=strength):
            after = next_token_top(model(prompt, decoder_input_ids=bos, return_type="logits"))
            gen_after = model.generate(text, max_new_tokens=8)
    print(
        f"steering feature {feature} at {hook} by +{strength:.3f} (delta = (f' - f) @ W_dec, error term kept):"
    )
    print(f"  first output token, top 5 before: {', '.join(f'{t!r} {p:.3f}' for t, p in before)}")
    print(f"  first output token, top 5 after:  {', '.join(f'{t!r} {p:.3f}' for t, p in after)}")
    print(f"  generated before: {gen_before!r}")
    print(f"  generated after:  {gen_after!r}")
    record = {
        "label": label,
        "model": model.cfg.model_name,
        "dtype": dtype_name(model.cfg.dtype),
        "hook": hook,
        "text": text,
        "top_features": [r.__dict__ for r in rows],
        "steered_feature": feature,
        "added_activation": strength,
        "next_token_before": before,
        "next_token_after": after,
        "generated_before": gen_before,
        "generated_after": gen_after,
    }
    (out / "hook_and_steer.json").write_text(json.dumps(record, indent=2))
    print(
        f"hook and steer done in {time.perf_counter() - t0:.1f} s ({label}); wrote {out / 'hook_and_steer.json'}"
    )


def _online_hub() -> contextlib.AbstractContextManager[Path]:
    """Undo ``synthetic.offline_hub`` for a block: the default hub cache, network allowed."""
    from huggingface_hub import constants

    from sae_lens_t5gemma.stand_in import synthetic

    return synthetic.hub_settings(Path(constants.HF_HOME) / "hub", offline=False)


def section_train(cache: Path, out: Path, device: str = "cpu") -> None:
    """Issue 4: a short offline training run with SAELens' runner, saved and loaded back by name.

    BatchTopK SAEs (the recommended preset's architecture, at demo size) at encoder layer 5's
    and decoder layer 5's o_proj outputs of the stand-in model, under the prefix_lm
    convention (one runner per stack), trained on documents built from 20 of the embedded
    sentences and measured on the 5 held out.
    """
    import random
    import time
    import warnings

    from sae_lens import SAE

    from sae_lens_t5gemma import training
    from sae_lens_t5gemma.model.hooked import load_t5gemma2
    from sae_lens_t5gemma.stand_in import synthetic

    print(
        "\n== train: BatchTopK SAEs at encoder.5 and decoder.5 attn_out with SAELens' runners (SYNTHETIC) =="
    )
    t0 = time.perf_counter()
    texts = synthetic.stand_in_texts()
    train_texts, held_out = texts[:20], texts[20:]
    rng, lines = random.Random(0), []
    for _ in range(15):
        rng.shuffle(train_texts)
        # Documents of four sentences: longer than the context, so one document per row keeps them.
        lines += [" ".join(train_texts[i : i + 4]) for i in range(0, 20, 4)]
    dataset = training.write_text_dataset(lines, out / "train_texts.jsonl")
    sae_ids = ["encoder.5.attn_out", "decoder.5.attn_out"]
    cfg = training.TrainConfig(
        model=synthetic.T5GEMMA2_MODEL, hooks=sae_ids, dataset=str(dataset), out=str(out / "trained_saes"),
        architecture="batchtopk", k=8, d_sae=256, training_tokens=100 * 256, train_batch_size_tokens=256,
        context_size=32, store_batch_size_prompts=8, lr=3e-3, eval_every_n_steps=50, n_eval_batches=1,
        n_batches_for_norm_estimate=10, release_name="t5gemma2-demo-trained", overwrite=True, preset="recommended (demo size)", device=device,
    )  # fmt: skip
    model = load_t5gemma2(cfg.model, device=device)
    hooks = {
        "encoder.5.attn_out": "encoder_blocks.5.attn.hook_out",
        "decoder.5.attn_out": "decoder_blocks.5.self_attn.hook_out",
    }
    with model.fed(prefix_len=cfg.context_size // 2):  # the split training uses
        acts = training.collect_activations(
            model, [" ".join(held_out)] * 2, list(hooks.values()), cfg.context_size
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exhausted.*")  # 20 sentences: many epochs, by design
        result = training.train(cfg, model=model, keep_initial=True)
    for sae_id, hook in hooks.items():
        before = training.reconstruction_mse(result.initial_saes[sae_id], acts[hook])
        after = training.reconstruction_mse(result.saes[sae_id], acts[hook])
        print(
            f"{sae_id} (prefix_lm, covered positions only): held-out reconstruction MSE "
            f"{before:.3e} -> {after:.3e} ({before / after:.1f}x)"
        )
    print(
        f"{len(result.eval_history)} in-training evals (evaluate_sae: covered positions, CE/KL on the continuation)"
    )
    print(training.format_report(result))
    by_name = SAE.from_pretrained(release=result.release, sae_id="decoder.5.attn_out", device=device)
    meta = by_name.cfg.metadata
    print(
        f"loaded back by name: SAE.from_pretrained(release={result.release!r}, sae_id='decoder.5.attn_out')"
    )
    print(
        f"  {type(by_name).__name__} d_in={by_name.cfg.d_in} d_sae={by_name.cfg.d_sae} hook {meta.hook_name}"
    )
    print(f"  seqpos_slice={tuple(meta.seqpos_slice)}; {meta.t5gemma2_input_convention}")
    print(f"train done in {time.perf_counter() - t0:.1f} s (SYNTHETIC); saved in {result.out}")


def section_compare(cache: Path, out: Path, device: str = "cpu") -> None:
    """Issue 5: a small comparison on the stand-in."""
    import time

    from sae_lens_t5gemma.comparison.suite import compare, standard_pairs
    from sae_lens_t5gemma.stand_in import synthetic

    print(
        "\n== compare: mindchain vs Gemma Scope 2; Gemma Scope 2 transferred onto T5Gemma 2's encoder and decoder, "
        "feature by feature, with controls (SYNTHETIC) =="
    )
    t0 = time.perf_counter()
    # The cache holds T5Gemma 2 + mindchain; Gemma 3 and Gemma Scope 2 stand-ins join it here.
    synthetic.write_gemma3_stand_in_hub(cache)
    pairs = standard_pairs([5], gemma_scope_sites=("attn_out", "resid_post"))
    report = compare(
        pairs,
        out_dir=out / "compare",
        context_size=32,
        batch_size=4,
        n_batches=2,
        banner=BANNER,
        progress=False,
        synthetic=True,
        device=device,
        min_fires=1,
    )
    print(report.summary())
    print("findings:")
    for sentence in report.findings:
        print(f"  - {sentence}")
    print(
        f"compared {len(report.rows)} pairs in {time.perf_counter() - t0:.1f} s; see {report.files['report']}"
    )


def section_diagnose(cache: Path, out: Path, device: str = "cpu") -> None:
    """Issue 8: which convention were the mindchain decoder SAEs trained under? (an estimate)"""
    import time

    from sae_lens_t5gemma.analysis.diagnose import diagnose_release

    print(
        "\n== diagnose: the mindchain decoder SAEs under each convention vs their training-history L0 (SYNTHETIC) =="
    )
    t0 = time.perf_counter()
    result = diagnose_release(layers=[2, 5], context_size=32, n_batches=2, synthetic=True, device=device)
    print(result.table())
    print(result.verdict())
    (out / "diagnose.txt").write_text(result.table() + "\n" + result.verdict() + "\n")
    print(f"diagnose done in {time.perf_counter() - t0:.1f} s; wrote {out / 'diagnose.txt'}")


def section_dashboard(cache: Path, out: Path, device: str = "cpu") -> None:
    """Issue 11: feature dashboards for one encoder SAE on the embedded corpus, and a Neuronpedia export."""
    import time

    from sae_lens import SAE

    from sae_lens_t5gemma.analysis.feature_stats import corpus_stats
    from sae_lens_t5gemma.analysis.stats_state import StatsConfig
    from sae_lens_t5gemma.dashboard.neuronpedia import export_neuronpedia
    from sae_lens_t5gemma.dashboard.pages import write_dashboard
    from sae_lens_t5gemma.model.hooked import load_t5gemma2
    from sae_lens_t5gemma.stand_in import synthetic

    print("\n== dashboard: feature pages for encoder/layer_5 on the embedded corpus (SYNTHETIC) ==")
    t0 = time.perf_counter()
    model = load_t5gemma2(synthetic.T5GEMMA2_MODEL, device=device)
    sae = SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id="encoder/layer_5", device=device)
    texts = synthetic.stand_in_texts()
    stats = corpus_stats(model, {"encoder.5.attn_out": sae}, texts=texts, out=out / "dashboard" / "stats",
                         config=StatsConfig(top_k=10, context_size=32), overwrite=True, synthetic=True,
                         sources={"encoder.5.attn_out": "t5gemma2-270m-attn_out:encoder/layer_5"}, progress=False)  # fmt: skip
    index = write_dashboard(model, sae, stats, out / "dashboard", n_features=6, texts=texts, progress=False)
    batches = export_neuronpedia(model, sae, stats, out / "dashboard" / "neuronpedia")
    print(f"{stats.n_tokens('encoder.5.attn_out')} counted positions in {stats.meta['rows_done']} rows "
          f"({model.convention}); 6 feature pages and {len(batches)} Neuronpedia batch file(s)")  # fmt: skip
    print(f"dashboard done in {time.perf_counter() - t0:.1f} s (SYNTHETIC); open {index.resolve()}")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one thread: the stand-ins are tiny, and a second thread only spin-waits (5x slower on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def models_in(dtype: str) -> Iterator[None]:
    """Every model the demo loads (analysis and training) in ``dtype``: the package's documented
    ``SAE_LENS_T5GEMMA_DTYPE`` default, set for the demo's duration."""
    from sae_lens_t5gemma.model.dtypes import DTYPE_ENV

    before = os.environ.get(DTYPE_ENV)
    os.environ[DTYPE_ENV] = dtype
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DTYPE_ENV, None)
        else:
            os.environ[DTYPE_ENV] = before


def run_demo(args: argparse.Namespace) -> None:
    from sae_lens_t5gemma.model.dtypes import dtype_name, resolve_dtype
    from sae_lens_t5gemma.stand_in import synthetic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # float32 unless --dtype: the demo prints the same numbers on every machine.
    dtype = dtype_name(resolve_dtype(getattr(args, "dtype", None) or "float32"))
    print(BANNER)
    print(f"models in {dtype} (--dtype float32|bfloat16|float16|auto), SAEs in float32")
    with models_in(dtype), tempfile.TemporaryDirectory(prefix="sae_lens_t5gemma_demo_hub_") as tmp:
        cache = synthetic.write_stand_in_hub(tmp)
        with synthetic.offline_hub(cache):
            device = getattr(args, "device", None) or "cpu"
            real_model = getattr(args, "model", None) is not None
            sections = {
                "load": section_load,
                "hook_and_steer": functools.partial(
                    section_hook_and_steer, model_name=getattr(args, "model", None)
                ),
                "train": section_train,
                "compare": section_compare,
                "diagnose": section_diagnose,
                "dashboard": section_dashboard,
            }
            chosen = getattr(args, "sections", None) or list(sections)
            unknown = sorted(set(chosen) - set(sections))
            if unknown:
                raise ValueError(f"--sections: unknown {unknown}; choose from {', '.join(sections)}")
            for name in chosen:
                tiny = not (real_model and name == "hook_and_steer") and device == "cpu"
                with one_thread() if tiny else contextlib.nullcontext():
                    sections[name](cache, out, device=device)
    print(BANNER)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", help="the main job on the embedded synthetic stand-in (offline)")
    p.add_argument("--out", default="out/demo", help="folder for the demo's files")
    add_dtype(p, default="float32 on every machine, so the demo prints the same numbers everywhere")
    add_device(p, "every model and SAE of the demo")
    p.add_argument(
        "--sections",
        type=lambda t: [x for x in t.split(",") if x],
        help="comma-separated subset of load,hook_and_steer,train,compare,diagnose,dashboard (default: all)",
    )
    p.add_argument(
        "--model",
        help="hook-and-steer on this model and the real mindchain SAE, from the hub (online), e.g. "
        f"{T5GEMMA2_MODEL}; default: the offline stand-in under that id",
    )

    def run(a: argparse.Namespace) -> None:
        a.device = resolve_device(a.device)
        run_demo(a)

    p.set_defaults(func=run)
