"""``sae-lens-t5gemma``: a thin command line over the library.

Each subcommand parses its arguments and calls one library function, which the tests
call directly. Heavy imports (torch, SAELens) happen inside each subcommand's ``run``, and
the console entry (``sae_lens_t5gemma_cli``) imports the package without registering it
with SAELens, so ``--help``, ``list`` and argument errors answer at once. :func:`main`
registers before running any command not marked ``light``.
"""

from __future__ import annotations

import argparse
import sys


def _add_dtype(p: argparse.ArgumentParser, training: bool = False) -> None:
    """``--dtype``: the model's weights dtype (one flag, one meaning, on every command that loads a model)."""
    default = (
        "auto: bfloat16 where the device runs it natively (CUDA with bf16, a CPU with avx512_bf16/amx_bf16), "
        "else float32; SAEs stay float32"
        if training
        else "float32, on every machine"
    )
    p.add_argument(
        "--dtype",
        *(["--model-dtype"] if training else []),
        dest="dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default=None,
        help=f"model weights dtype (default {default}; SAE_LENS_T5GEMMA_DTYPE replaces the default)",
    )


# --------------------------------------------------------------- list / inspect / convert (issue 2)
def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="releases, SAE ids and hook names")
    p.add_argument("--all", action="store_true", help="also list SAELens' other releases")

    def run(a: argparse.Namespace) -> None:
        if not a.all:  # the package's own YAML is enough, no SAELens import
            from sae_lens_t5gemma.loading.listing import format_package_releases

            print(format_package_releases())
            return
        from sae_lens_t5gemma.loading.registration import format_releases, register

        register()
        print(format_releases(include_all=True))

    p.set_defaults(func=run, light=True)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="an SAE's config, shapes and weight statistics",
        description="inspect RELEASE SAE_ID, or inspect --path FOLDER_OR_PT",
    )
    p.add_argument("release", nargs="?", help="release name, e.g. t5gemma2-270m-attn_out")
    p.add_argument("sae_id", nargs="?", help="SAE id, e.g. encoder/layer_5")
    p.add_argument("--path", help="a SAELens folder (cfg.json) or a mindchain .pt file instead")
    p.add_argument("--device", default="cpu")

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.loading.inspection import describe_sae

        print(describe_sae(a.release, a.sae_id, a.path, a.device))

    p.set_defaults(func=run)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="mindchain snapshot -> SAELens-native folders + release YAML")
    p.add_argument("src_dir", help="local snapshot of mindchain/t5gemma2-sae-all-layers")
    p.add_argument("out_dir", help="output folder (must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    p.add_argument("--release", default="t5gemma2-270m-attn_out", help="release name in the YAML")
    p.add_argument("--repo-id", default=None, help="HF repo the folders will be uploaded to (YAML repo_id)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.loading.convert import REPO_ID_PLACEHOLDER, convert_snapshot

        yaml_path = convert_snapshot(
            a.src_dir, a.out_dir, a.force, not a.no_progress, a.release, a.repo_id or REPO_ID_PLACEHOLDER
        )
        print(f"wrote {yaml_path}")

    p.set_defaults(func=run)


# ------------------------------------------------------------------------------ train (issue 4)
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train SAEs on T5Gemma 2 activations with SAELens' runners",
        description="Train one SAE per hook with SAELens' runners (several hooks share one forward pass). "
        "Every input is checked before the model loads. Presets: 'recommended' (BatchTopK k=40, 16k wide, "
        "Gemma Scope 2's medium L0 band) and 'mindchain' (the mindchain card's recipe: standard ReLU, "
        "d_sae 4096, L1 0.01, lr 1e-4, all 36 attn_out hooks). Options below override the preset.",
    )

    def count(text: str) -> int:
        """Token counts like 100000, 1e6, 250k, 100M, 2B."""
        import math

        scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
        try:
            value = float(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 2000000, 2e6, 2M)")
        return int(value)

    p.add_argument("model", nargs="?", default="google/t5gemma-2-270m-270m", help="hub id or local folder")
    p.add_argument("--hook", action="append", help="site, wildcards ok (repeatable): decoder.*.attn_out")
    p.add_argument("--dataset", action="append", help="HF dataset, .txt/.jsonl file or folder (repeatable)")
    p.add_argument("--preset", choices=["recommended", "mindchain"], default="recommended")
    p.add_argument("--architecture", choices=["standard", "topk", "batchtopk", "jumprelu", "matryoshka"])
    p.add_argument("--d-sae", type=int, help="SAE width")
    p.add_argument("--k", type=float, help="target L0 (topk/batchtopk/matryoshka k; jumprelu L0 target)")
    p.add_argument("--l1", type=float, help="L1 coefficient (standard) or L0 coefficient (jumprelu)")
    p.add_argument("--tokens", type=count, help="training tokens per SAE (e.g. 50M)")
    p.add_argument("--lr", type=float)
    p.add_argument("--context-size", type=int)
    p.add_argument("--batch-tokens", type=int, help="SAE batch size in tokens")
    p.add_argument(
        "--store-batch", type=int, help="sequences per model forward pass (default: sized by --max-memory)"
    )
    p.add_argument(
        "--max-memory",
        help="memory budget of the activation store per runner, e.g. 1.5GiB or 800MB "
        "(default: 1/16 of the machine's RAM, at least 512MiB; the model and SAEs come on top)",
    )
    p.add_argument("--matryoshka-widths", help="comma-separated nested widths, ending at d_sae")
    p.add_argument("--eval-every", type=int, help="in-training eval every N steps")
    p.add_argument("--eval-batches", type=int, help="batches per eval")
    p.add_argument("--out", default="out/saes", help="output folder (one SAELens folder per SAE)")
    p.add_argument("--release-name", help="write <out>/release.yaml and register it under this name")
    p.add_argument("--cache-dir", help="cache activations here first, then train from the cache")
    p.add_argument("--one-pass-per-hook", action="store_true", help="one run per hook, not one shared pass")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    _add_dtype(p, training=True)
    p.add_argument(
        "--autocast", action="store_true", help="bfloat16 autocast for the SAE step (SAELens' autocast)"
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace SAE folders already in --out (and drop the checkpoints of an interrupted run there)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out (same command otherwise): finished SAEs are kept, the "
        "interrupted runner continues from its latest checkpoint in OUT/checkpoints (SAELens' resume_from_checkpoint)",
    )
    p.add_argument(
        "--checkpoints",
        type=int,
        help="checkpoints saved during training, evenly spaced (SAELens' n_checkpoints; default 0), besides the "
        "one Ctrl-C or SIGTERM saves",
    )
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    p.add_argument(
        "--convention",
        choices=["prefix_lm", "reconstruct"],
        help="how rows feed T5Gemma 2: prefix_lm (default; encoder reads the first p tokens, decoder writes "
        "the rest) or reconstruct (decoder reads the row the encoder read: a copy task)",
    )
    p.add_argument("--prefix-len", type=int, help="prefix_lm split p (default: half the context)")
    p.add_argument(
        "--pack", action="store_true", help="pack documents into rows (default: one document per row)"
    )

    def run(a: argparse.Namespace) -> None:
        import torch

        from sae_lens_t5gemma.training.runner import TrainConfig, run_training

        device = a.device or ("cuda" if torch.cuda.is_available() else None)
        try:
            widths = [int(w) for w in a.matryoshka_widths.split(",")] if a.matryoshka_widths else None
        except ValueError:
            raise ValueError(
                f"--matryoshka-widths {a.matryoshka_widths!r}: expected whole numbers separated by commas, e.g. 1024,4096,16384"
            ) from None
        if not a.dataset:
            raise ValueError("--dataset is required: a Hugging Face dataset name or local .txt/.jsonl files")
        cfg = TrainConfig.from_preset(
            a.preset,
            model=a.model, hooks=a.hook, dataset=a.dataset if len(a.dataset) > 1 else a.dataset[0],
            architecture=a.architecture, d_sae=a.d_sae, k=a.k, l1=a.l1, training_tokens=a.tokens, lr=a.lr,
            context_size=a.context_size, train_batch_size_tokens=a.batch_tokens, store_batch_size_prompts=a.store_batch,
            matryoshka_widths=widths, eval_every_n_steps=a.eval_every, n_eval_batches=a.eval_batches, out=a.out,
            release_name=a.release_name, device=device, model_dtype=a.dtype, seed=a.seed,
            max_memory=a.max_memory, autocast=a.autocast or None,
            multi_hook=False if a.one_pass_per_hook else None, overwrite=a.overwrite or None, wandb=a.wandb or None,
            convention=a.convention, prefix_len=a.prefix_len, disable_concat_sequences=False if a.pack else None,
            resume=a.resume or None, n_checkpoints=a.checkpoints,
        )  # fmt: skip
        run_training(cfg, cache_dir=a.cache_dir)

    p.set_defaults(func=run)


# ---------------------------------------------------------------------------- compare (issue 5)
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="side-by-side eval report against Gemma Scope 2",
        description="Evaluate (model, SAE) pairs on the same documents and write report.md (findings first), "
        "results/transfer/feature_transfer tables and PNG plots. --layers builds the standard set: mindchain "
        "encoder/decoder SAEs on T5Gemma 2; every Gemma Scope 2 every-layer variant (small and big L0) on Gemma 3 "
        "270M; and each of them transferred onto T5Gemma 2's encoder and decoder, read feature by feature with a "
        "norm-matched and a causal-encoder control. One document per row unless --pack.",
    )
    p.add_argument("--layers", type=int, nargs="+", default=[], help="layers for the standard comparison")
    p.add_argument(
        "--size",
        choices=["270m", "1b", "4b"],
        default="270m",
        help="model size: T5Gemma 2 <size>-<size> with Gemma 3 <size> and its Gemma Scope 2 releases "
        "(the mindchain SAEs exist for 270m only)",
    )
    p.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra pair: 'sae=RELEASE:SAE_ID|FOLDER[,model=NAME][,hook=HOOK]' (repeatable)",
    )
    p.add_argument(
        "--local-sae", action="append", default=[], metavar="FOLDER", help="a SAELens SAE folder (repeatable)"
    )
    p.add_argument(
        "--gemma-scope-variant",
        default="all",
        help="Gemma Scope 2 id suffix (e.g. width_16k_l0_small), or 'all' (default): every variant of --gemma-scope-widths",
    )
    p.add_argument(
        "--gemma-scope-widths", nargs="+", default=["16k"], help="widths for --gemma-scope-variant all"
    )
    p.add_argument(
        "--transfer-stacks",
        nargs="+",
        default=["encoder", "decoder"],
        choices=["encoder", "decoder"],
        help="T5Gemma 2 stacks the Gemma Scope 2 SAEs are transferred onto",
    )
    p.add_argument(
        "--pack",
        action="store_true",
        help="pack documents into rows (SAELens' way); default one document per row: packed rows let the "
        "bidirectional encoder read later documents",
    )
    p.add_argument(
        "--min-fires", type=int, default=5, help="fires on Gemma 3 for a feature's correlation to count"
    )
    p.add_argument(
        "--gemma-scope-sites",
        nargs="+",
        default=["attn_out", "resid_post", "mlp_out"],
        choices=["attn_out", "resid_post", "mlp_out"],
        help="Gemma Scope 2 sites for --layers",
    )
    p.add_argument("--no-mindchain", action="store_true", help="leave the mindchain SAEs out of --layers")
    p.add_argument("--no-decoder", action="store_true", help="mindchain encoder SAEs only")
    p.add_argument("--no-transfer", action="store_true", help="no Gemma Scope 2 SAEs on T5Gemma 2")
    p.add_argument("--texts", help="text file, one text per line (default: the embedded corpus)")
    p.add_argument(
        "--context-size",
        type=int,
        help="tokens per row (default 128; 32 with --stand-in, whose documents are 21-38 tokens long)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    p.add_argument("--n-batches", type=int, default=None, help="batches to evaluate on (default: all)")
    p.add_argument(
        "--dense-threshold", type=float, default=0.1, help="dense = fires on more than this fraction"
    )
    p.add_argument("--device", default="cpu")
    _add_dtype(p)
    p.add_argument("--out", default="out/compare", help="folder for the report, tables and plots")
    p.add_argument(
        "--convention",
        choices=["prefix_lm", "reconstruct"],
        default="prefix_lm",
        help="how rows feed T5Gemma 2: prefix_lm (default; encoder reads the first p tokens, decoder writes "
        "the rest) or reconstruct (decoder reads the row the encoder read: a copy task)",
    )
    p.add_argument("--prefix-len", type=int, help="prefix_lm split p (default: half the context)")
    p.add_argument(
        "--stand-in",
        action="store_true",
        help="run offline on the embedded synthetic stand-in (tiny random models)",
    )

    def run(a: argparse.Namespace) -> None:
        import contextlib

        from sae_lens_t5gemma.comparison.suite import (
            Pair,
            check_arguments,
            compare,
            read_texts,
            stand_in_hub,
            standard_pairs,
        )
        from sae_lens_t5gemma.cli.demo import BANNER

        context_size = a.context_size if a.context_size is not None else (32 if a.stand_in else 128)
        check_arguments(context_size, a.batch_size, a.n_batches, a.dense_threshold, a.prefix_len, a.min_fires)
        pairs = standard_pairs(
            a.layers,
            mindchain=not a.no_mindchain,
            decoder=not a.no_decoder,
            gemma_scope_sites=a.gemma_scope_sites,
            gemma_scope_variant=a.gemma_scope_variant,
            transfer=not a.no_transfer,
            local_saes=a.local_sae,
            gemma_scope_widths=a.gemma_scope_widths,
            transfer_stacks=a.transfer_stacks,
            size=a.size,
        ) + [Pair.parse(spec) for spec in a.pair]
        if not pairs:
            raise ValueError("nothing to compare: give --layers, --pair or --local-sae")
        if a.stand_in:
            from sae_lens_t5gemma.model import sizes as sizes
            from sae_lens_t5gemma.stand_in import synthetic as synthetic

            depth = (
                synthetic.STAND_IN_LAYERS
                if a.size == "270m"
                else sizes.get_size(a.size).stand_in_text("t5gemma2").num_hidden_layers
            )
            if any(layer >= depth for layer in a.layers):
                raise ValueError(
                    f"--layers {' '.join(map(str, a.layers))}: the {a.size} stand-in has {depth} layers per stack "
                    f"(0-{depth - 1}); the real model has more."
                )
        texts = read_texts(a.texts) if a.texts else None
        if a.stand_in:
            import torch

            torch.set_num_threads(1)  # tiny stand-in models: one thread is fastest
        with stand_in_hub(a.size) if a.stand_in else contextlib.nullcontext():
            report = compare(
                pairs,
                texts,
                a.out,
                context_size=context_size,
                batch_size=a.batch_size,
                n_batches=a.n_batches,
                device=a.device,
                dtype=a.dtype,
                dense_threshold=a.dense_threshold,
                banner=BANNER if a.stand_in else None,
                convention=a.convention,
                prefix_len=a.prefix_len,
                pack=a.pack,
                synthetic=a.stand_in,
                title=f"SAE comparison: T5Gemma 2 {a.size}-{a.size} and Gemma 3 {a.size.upper()}",
                min_fires=a.min_fires,
            )
        print(report.summary())

    p.set_defaults(func=run)


# ---------------------------------------------------------------------------- diagnose
def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="estimate which input convention a release's decoder SAEs were trained under",
        description="Evaluate each decoder SAE under prefix_lm, reconstruct and shifted_copy and compare "
        "its L0 with the last L0 of its training history: the closest is the best match (an estimate).",
    )
    p.add_argument("release", nargs="?", default="t5gemma2-270m-attn_out")
    p.add_argument("--layers", type=int, nargs="+", help="decoder layers (default: all)")
    p.add_argument("--texts", help="text file, one document per line (default: the embedded corpus)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per row (longer documents are cut)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-batches", type=int, default=4)
    p.add_argument("--device", default="cpu")
    _add_dtype(p)
    p.add_argument("--stand-in", action="store_true", help="run offline on the synthetic stand-in")

    def run(a: argparse.Namespace) -> None:
        import contextlib

        from sae_lens_t5gemma.comparison.suite import read_texts, stand_in_hub
        from sae_lens_t5gemma.analysis.diagnose import diagnose_release

        texts = read_texts(a.texts) if a.texts else None
        with stand_in_hub() if a.stand_in else contextlib.nullcontext():
            result = diagnose_release(
                a.release,
                a.layers,
                texts,
                a.context_size,
                a.batch_size,
                a.n_batches,
                a.device,
                a.stand_in,
                a.dtype,
            )
        print(result.table())
        print(result.verdict())

    p.set_defaults(func=run)


