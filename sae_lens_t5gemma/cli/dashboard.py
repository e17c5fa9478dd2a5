"""``dashboard`` and ``find-features``: feature pages, a Neuronpedia export, and features that tell texts apart.

Options are named after :class:`~sae_lens_t5gemma.analysis.stats_state.StatsConfig`'s fields and the
parameters of :func:`~sae_lens_t5gemma.dashboard.pages.run_dashboard` and
:func:`~sae_lens_t5gemma.dashboard.pages.run_find_features`; ``--model`` (``model_name``) is spelled
as on the other commands.
"""

from __future__ import annotations

import argparse

from sae_lens_t5gemma.cli.options import (
    add_command,
    add_convention,
    add_device,
    add_dtype,
    add_stand_in,
    add_top_k,
    resolve_device,
)

MODEL_HELP = "hub id or folder (default: the SAE's model_name)"


def add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
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
        "--dataset",
        help="HF dataset name or .txt/.jsonl file (default with --stand-in: the embedded corpus; required otherwise)",
    )
    p.add_argument(
        "--features", type=int, nargs="+", help="feature indices (default: the densest --n-features)"
    )
    p.add_argument("--n-features", type=int, default=20, help="pages to write when --features is not given")
    p.add_argument("--out", default="out/dashboard", help="output folder")
    p.add_argument("--model", dest="model_name", metavar="MODEL", help=MODEL_HELP)
    add_convention(p, default=None)
    p.add_argument(
        "--max-rows", type=int, help="stop after this many corpus rows (default: the whole corpus)"
    )
    p.add_argument("--context-size", type=int, default=64, help="tokens per row (one text per row)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    add_top_k(p, "top_k", "top examples kept per feature", default=20)
    p.add_argument("--resume", action="store_true", help="continue the statistics saved in OUT/stats")
    p.add_argument("--overwrite", action="store_true", help="replace the statistics saved in OUT/stats")
    p.add_argument(
        "--neuronpedia",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the Neuronpedia export",
    )
    add_device(p)
    add_dtype(p)
    add_stand_in(p)

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.analysis.stats_state import StatsConfig
        from sae_lens_t5gemma.dashboard.pages import run_dashboard

        cfg = StatsConfig(top_k=a.top_k, context_size=a.context_size, batch_size=a.batch_size)
        index = run_dashboard(
            a.sae, a.out, a.dataset, a.features, model_name=a.model_name, stand_in=a.stand_in,
            convention=a.convention, config=cfg, max_rows=a.max_rows, n_features=a.n_features, resume=a.resume,
            overwrite=a.overwrite, neuronpedia=a.neuronpedia, device=resolve_device(a.device), dtype=a.dtype,
        )  # fmt: skip
        print(f"wrote {index}" + (" (SYNTHETIC stand-in)" if a.stand_in else ""))

    p.set_defaults(func=run)


def add_find_features(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "find-features",
        help="features that fire more on one set of texts than another",
        description="Rank an SAE's features by the mean peak activation on --with texts minus that on "
        "--without texts (one text per line in each file). Texts are read under the model's convention "
        "(prefix_lm: an encoder SAE sees each text's first half), as every command reads a prompt.",
    )
    p.add_argument("sae", help="RELEASE:SAE_ID or a SAELens folder")
    p.add_argument("--with", dest="with_file", required=True, help="text file: texts with the concept")
    p.add_argument("--without", dest="without_file", required=True, help="text file: texts without it")
    add_top_k(p, "k", "rows to print", default=20)
    p.add_argument("--model", dest="model_name", metavar="MODEL", help=MODEL_HELP)
    add_device(p)
    add_dtype(p)
    add_stand_in(p)
    p.add_argument(
        "--encoder-reads-whole-text",
        action="store_true",
        help="encoder SAEs: let the encoder read each whole text (the decoder does not run)",
    )

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.dashboard.pages import run_find_features

        print(run_find_features(a.sae, a.with_file, a.without_file, a.k, model_name=a.model_name,
                                stand_in=a.stand_in, device=resolve_device(a.device), dtype=a.dtype,
                                encoder_reads_whole_text=a.encoder_reads_whole_text))  # fmt: skip

    p.set_defaults(func=run)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    add_dashboard(sub)
    add_find_features(sub)
