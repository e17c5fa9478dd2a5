"""``train``: SAEs on T5Gemma 2 activations with SAELens' runners, one flag per ``TrainConfig`` field.

Each option's ``dest`` is the :class:`~sae_lens_t5gemma.training.TrainConfig` field it sets,
and its flag is that name with dashes. Options left out are None, so the preset decides; ``--help``
shows each preset's value (:data:`SHOWN_DEFAULTS`, checked against ``TrainConfig`` by the tests).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from sae_lens_t5gemma.cli.options import (
    DTYPE_CHOICES,
    HelpFormatter,
    add_command,
    add_concat_sequences,
    add_convention,
    add_device,
    add_prefix_len,
    add_top_k,
    resolve_device,
)
from sae_lens_t5gemma.model.sizes import T5GEMMA2_MODEL

PRESETS = ("recommended", "mindchain")

# Options that are not TrainConfig fields (``preset`` picks the base values, ``cache_dir`` is
# ``run_training``'s), and the one field whose flag says it the other way round.
NOT_FIELDS = frozenset({"preset", "cache_dir"})
NEGATED = {"concat_sequences": "disable_concat_sequences"}


def token_count(text: str) -> int:
    """Token counts like 100000, 1e6, 250k, 100M, 2B."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 2000000, 2e6, 2M)")
    return int(value)


# What an option left out gets, by TrainConfig field: a value, or one per preset. The parser is built
# on every start-up and importing TrainConfig loads torch and SAELens (seconds), so ``--help`` reads
# this copy; tests/cli/test_parser.py checks it against TrainConfig.from_preset for every preset.
SHOWN_DEFAULTS: dict[str, Any] = {
    "hooks": {"recommended": None, "mindchain": ["encoder.*.attn_out", "decoder.*.attn_out"]},
    "architecture": {"recommended": "batchtopk", "mindchain": "standard"},
    "d_sae": {"recommended": 16384, "mindchain": 4096},
    "k": {"recommended": 40, "mindchain": None},
    "l1": {"recommended": None, "mindchain": 0.01},
    "training_tokens": {"recommended": 100_000_000, "mindchain": 1_000_000},
    "lr": {"recommended": 3e-4, "mindchain": 1e-4},
    "context_size": {"recommended": 512, "mindchain": 128},
    "train_batch_size_tokens": {"recommended": 4096, "mindchain": 256},
    "store_batch_size_prompts": {"recommended": None, "mindchain": 8},
    "eval_every_n_steps": 1000,
    "n_eval_batches": 10,
    "out": "out/saes",
    "release_name": None,
    "multi_hook": True,
    "seed": 42,
    "n_checkpoints": 0,
    "convention": "prefix_lm",
    "disable_concat_sequences": True,
    "activations_mixing_fraction": 0.5,
    "parallel": "auto",
}