# ------------------------------------------------------------------ dashboards (issue 11)
def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard",
        help="feature dashboards (HTML) and a Neuronpedia export for one SAE",
        description="One streaming pass over a corpus gathers each feature's top activations, quantile "
        "samples, density and histogram (saved in OUT/stats, resumable), then writes self-contained HTML "
        "pages (OUT/index.html, OUT/feature_<f>.html) and a Neuronpedia export (OUT/neuronpedia). "
        "Decoder sites show direct-path logit effects; encoder sites show the effect of ablating the "
        "feature on the decoder's predictions.",
    )
    p.add_argument(
        "sae", help="RELEASE:SAE_ID (e.g. t5gemma2-270m-attn_out:encoder/layer_5) or a SAELens folder"
    )
    p.add_argument(
        "--dataset", help="HF dataset name or .txt/.jsonl file (default with --stand-in: embedded corpus)"
    )
    p.add_argument(
        "--features", type=int, nargs="+", help="feature indices (default: the densest --n-features)"
    )
    p.add_argument("--n-features", type=int, default=20, help="pages to write when --features is not given")
    p.add_argument("--out", default="out/dashboard", help="output folder")
    p.add_argument("--model", help="hub id or folder (default: the SAE's model_name)")
    p.add_argument(
        "--convention", choices=["prefix_lm", "reconstruct"], help="default: the model's (prefix_lm)"
    )
    p.add_argument("--max-rows", type=int, help="stop after this many corpus rows")
    p.add_argument("--context-size", type=int, default=64, help="tokens per row (one text per row)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--top-k", type=int, default=20, help="top examples kept per feature")
    p.add_argument("--resume", action="store_true", help="continue the statistics saved in OUT/stats")
    p.add_argument("--overwrite", action="store_true", help="replace the statistics saved in OUT/stats")
    p.add_argument("--no-neuronpedia", action="store_true", help="skip the Neuronpedia export")
    p.add_argument("--device", default="cpu")
    _add_dtype(p)
    p.add_argument("--stand-in", action="store_true", help="run offline on the synthetic stand-in")

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.dashboard.pages import run_dashboard
        from sae_lens_t5gemma.analysis.features import StatsConfig

        cfg = StatsConfig(top_k=a.top_k, context_size=a.context_size, batch_size=a.batch_size)
        index = run_dashboard(
            a.sae, a.out, a.dataset, a.features, model_name=a.model, stand_in=a.stand_in, convention=a.convention,
            config=cfg, max_rows=a.max_rows, n_features=a.n_features, resume=a.resume, overwrite=a.overwrite,
            neuronpedia=not a.no_neuronpedia, device=a.device, dtype=a.dtype,
        )  # fmt: skip
        print(f"wrote {index}" + (" (SYNTHETIC stand-in)" if a.stand_in else ""))

    p.set_defaults(func=run)


