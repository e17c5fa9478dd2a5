"""The training config (``TrainConfig``), its presets, and the checks of its numbers."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sae_lens_t5gemma.model.dtypes import default_dtype
from sae_lens_t5gemma.training.memory import memory_budget

# Written into every trained SAE's metadata: how the hooked model fed T5Gemma 2, so a reader
# of the SAE knows which activations it was trained on (see HookedT5Gemma2's conventions).
INPUT_CONVENTION_KEY = "t5gemma2_input_convention"

# Friendly architecture names -> SAELens training-registry names.
ARCHITECTURES: dict[str, str] = {
    "standard": "standard",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
    "matryoshka": "matryoshka_batchtopk",
}
_K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka")
_RELEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything a training run needs; checked by :func:`plan_training` before any model loads."""

    model: str
    """Hub id (``google/t5gemma-2-270m-270m``) or a local folder saved with ``save_pretrained``."""
    hooks: list[str]
    """Sites by friendly name, wildcards allowed (``encoder.5.attn_out``, ``decoder.*.attn_out``);
    any spelling ``sites.resolve`` accepts works too."""
    dataset: str | list[str]
    """A Hugging Face dataset name, or local ``.txt`` (one text per line) / ``.jsonl`` (a ``text``
    field per line) files, or a folder of them."""
    out: str = "out/saes"
    """Folder for the trained SAEs: one SAELens folder per SAE, named by its SAE id."""
    architecture: str = "batchtopk"
    """One of standard, topk, batchtopk, jumprelu, matryoshka."""
    d_sae: int = 16384
    """SAE width (number of latents)."""
    k: float | None = None
    """Target L0: k for topk/batchtopk/matryoshka; for jumprelu, the target of Gemma Scope 2's
    quadratic L0 loss."""
    l1: float | None = None
    """Sparsity coefficient: the L1 coefficient for standard, the L0 coefficient for jumprelu."""
    matryoshka_widths: list[int] | None = None
    """Nested widths for matryoshka (default: d_sae/16, d_sae/4, d_sae)."""
    training_tokens: int = 100_000_000
    """Token budget per SAE (all SAEs of a multi-hook run see the same tokens)."""
    lr: float = 3e-4
    """Adam learning rate."""
    lr_warm_up_steps: int = 0
    """Linear warm-up steps."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps, at the end, over which the learning rate decays linearly."""
    sparsity_warm_up_fraction: float = 0.0
    """Fraction of the steps over which the L1/L0 coefficient ramps up (standard, jumprelu)."""
    context_size: int = 512
    """Tokens per sequence fed to the model."""
    train_batch_size_tokens: int = 4096
    """SAE batch size, in tokens."""
    store_batch_size_prompts: int | None = None
    """Sequences per model forward pass while harvesting activations; None sizes it from the total
    width of a runner's hooks and ``max_memory`` (at most 16; see ``TrainingPlan.store_sizing``)."""
    n_batches_in_buffer: int | None = None
    """Activation mixing buffer, in sequences (SAELens: n_batches_in_buffer x the covered length of a
    row); None holds four SAE batches, or down to two when ``max_memory`` demands. Must hold at
    least one SAE batch."""
    max_memory: int | str | None = None
    """Memory budget of the activation store per runner (harvest copies, mixing buffer and the
    norm-estimation batches), in bytes or as ``"1.5GiB"``/``"800MB"``. None: 1/16 of the machine's
    RAM, at least 512 MiB (1.5 GiB on a 24 GiB machine). The model and the SAEs come on top."""
    normalize_activations: str = "expected_average_only_in"
    """SAELens input normalisation. The default rescales inputs to norm sqrt(d_in) during
    training and folds the factor into the saved weights: attention outputs are small, and
    without it the sparsity penalty swamps the reconstruction loss."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec before encoding (False, like the mindchain and Gemma Scope SAEs)."""
    exclude_special_tokens: bool = True
    """Leave bos/eos/pad positions out of training and evals."""
    eval_every_n_steps: int = 1000
    """In-training evals (CE-loss and KL scores, L0, explained variance) every this many steps."""
    n_eval_batches: int = 10
    """Batches per eval."""
    eval_batch_size_prompts: int | None = 4
    """Sequences per eval batch (the evals run the LM head over the 262k vocabulary)."""
    n_batches_for_norm_estimate: int = 100
    """Batches used to estimate the normalisation factor (multi-hook runs cap it by memory)."""
    multi_hook: bool = True
    """Several hooks: train them all from one forward pass (MultiSAETrainingRunner)."""
    release_name: str | None = None
    """If set, write ``<out>/release.yaml`` and register the release with SAELens."""
    wandb: bool = False
    """Log to Weights & Biases (off by default)."""
    wandb_project: str = "sae_lens_t5gemma"
    """W&B project when ``wandb`` is on."""
    device: str = "cpu"
    """Device for the model and the SAEs."""
    dtype: str = "float32"
    """SAE and activation dtype (float32 unless asked: activations are cast to it before SAELens sees them)."""
    model_dtype: str = field(default_factory=lambda: default_dtype("training"))
    """Model weights dtype while harvesting: float32, bfloat16, float16, or auto (the default:
    bfloat16 where the device runs it natively, float32 elsewhere; see ``sae_lens_t5gemma.model.dtypes``).
    The dtype actually used is recorded in every SAE's metadata (``t5gemma2_model_dtype``)."""
    autocast: bool = False
    """bfloat16 autocast for the SAE step (SAELens' ``autocast``); SAE weights stay in ``dtype``."""
    autocast_lm: bool = False
    """bfloat16 autocast for the model forward while harvesting (SAELens' ``autocast_lm``)."""
    sparse_decode: bool = False
    """TopK only: SAELens' ``use_sparse_activations`` (sparse decode; float32 without autocast only).
    It trains without decoder-norm rescaling, which SAELens' sparse backward cannot run."""
    dataset_split: str = "train"
    """Split of a Hugging Face dataset."""
    streaming: bool = True
    """Stream the dataset rather than materialising it."""
    seed: int = 42
    """Seeds SAE initialisation."""
    overwrite: bool = False
    """Replace SAE folders that already exist in ``out`` (and start over, dropping the checkpoints
    of an interrupted run in ``out/checkpoints``)."""
    resume: bool = False
    """Continue an interrupted run in ``out``: SAEs already finished there are kept, and each
    runner that was interrupted continues from its latest checkpoint in ``out/checkpoints``
    (SAELens' ``resume_from_checkpoint``). The run must have the same settings and data."""
    n_checkpoints: int = 0
    """Checkpoints saved during training, evenly spaced (SAELens' ``n_checkpoints``), besides the
    one an interruption (Ctrl-C, SIGTERM) saves. Each holds the SAEs and their Adam state."""
    preset: str | None = None
    """The preset these values came from, recorded with the run."""
    convention: str = "prefix_lm"
    """How rows feed T5Gemma 2: ``prefix_lm`` (encoder reads ``tokens[:, :p]``, decoder writes the
    continuation; the task the model was adapted for) or ``reconstruct`` (a copy task, opt-in)."""
    prefix_len: int | None = None
    """The ``prefix_lm`` split p (default ``context_size // 2``). Encoder SAEs train on positions
    ``< p``, decoder SAEs on ``>= p`` (SAELens' ``seqpos_slice``), so no SAE sees a zero row."""
    encoder_reads_full_row: bool = True
    """When every hook is on the encoder the decoder never runs, so the encoder may read the whole
    row (as in use, where it reads the whole prompt). Recorded in the SAEs' metadata."""
    disable_concat_sequences: bool = True
    """One document per row (SAELens' ``disable_concat_sequences``; shorter documents are skipped).
    The encoder is bidirectional: packed rows would let tokens attend to the next, unrelated document."""

    activations_mixing_fraction: float = 0.5
    """Fraction of SAELens' activation buffer kept back to mix with the next harvest (0: rows are
    served in harvest order, unshuffled; what an exact comparison between runs needs)."""
    parallel: str = "auto"
    """Under ``torchrun`` with N processes: ``modules`` (each rank trains some SAEs, on rows from
    every rank), ``data`` (a replica of every SAE per rank, gradients averaged), or ``auto`` (modules where every
    stack has at least N hooks). Ignored in a one-process run (see ``training.distributed``)."""

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> TrainConfig:
        """A config from a named preset (``mindchain`` or ``recommended``), then ``overrides``.

        ``None`` overrides are ignored, so command-line defaults do not mask the preset.
        """
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
        values = PRESETS[preset]()
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        values["preset"] = preset
        # A preset's sparsity knob that the chosen architecture does not take is dropped;
        # the check then asks for the right one if it is missing.
        if values.get("architecture") == "standard" and "k" not in given:
            values["k"] = None
        if values.get("architecture") in _K_ARCHITECTURES and "l1" not in given:
            values["l1"] = None
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s) {unknown}")
        missing = [n for n in ("model", "hooks", "dataset") if not values.get(n)]
        if missing:
            raise ValueError(
                f"Missing {', '.join(missing)}: preset {preset!r} does not set them (e.g. --hook encoder.5.attn_out)"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_mindchain() -> dict[str, Any]:
    """The recipe of the mindchain SAE card (``mindchain/t5gemma2-sae-all-layers``).

    Standard ReLU SAE, d_sae 4096, L1 coefficient 0.01, learning rate 1e-4, Adam(W), batch
    size 2 texts, 5 epochs of 1,500 texts, at the o_proj output. Mapped onto SAELens:

    - batch size 2 texts -> ``train_batch_size_tokens = 2 * context_size`` (256 tokens);
    - 1,500 texts x 5 epochs of at most 128 tokens -> about 1M training tokens;
    - SAELens' trainer uses Adam without weight decay; the card's AdamW with torch's default
      decay (0.01) at lr 1e-4 shrinks weights by 1e-6 per step, a negligible difference;
    - no input normalisation, as the card's loop feeds raw o_proj outputs;
    - an approximation, not a replica: SAELens' L1 term is weighted by decoder norms and its
      MSE is summed over d_in (not averaged), so the same coefficient does not give the card's
      balance; the card's context length and its input convention are not documented
      (context 128 is a guess, and the card's decoder input is unknown: ``diagnose`` estimates it).
    """
    return dict(
        architecture="standard", d_sae=4096, l1=0.01, lr=1e-4, context_size=128,
        train_batch_size_tokens=256, store_batch_size_prompts=8, training_tokens=1_000_000,
        lr_decay_fraction=0.0, exclude_special_tokens=False, normalize_activations="none",
        hooks=["encoder.*.attn_out", "decoder.*.attn_out"],
    )  # fmt: skip


def preset_recommended() -> dict[str, Any]:
    """A modern default, argued from SAELens' documentation and Gemma Scope 2's choices.

    - **BatchTopK, k = 40.** BatchTopK fixes the mean L0 directly (k), so no sparsity
      coefficient has to be searched and every run lands at the intended sparsity even on
      short budgets; SAELens saves it as a JumpReLU SAE (a threshold per latent), the same
      inference architecture as Gemma Scope 2, so the result loads and compares like Gemma
      Scope 2's SAEs. k = 40 sits in the "medium" L0 band (30-60) of Gemma Scope 2's
      four-layer releases, the band its card recommends; its every-layer ``-all`` releases
      offer only ``small`` (L0 about 10-20) and ``big`` (about 60-150). (For Gemma Scope 2's own training objective use
      ``architecture="jumprelu"`` with ``k`` as the target of the quadratic L0 loss.)
    - **Width 16k** (16,384): Gemma Scope 2's smallest width, 25x the 640-wide o_proj output;
      wider SAEs (64k, 256k) split features further but cost proportionally more.
    - **Normalised inputs** (``expected_average_only_in``, Anthropic's April 2024 recipe,
      as in SAELens' training tutorial; folded into the weights at save): coefficients and
      learning rates then transfer across sites, and attention outputs, which are small,
      train at all.
    - **lr 3e-4** (SAELens' default) with the last 20% of steps decaying linearly (the
      SAELens tutorial's schedule); 4,096-token batches; 512-token contexts (T5Gemma 2's
      sliding window), bos/eos/pad positions excluded as outliers.
    - **100M tokens** per SAE: a single-GPU budget for a 270M model, well below the budgets
      Gemma Scope trained with (billions of tokens per SAE); raise it for quality.
    """
    return dict(
        architecture="batchtopk", d_sae=16384, k=40, lr=3e-4, context_size=512,
        train_batch_size_tokens=4096, training_tokens=100_000_000,
        lr_decay_fraction=0.2, exclude_special_tokens=True,
    )  # fmt: skip


PRESETS = {"mindchain": preset_mindchain, "recommended": preset_recommended}


def _check_numbers(cfg: TrainConfig) -> None:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {cfg.architecture!r}: expected one of {list(ARCHITECTURES)}")
    positive = {
        "d_sae": cfg.d_sae, "training_tokens": cfg.training_tokens, "context_size": cfg.context_size,
        "train_batch_size_tokens": cfg.train_batch_size_tokens,
        "eval_every_n_steps": cfg.eval_every_n_steps, "n_eval_batches": cfg.n_eval_batches,
        "n_batches_for_norm_estimate": cfg.n_batches_for_norm_estimate,
    }  # fmt: skip
    if cfg.store_batch_size_prompts is not None:
        positive["store_batch_size_prompts"] = cfg.store_batch_size_prompts
    for name in ("n_batches_in_buffer", "eval_batch_size_prompts"):
        if getattr(cfg, name) is not None:
            positive[name] = getattr(cfg, name)
    for name, value in positive.items():
        if not _whole(value) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("lr_warm_up_steps", "n_checkpoints"):
        if not _whole(getattr(cfg, name)) or getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {getattr(cfg, name)!r}")
    if not _whole(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed must be a whole number in [0, 2**32), got {cfg.seed!r}")
    if cfg.context_size < 2:
        raise ValueError(
            f"context_size must be at least 2, got {cfg.context_size} (each row starts with BOS, which "
            "exclude_special_tokens drops, and prefix_lm splits the row in two)"
        )
    for name in (
        "lr",
        "k",
        "l1",
        "lr_decay_fraction",
        "sparsity_warm_up_fraction",
        "activations_mixing_fraction",
    ):
        value = getattr(cfg, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    memory_budget(cfg.max_memory)
    if not cfg.lr > 0:
        raise ValueError(f"lr must be positive, got {cfg.lr!r}")
    if cfg.resume and cfg.overwrite:
        raise ValueError(
            "resume and overwrite exclude each other: resume continues the run in out, overwrite starts it over"
        )
    if cfg.training_tokens < cfg.train_batch_size_tokens:
        raise ValueError(
            f"training_tokens ({cfg.training_tokens}) is smaller than one SAE batch "
            f"(train_batch_size_tokens={cfg.train_batch_size_tokens})"
        )
    if cfg.architecture in _K_ARCHITECTURES:
        if cfg.k is None:
            raise ValueError(f"architecture {cfg.architecture!r} needs k (the number of active latents)")
        if cfg.l1 is not None:
            raise ValueError(
                f"architecture {cfg.architecture!r} takes k, not an L1 coefficient (got l1={cfg.l1})"
            )
    if cfg.architecture == "standard":
        if cfg.l1 is None:
            raise ValueError("architecture 'standard' needs l1 (the L1 coefficient)")
        if cfg.k is not None:
            raise ValueError(f"architecture 'standard' takes an L1 coefficient, not k (got k={cfg.k})")
    if cfg.architecture == "jumprelu" and cfg.k is None and cfg.l1 is None:
        raise ValueError("architecture 'jumprelu' needs k (target L0, quadratic loss) or l1 (L0 coefficient)")
    if cfg.k is not None and not 0 < cfg.k <= cfg.d_sae:
        raise ValueError(f"k must be in (0, d_sae={cfg.d_sae}], got {cfg.k}")
    if cfg.architecture == "topk" and not float(cfg.k).is_integer():  # type: ignore[arg-type]
        raise ValueError(f"topk needs a whole number k, got {cfg.k}")
    if cfg.l1 is not None and cfg.l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {cfg.l1}")
    if cfg.architecture == "matryoshka":
        widths = _matryoshka_widths(cfg)
        if (
            any(b <= a for a, b in zip(widths, widths[1:], strict=False))
            or widths[0] <= 0
            or widths[-1] != cfg.d_sae
        ):
            raise ValueError(
                f"matryoshka_widths must increase strictly and end at d_sae={cfg.d_sae}, got {widths}"
            )
    for name in ("lr_decay_fraction", "sparsity_warm_up_fraction", "activations_mixing_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    if (
        cfg.n_batches_in_buffer is not None
        and cfg.n_batches_in_buffer * cfg.context_size < cfg.train_batch_size_tokens
    ):
        raise ValueError(
            f"n_batches_in_buffer x context_size = {cfg.n_batches_in_buffer} x {cfg.context_size} tokens is smaller "
            f"than one SAE batch ({cfg.train_batch_size_tokens} tokens); raise n_batches_in_buffer to at least "
            f"{math.ceil(cfg.train_batch_size_tokens / cfg.context_size)}"
        )
    if cfg.normalize_activations not in (
        "none",
        "expected_average_only_in",
        "layer_norm",
        "constant_norm_rescale",
    ):
        raise ValueError(f"Unknown normalize_activations {cfg.normalize_activations!r}")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.model_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"model_dtype must be auto, float32, bfloat16 or float16, got {cfg.model_dtype!r}")
    if cfg.sparse_decode and cfg.architecture != "topk":
        raise ValueError(
            f"sparse_decode is SAELens' TopK option (use_sparse_activations); architecture {cfg.architecture!r} "
            "has none"
        )
    if cfg.release_name is not None:
        _check_release_name(cfg.release_name)
    if cfg.parallel not in ("auto", "modules", "data"):
        raise ValueError(f"parallel must be auto, modules or data, got {cfg.parallel!r}")
    if cfg.convention not in ("prefix_lm", "reconstruct"):
        raise ValueError(f"Unknown convention {cfg.convention!r}: expected 'prefix_lm' or 'reconstruct'")
    if cfg.prefix_len is not None and (
        not isinstance(cfg.prefix_len, int)
        or isinstance(cfg.prefix_len, bool)
        or not 0 < cfg.prefix_len < cfg.context_size
    ):
        raise ValueError(
            f"prefix_len must be a whole number in [1, context_size - 1] = [1, {cfg.context_size - 1}], got "
            f"{cfg.prefix_len!r} (SAELens' seqpos_slice is fixed per run, so a random split cannot train)"
        )


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_release_name(name: str) -> None:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from sae_lens_t5gemma.loading import registration as registration

    if not _RELEASE_NAME.match(name):
        raise ValueError(f"Release name {name!r}: use letters, digits, '.', '_' and '-' only")
    existing = get_pretrained_saes_directory().get(name)
    if existing is not None and (name not in registration.ours() or name == registration.PACKAGE_RELEASE):
        raise ValueError(
            f"Release name {name!r} is taken (an existing release, repo {existing.repo_id}); choose another"
        )


def _matryoshka_widths(cfg: TrainConfig) -> list[int]:
    if cfg.matryoshka_widths:
        return list(cfg.matryoshka_widths)
    return sorted({w for w in (cfg.d_sae // 16, cfg.d_sae // 4, cfg.d_sae) if w > 0})