class _TrainHelpFormatter(HelpFormatter):
    """Shows the preset's value (:data:`SHOWN_DEFAULTS`) as the default of an option left at None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action) or ""
        field = NEGATED.get(action.dest, action.dest)
        if action.default is not None or field not in SHOWN_DEFAULTS or "default" in text:
            return text
        value = SHOWN_DEFAULTS[field]
        per_preset = value if isinstance(value, dict) else dict.fromkeys(PRESETS, value)

        def shown(v: Any) -> str:
            if action.dest in NEGATED:
                v = not v
            if isinstance(v, bool):
                flag = action.option_strings[0]
                return flag if v else "--no-" + flag[2:]
            if v is None:
                return "none" if field != "hooks" else "none, give --hook"
            return " ".join(map(str, v)) if isinstance(v, list) else str(v)

        values = {p: shown(v) for p, v in per_preset.items()}
        if len(set(values.values())) == 1:
            default = values[PRESETS[0]]
        else:
            default = ", ".join(f"{v} with --preset {p}" for p, v in values.items())
        return f"{text} (default: {default.replace('%', '%%')})".lstrip()


def add_train(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "train",
        formatter_class=_TrainHelpFormatter,
        help="train SAEs on T5Gemma 2 activations with SAELens' runners",
        description="Train one SAE per hook with SAELens' runners (several hooks share one forward pass). "
        "Every input is checked before the model loads. Presets: 'recommended' (BatchTopK k=40, 16k wide, "
        "Gemma Scope 2's medium L0 band) and 'mindchain' (the mindchain card's recipe: standard ReLU, "
        "d_sae 4096, L1 0.01, lr 1e-4, all 36 attn_out hooks). Each option sets the TrainConfig field of "
        "its name and overrides the preset.",
    )
    p.add_argument(
        "model", nargs="?", default=T5GEMMA2_MODEL, help="hub id or folder saved with save_pretrained"
    )
    p.add_argument(
        "--hook",
        dest="hooks",
        metavar="HOOK",
        action="append",
        help="site, wildcards ok (repeatable): decoder.*.attn_out",
    )
    p.add_argument(
        "--dataset",
        action="append",
        help="HF dataset, .txt/.jsonl file or folder (repeatable; required, no default)",
    )
    p.add_argument("--preset", choices=PRESETS, default=PRESETS[0], help="the base values")
    p.add_argument(
        "--architecture",
        choices=["standard", "topk", "batchtopk", "jumprelu", "matryoshka"],
        help="SAE architecture",
    )
    p.add_argument("--d-sae", type=int, help="SAE width")
    add_top_k(p, "k", "target L0: the k of topk/batchtopk/matryoshka, jumprelu's L0 target", type=float)
    p.add_argument("--l1", type=float, help="L1 coefficient (standard) or L0 coefficient (jumprelu)")
    p.add_argument("--training-tokens", type=token_count, help="training tokens per SAE (e.g. 50M)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--context-size", type=int, help="tokens per row fed to the model")
    p.add_argument("--train-batch-size-tokens", type=int, help="SAE batch size in tokens")
    p.add_argument(
        "--store-batch-size-prompts",
        type=int,
        help="sequences per model forward pass; none = sized by --max-memory",
    )
    p.add_argument(
        "--max-memory",
        help="memory budget of the activation store per runner, e.g. 1.5GiB or 800MB "
        "(default: 1/16 of the machine's RAM, at least 512MiB; the model and SAEs come on top)",
    )
    p.add_argument(
        "--matryoshka-widths",
        help="comma-separated nested widths, ending at d_sae (default: d_sae/16, d_sae/4, d_sae)",
    )
    p.add_argument("--eval-every-n-steps", type=int, help="in-training eval every N steps")
    p.add_argument("--n-eval-batches", type=int, help="batches per eval")
    p.add_argument("--out", help="output folder (one SAELens folder per SAE)")
    p.add_argument("--release-name", help="write <out>/release.yaml and register it under this name")
    p.add_argument(
        "--cache-dir", help="cache activations here first, then train from the cache (default: none)"
    )
    p.add_argument(
        "--multi-hook",
        action=argparse.BooleanOptionalAction,
        help="train every hook from one shared forward pass; --no-multi-hook runs one pass per hook",
    )
    add_device(p)
    p.add_argument(
        "--model-dtype",
        choices=DTYPE_CHOICES,
        help="model weights dtype while harvesting (default: auto = bfloat16 where the device runs it "
        "natively, CUDA with bf16 or a CPU with avx512_bf16/amx_bf16, else float32; SAE_LENS_T5GEMMA_DTYPE "
        "replaces it); SAEs stay float32",
    )
    p.add_argument(
        "--autocast",
        action="store_true",
        default=None,
        help="bfloat16 autocast for the SAE step (SAELens' autocast)",
    )
    p.add_argument("--seed", type=int, help="seeds SAE initialisation")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace SAE folders already in --out (and drop the checkpoints of an interrupted run there)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue an interrupted run in --out (same command otherwise): finished SAEs are kept, the "
        "interrupted runner continues from its latest checkpoint in OUT/checkpoints (SAELens' resume_from_checkpoint)",
    )
    p.add_argument(
        "--n-checkpoints",
        type=int,
        help="checkpoints saved during training, evenly spaced (SAELens' n_checkpoints), besides the "
        "one Ctrl-C or SIGTERM saves",
    )
    p.add_argument(
        "--activations-mixing-fraction",
        type=float,
        help="fraction of SAELens' activation buffer kept back to mix with the next harvest (0: harvest order, "
        "what an exact comparison between runs needs)",
    )
    p.add_argument(
        "--parallel",
        choices=["auto", "modules", "data"],
        help="under torchrun with N processes: modules (each rank trains some SAEs on rows from every rank), "
        "data (a replica of every SAE per rank, gradients averaged), auto (modules where every stack has at "
        "least N hooks, else data); ignored in one process. Launch: torchrun --nproc_per_node N -m "
        "sae_lens_t5gemma_cli train ...; several machines: add --nnodes, --rdzv-backend c10d, --rdzv-endpoint",
    )
    p.add_argument("--wandb", action="store_true", default=None, help="log to Weights & Biases")
    add_convention(p, default=None)
    add_prefix_len(p)
    add_concat_sequences(p)
    p.set_defaults(concat_sequences=None)  # the preset decides (one document per row)

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.training import TrainConfig, run_training

        if not a.dataset:
            raise ValueError("--dataset is required: a Hugging Face dataset name or local .txt/.jsonl files")
        cfg = TrainConfig.from_preset(a.preset, **config_fields(a))
        run_training(cfg, cache_dir=a.cache_dir)

    p.set_defaults(func=run)


def config_fields(a: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the options set, by name (None: the preset's value)."""
    values = {k: v for k, v in vars(a).items() if k not in NOT_FIELDS | {"command", "func", "light"}}
    for flag, field in NEGATED.items():
        v = values.pop(flag)
        values[field] = None if v is None else not v
    if len(values["dataset"] or []) == 1:
        values["dataset"] = values["dataset"][0]
    values["device"] = resolve_device(values["device"])
    widths = values["matryoshka_widths"]
    try:
        values["matryoshka_widths"] = [int(w) for w in widths.split(",")] if widths else None
    except ValueError:
        raise ValueError(
            f"--matryoshka-widths {widths!r}: expected whole numbers separated by commas, e.g. 1024,4096,16384"
        ) from None
    return values


def add_parsers(sub: argparse._SubParsersAction) -> None:
    add_train(sub)