def _add_find_features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "find-features",
        help="features that fire more on one set of texts than another",
        description="Rank an SAE's features by the mean peak activation on --with texts minus that on "
        "--without texts (one text per line in each file). Texts are read under the model's convention "
        "(prefix_lm: an encoder SAE sees each text's first half), as every command reads a prompt.",
    )
    p.add_argument("sae", help="RELEASE:SAE_ID or a SAELens folder")
    p.add_argument("--with", dest="with_file", required=True, help="text file: texts with the concept")
    p.add_argument("--without", dest="without_file", required=True, help="text file: texts without it")
    p.add_argument("-k", type=int, default=20, help="rows to print")
    p.add_argument("--model", help="hub id or folder (default: the SAE's model_name)")
    p.add_argument("--device", default="cpu")
    _add_dtype(p)
    p.add_argument("--stand-in", action="store_true", help="run offline on the synthetic stand-in")
    p.add_argument("--encoder-reads-whole-text", action="store_true",
                   help="encoder SAEs: let the encoder read each whole text (the decoder does not run)")  # fmt: skip

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.dashboard.pages import run_find_features

        print(run_find_features(a.sae, a.with_file, a.without_file, a.k, model_name=a.model,
                                stand_in=a.stand_in, device=a.device, dtype=a.dtype,
                                encoder_reads_whole_text=a.encoder_reads_whole_text))  # fmt: skip

    p.set_defaults(func=run)


