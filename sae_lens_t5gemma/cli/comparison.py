"""``compare`` and ``diagnose``: T5Gemma 2's SAEs beside Gemma Scope 2's, and the decoder SAEs' convention.

Options are named after the parameters of :func:`~sae_lens_t5gemma.comparison.suite.compare`,
:func:`~sae_lens_t5gemma.comparison.suite.standard_pairs` and
:func:`~sae_lens_t5gemma.analysis.diagnose.diagnose_release`, except where the command line keeps
one name across commands: ``--dataset`` (the corpus, a text file here), ``--out``, ``--stand-in``
and ``--concat-sequences`` (see :mod:`sae_lens_t5gemma.cli.options`).
"""

from __future__ import annotations

import argparse
import contextlib

from sae_lens_t5gemma.cli.options import (
    add_command,
    add_concat_sequences,
    add_convention,
    add_device,
    add_dtype,
    add_prefix_len,
    add_stand_in,
    resolve_device,
)
from sae_lens_t5gemma.model.sizes import DEFAULT_SIZE, SIZES


def add_dataset_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        metavar="FILE",
        help="text file, one document per line (default: the embedded corpus)",
    )


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "compare",
        help="side-by-side eval report against Gemma Scope 2",
        description="Evaluate (model, SAE) pairs on the same documents and write report.md (findings first), "
        "results/transfer/feature_transfer tables and PNG plots. --layers builds the standard set: mindchain "
        "encoder/decoder SAEs on T5Gemma 2; every Gemma Scope 2 every-layer variant (small and big L0) on Gemma 3 "
        "270M; and each of them transferred onto T5Gemma 2's encoder and decoder, read feature by feature with a "
        "norm-matched and a causal-encoder control. One document per row unless --concat-sequences.",
    )
    p.add_argument("--layers", type=int, nargs="+", default=[], help="layers for the standard comparison")
    p.add_argument(
        "--size",
        choices=list(SIZES),
        default=DEFAULT_SIZE,
        help="model size: T5Gemma 2 <size>-<size> with Gemma 3 <size> and its Gemma Scope 2 releases "
        "(the mindchain SAEs exist for 270m only)",
    )
    p.add_argument(
        "--pair",
        dest="pairs",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra pair: 'sae=RELEASE:SAE_ID|FOLDER[,model=NAME][,hook=HOOK]' (repeatable)",
    )
    p.add_argument(
        "--local-sae",
        dest="local_saes",
        action="append",
        default=[],
        metavar="FOLDER",
        help="a SAELens SAE folder (repeatable)",
    )
    p.add_argument(
        "--gemma-scope-variant",
        default="all",
        help="Gemma Scope 2 id suffix (e.g. width_16k_l0_small), or 'all': every variant of --gemma-scope-widths",
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
    add_concat_sequences(p)
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
    p.add_argument(
        "--mindchain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the mindchain SAEs in --layers",
    )
    p.add_argument(
        "--decoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the mindchain decoder SAEs too (--no-decoder: encoder SAEs only)",
    )
    p.add_argument(
        "--transfer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the Gemma Scope 2 SAEs transferred onto T5Gemma 2",
    )
    add_dataset_file(p)
    p.add_argument(
        "--context-size",
        type=int,
        help="tokens per row (default: 128; 32 with --stand-in, whose documents are 21-38 tokens long)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    p.add_argument("--n-batches", type=int, help="batches to evaluate on (default: all)")
    p.add_argument(
        "--dense-threshold", type=float, default=0.1, help="dense = fires on more than this fraction"
    )
    add_device(p, "the models and the SAEs")
    add_dtype(p)
    p.add_argument("--out", default="out/compare", help="folder for the report, tables and plots")
    add_convention(p)
    add_prefix_len(p)
    add_stand_in(p)
    p.set_defaults(func=run_compare)


def run_compare(a: argparse.Namespace) -> None:
    from sae_lens_t5gemma.analysis.corpus import read_texts
    from sae_lens_t5gemma.cli.demo import BANNER
    from sae_lens_t5gemma.comparison.models import stand_in_hub
    from sae_lens_t5gemma.comparison.suite import Pair, check_arguments, compare, standard_pairs

    context_size = a.context_size if a.context_size is not None else (32 if a.stand_in else 128)
    check_arguments(context_size, a.batch_size, a.n_batches, a.dense_threshold, a.prefix_len, a.min_fires)
    pairs = standard_pairs(
        a.layers,
        mindchain=a.mindchain,
        decoder=a.decoder,
        gemma_scope_sites=a.gemma_scope_sites,
        gemma_scope_variant=a.gemma_scope_variant,
        transfer=a.transfer,
        local_saes=a.local_saes,
        gemma_scope_widths=a.gemma_scope_widths,
        transfer_stacks=a.transfer_stacks,
        size=a.size,
    ) + [Pair.parse(spec) for spec in a.pairs]
    if not pairs:
        raise ValueError("nothing to compare: give --layers, --pair or --local-sae")
    if a.stand_in:
        _check_stand_in_layers(a.size, a.layers)
    texts = read_texts(a.dataset) if a.dataset else None
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
            device=resolve_device(a.device),
            dtype=a.dtype,
            dense_threshold=a.dense_threshold,
            banner=BANNER if a.stand_in else None,
            convention=a.convention,
            prefix_len=a.prefix_len,
            pack=a.concat_sequences,
            synthetic=a.stand_in,
            title=f"SAE comparison: T5Gemma 2 {a.size}-{a.size} and Gemma 3 {a.size.upper()}",
            min_fires=a.min_fires,
        )
    print(report.summary())


def _check_stand_in_layers(size: str, layers: list[int]) -> None:
    """The stand-in models are shallower than the real ones: refuse layers they lack, naming the range."""
    from sae_lens_t5gemma.model import sizes
    from sae_lens_t5gemma.stand_in import synthetic

    depth = (
        synthetic.STAND_IN_LAYERS
        if size == "270m"
        else sizes.get_size(size).stand_in_text("t5gemma2").num_hidden_layers
    )
    if any(layer >= depth for layer in layers):
        raise ValueError(
            f"--layers {' '.join(map(str, layers))}: the {size} stand-in has {depth} layers per stack "
            f"(0-{depth - 1}); the real model has more."
        )


def add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "diagnose",
        help="estimate which input convention a release's decoder SAEs were trained under",
        description="Evaluate each decoder SAE under prefix_lm, reconstruct and shifted_copy and compare "
        "its L0 with the last L0 of its training history: the closest is the best match (an estimate).",
    )
    p.add_argument("release", nargs="?", default="t5gemma2-270m-attn_out", help="the release to diagnose")
    p.add_argument("--layers", type=int, nargs="+", help="decoder layers (default: all)")
    add_dataset_file(p)
    p.add_argument("--context-size", type=int, default=128, help="tokens per row (longer documents are cut)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per batch")
    p.add_argument("--n-batches", type=int, default=4, help="batches to evaluate on")
    add_device(p, "the model and the SAEs")
    add_dtype(p)
    add_stand_in(p)
    p.set_defaults(func=run_diagnose)


def run_diagnose(a: argparse.Namespace) -> None:
    from sae_lens_t5gemma.analysis.corpus import read_texts
    from sae_lens_t5gemma.analysis.diagnose import diagnose_release
    from sae_lens_t5gemma.comparison.models import stand_in_hub

    texts = read_texts(a.dataset) if a.dataset else None
    with stand_in_hub() if a.stand_in else contextlib.nullcontext():
        result = diagnose_release(
            a.release,
            a.layers,
            texts,
            a.context_size,
            a.batch_size,
            a.n_batches,
            resolve_device(a.device),
            a.stand_in,
            a.dtype,
        )
    print(result.table())
    print(result.verdict())


def add_parsers(sub: argparse._SubParsersAction) -> None:
    add_compare(sub)
    add_diagnose(sub)