# ------------------------------------------------------------------------------- demo (all)
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded synthetic stand-in (offline)")
    p.add_argument("--out", default="out/demo", help="folder for the demo's files")
    _add_dtype(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... for every model and SAE of the demo")
    p.add_argument(
        "--sections",
        type=lambda t: [x for x in t.split(",") if x],
        help="comma-separated subset of load,hook_and_steer,train,compare,diagnose,dashboard (default: all)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="hook-and-steer on this model and the real mindchain SAE, from the hub (online), e.g. "
        "google/t5gemma-2-270m-270m; default: the offline stand-in under that id",
    )

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.cli.demo import run_demo

        run_demo(a)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-t5gemma",
        description="T5Gemma 2 for SAELens: list, inspect and convert the mindchain SAEs; train, compare, diagnose, demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_list,
        _add_inspect,
        _add_convert,
        _add_train,
        _add_compare,
        _add_diagnose,
        _add_dashboard,
        _add_find_features,
        _add_demo,
    ):
        add(sub)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _interrupted_line(args: argparse.Namespace, e: BaseException | None = None) -> str:
    """What an interruption leaves behind, per subcommand, and how to go on."""
    command = getattr(args, "command", "?")
    if command == "convert":
        return (
            f"interrupted: convert stopped; {args.out_dir} is as it was before the run "
            "(the staged output was removed). Rerun the same command."
        )
    if command == "train":
        describe = getattr(e, "describe", None)  # training.TrainingInterrupted: what was saved
        if describe is not None:
            return f"interrupted: train stopped; {describe()}"
        from pathlib import Path

        out = Path(getattr(args, "out", "out/saes"))
        kept = (out / "checkpoints").is_dir() or any(out.glob("*/eval_metrics.json"))
        return "interrupted: train stopped outside the training loop; " + (
            f"the finished SAEs and checkpoints in {out} are kept: the same command with --resume continues."
            if kept
            else f"nothing was saved in {out}: rerun the same command."
        )
    return f"interrupted: {command} stopped before finishing; rerun the same command."


def _error_line(e: BaseException) -> str:
    """One line for an error, naming the file where the exception knows it."""
    if isinstance(e, KeyError):
        text = f"missing key {e}"
    elif isinstance(e, RecursionError):
        text = "input nested too deeply (RecursionError)"
    else:
        text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError):
        if e.filename is not None and e.strerror:
            text = f"{e.filename}: {e.strerror}" + (
                f" (and {e.filename2})" if e.filename2 is not None else ""
            )
        if e.errno is not None and not isinstance(e, (FileNotFoundError, FileExistsError)):
            text = f"{text} ({type(e).__name__})"
    elif isinstance(e, UnicodeDecodeError):
        text = f"not UTF-8 text ({e.reason} at byte {e.start})"
    elif isinstance(e, (RuntimeError, NotImplementedError)) and type(e).__name__ not in text:
        text = f"{type(e).__name__}: {text}"
    if isinstance(e, ValueError) and not isinstance(e, UnicodeDecodeError):
        return text  # the package's own messages (a multi-line list of invalid files stays readable)
    # Others (the last words of torch, the OS, ...) become one line.
    one = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    return one if len(one) <= 1000 else one[:1000] + " ..."


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Errors end in one ``error: ...`` line (exit 2 for bad input, 1 otherwise), Ctrl-C
    (or SAELens' ``InterruptedException``) in one line and exit 130, SIGTERM in 143 (also
    when ``train`` stops on it after saving a checkpoint).
    """
    import signal
    import threading

    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if not getattr(args, "light", False):
            from sae_lens_t5gemma.loading.registration import register

            register()  # idempotent; the console entry defers it from import to here
        args.func(args)
    except (KeyboardInterrupt, _Terminated) as e:
        # train raises TrainingInterrupted (a KeyboardInterrupt) with the signal that stopped it.
        signum = getattr(e, "signum", signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
        line = _interrupted_line(args, e)
        if signum == signal.SIGTERM:
            line = line.replace("interrupted:", "terminated (SIGTERM):", 1)
        print(line, file=sys.stderr)
        return 128 + signum
    except (
        ValueError,
        LookupError,
        OSError,
        RuntimeError,
        NotImplementedError,
        RecursionError,
        UnicodeDecodeError,
        MemoryError,
    ) as e:
        # Bad input or a failing system call: one clear line, no traceback.
        print(f"error: {_error_line(e)}", file=sys.stderr)
        bad_input = isinstance(e, (ValueError, LookupError, FileNotFoundError, FileExistsError))
        return 2 if bad_input else 1
    except Exception as e:
        # SAELens' runners turn SIGINT/SIGTERM into their InterruptedException.
        if type(e).__name__ == "InterruptedException":
            print(_interrupted_line(args), file=sys.stderr)
            return 130
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
