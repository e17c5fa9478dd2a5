"""What to train: the training config, its presets, and every check made before a model loads.

``TrainConfig`` says what a run trains (model, hooks by friendly name with wildcards,
dataset, architecture, width, sparsity, token budget). ``plan_training`` turns it into a
``TrainingPlan`` reading only the model's ``config.json``: hooks expanded through
``sites.py``, widths per site, dataset files found, and every number checked, so bad input
fails before any weights load. ``training.py`` runs the plan with SAELens' runners.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import default_dtype, dtype_name, resolve_dtype
from sae_lens_t5gemma.model.sites import Site

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

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
_LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json"}
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


# ------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ModelDims:
    """What training needs to know about the model, read from its config alone."""

    name: str
    n_layers: dict[str, int]
    d_model: dict[str, int]
    d_attn: dict[str, int]

    def d_in(self, site: Site) -> int:
        return self.d_attn[site.stack] if site.kind.friendly == "attn_z" else self.d_model[site.stack]


@dataclass(frozen=True)
class TrainingPlan:
    """The validated run: which SAEs at which hooks, with which widths. No model loaded."""

    config: TrainConfig
    dims: ModelDims
    sites: tuple[Site, ...]
    dataset_files: tuple[Path, ...]
    """Local dataset files (empty for a Hugging Face dataset)."""
    stacks: tuple[str, ...] = ()
    """The stacks of the whole run (kept when a run is split per stack)."""
    harvest_dtype: str = ""
    """The model's dtype as loaded (set by ``train``; empty: ``model_dtype`` resolved on ``device``)."""

    @property
    def model_dtype(self) -> str:
        """The dtype the model harvests in: ``float32``, ``bfloat16`` or ``float16``."""
        cfg = self.config
        return self.harvest_dtype or dtype_name(resolve_dtype(cfg.model_dtype, cfg.device, "training"))

    @property
    def sae_ids(self) -> list[str]:
        return [s.friendly for s in self.sites]

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def dataset_label(self) -> str:
        if self.dataset_files:
            return ",".join(str(p) for p in self.dataset_files)
        return str(self.config.dataset)

    @property
    def encoder_only(self) -> bool:
        return set(self.stacks or (s.stack for s in self.sites)) == {"encoder"}

    @property
    def split(self) -> int:
        """The model's ``prefix_len`` for this run: ``context_size`` when the encoder reads whole rows."""
        cfg = self.config
        if self.encoder_only and cfg.encoder_reads_full_row:
            return cfg.context_size
        return cfg.prefix_len or cfg.context_size // 2

    def seqpos_slice(self, stack: str) -> tuple[int | None, ...]:
        """SAELens' ``seqpos_slice`` for a stack: exactly the positions it computes from a token."""
        if self.config.convention == "reconstruct":
            return (None,)
        p = self.split
        return (None, p) if stack == "encoder" else (p, None)

    def convention_metadata(self, stack: str) -> dict[str, Any]:
        """What every SAE of this run records about how the model was fed."""
        cfg = self.config
        if cfg.convention == "reconstruct":
            words = "reconstruct: encoder and decoder read the same row (a copy task)"
        elif self.encoder_only and cfg.encoder_reads_full_row:
            words = "prefix_lm, encoder-only run: the encoder read the whole row (the decoder never ran)"
        else:
            words = (
                f"prefix_lm: encoder read tokens[:, :{self.split}], decoder read [BOS] + tokens[:, {self.split}:]; "
                f"this {stack} SAE trained on positions {self.seqpos_slice(stack)}"
            )
        return {
            "t5gemma2_convention": cfg.convention,
            "t5gemma2_prefix_len": None if cfg.convention == "reconstruct" else self.split,
            INPUT_CONVENTION_KEY: words,
            "t5gemma2_model_dtype": self.model_dtype,
        }

    @property
    def total_steps(self) -> int:
        return self.config.training_tokens // self.config.train_batch_size_tokens

    def covered_len(self, stack: str) -> int:
        """Positions per row that a stack's SAEs train on (the length of its ``seqpos_slice``)."""
        start, stop = (*self.seqpos_slice(stack), None)[:2]
        return len(range(self.config.context_size)[slice(start, stop)])

    def store_sizing(self, sites: Sequence[Site] | None = None) -> StoreSizing:
        """Prompts per forward and buffer size for the runner of ``sites`` (default: the first stack's).

        The runner's activation path holds, per token, the total width W of all its hooks; the
        estimate (:func:`store_bytes`) must fit ``max_memory``. Quality comes first: the mixing
        buffer keeps four SAE batches if it can, then three, then two (never fewer), and only
        then the prompts per forward shrink (16, 8, 4, 2, 1).

        Raises:
            ValueError: not even one prompt per forward and a two-batch buffer fit the budget.
        """
        cfg = self.config
        if sites is None:  # the first stack's runner (a run over both stacks has one runner per stack)
            sites = [s for s in self.sites if s.stack == self.sites[0].stack]
        sites = tuple(sites)
        width = sum(self.dims.d_in(s) for s in sites)
        stack = sites[0].stack
        covered = self.covered_len(stack)
        budget = memory_budget(cfg.max_memory)
        batch = cfg.train_batch_size_tokens
        if cfg.n_batches_in_buffer is not None:
            buffers = [cfg.n_batches_in_buffer]
        else:
            buffers = [math.ceil(n * batch / covered) for n in (4, 3, 2)]
        prompts = [cfg.store_batch_size_prompts] if cfg.store_batch_size_prompts else [16, 8, 4, 2, 1]
        tried = []
        for n_buf in buffers:
            for p in prompts:
                need = store_bytes(width, p, cfg.context_size, covered, n_buf * covered, batch)
                tried.append(need)
                if need <= budget:
                    n_norm = max(1, min(cfg.n_batches_for_norm_estimate, self.total_steps))
                    # SAELens' multi-hook runner keeps every norm-estimation batch of every hook at once.
                    n_norm = max(1, min(n_norm, (budget - need) // (batch * width * 4) or 1))
                    d_in = max(self.dims.d_in(s) for s in sites)
                    return StoreSizing(
                        p, n_buf, width, budget, need, n_norm,
                        buffer_bytes=4 * width * (n_buf * covered + p * covered),
                        step_bytes=sae_step_bytes(batch, cfg.d_sae, d_in),
                        sae_state_bytes=sum(sae_state_bytes(self.dims.d_in(s), cfg.d_sae) for s in sites),
                    )  # fmt: skip
        raise ValueError(
            f"max_memory={_gib(budget)} is too small for the activation store of {len(sites)} hook(s) "
            f"({width} floats per token, {sites[0].friendly}...): it needs at least {_gib(min(tried))} "
            f"(1 prompt per forward, a buffer of two SAE batches of {batch} tokens). Raise max_memory, "
            "lower train_batch_size_tokens, or train fewer hooks per run."
        )

    @property
    def n_batches_in_buffer(self) -> int:
        """The buffer of the plan's first stack (see :meth:`store_sizing`)."""
        return self.store_sizing().n_batches_in_buffer


@dataclass(frozen=True)
class StoreSizing:
    """How one runner's activation store is sized (see :meth:`TrainingPlan.store_sizing`)."""

    store_batch_size_prompts: int
    n_batches_in_buffer: int
    width: int
    """Total width of the runner's hooks (floats per token)."""
    budget_bytes: int
    estimate_bytes: int
    """The store's estimated peak (:func:`store_bytes`), within ``budget_bytes``."""
    n_batches_for_norm_estimate: int
    buffer_bytes: int = 0
    """The filled mixing buffer (one copy): alive while the SAEs step."""
    step_bytes: int = 0
    """One SAE step's transient tensors (:func:`sae_step_bytes`); the SAEs step one at a time."""
    sae_state_bytes: int = 0
    """The runner's SAEs with their gradients and Adam moments (:func:`sae_state_bytes`)."""

    @property
    def activation_bytes(self) -> int:
        """Estimated peak of the activation path: the store's peak while harvesting and mixing,
        or the filled buffer plus one SAE step, whichever is larger (they do not overlap)."""
        return max(self.estimate_bytes, self.buffer_bytes + self.step_bytes)

    @property
    def peak_bytes(self) -> int:
        """Estimated peak above the model's weights: the activation path plus the SAEs' state."""
        return self.activation_bytes + self.sae_state_bytes


# Checked against per-phase peaks (VmHWM reset at each phase boundary) of a real 18-hook runner
# in benchmarks/bench_training.py (worker mem36): the mixing buffer's peak matched
# _BUFFER_COPIES, once glibc returns freed tensors at once (training._return_freed_memory_to_the_os).
#
# Copies of one forward's activations alive at once in SAELens' multi-hook path: the hook cache,
# the device move/reshape of the sliced view, the special-token mask, and the per-hook concatenation.
_FORWARD_COPIES = 4
# The mixing buffer: torch.cat([kept, new]) and the shuffled copy both exist next to the old buffer.
_BUFFER_COPIES = 2
# The model's own transient activations per token of a forward (float32 MLP and attention
# intermediates of one layer, T5Gemma 2 270m widths), bytes: small next to many hooks' caches.
_MODEL_BYTES_PER_TOKEN = 64 * 1024


def store_bytes(width: int, prompts: int, context: int, covered: int, buffer_tokens: int, batch: int) -> int:
    """Estimated peak bytes of SAELens' activation path for hooks of total ``width`` floats per token.

    ``prompts`` x ``context`` tokens per forward (``covered`` of each row kept), a mixing buffer
    of ``buffer_tokens``, SAE batches of ``batch`` tokens; activations in float32 (4 bytes).
    Checked against measured peaks by ``benchmarks/bench_training.py``.
    """
    forward = prompts * context
    kept = prompts * covered
    acts = 4 * width * (_FORWARD_COPIES * forward + _BUFFER_COPIES * (buffer_tokens + kept) + batch)
    return acts + _MODEL_BYTES_PER_TOKEN * forward


# One BatchTopK step (SAELens' TrainingSAE forward and backward, Adam) holds about this many
# batch x d_sae float32 tensors at its peak (hidden_pre, the top-k mask and values,
# feature_acts and their gradients): measured 8.6 at d_sae 4096 and 10.2 at d_sae 16384
# (batch 4096; benchmarks/bench_training.py, workers mem36 and mem1).
_STEP_COPIES = 10


def sae_step_bytes(batch: int, d_sae: int, d_in: int) -> int:
    """Estimated transient bytes of one SAE training step on ``batch`` tokens (float32)."""
    return 4 * batch * (_STEP_COPIES * d_sae + 4 * d_in)


def sae_state_bytes(d_in: int, d_sae: int) -> int:
    """Bytes of one SAE in training: float32 weights, gradients and two Adam moments (16 B/parameter)."""
    return 16 * (2 * d_in * d_sae + 2 * d_sae + d_in)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def memory_budget(max_memory: int | str | None) -> int:
    """``max_memory`` in bytes; None: 1/16 of the machine's RAM, at least 512 MiB.

    Raises:
        ValueError: not a positive byte count or a size like ``"1.5GiB"``.
    """
    if max_memory is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 * 2**30  # no sysconf (not POSIX): assume a small machine
        return max(512 * 2**20, total // 16)
    if isinstance(max_memory, bool):
        raise ValueError(f"max_memory must be a byte count or a size like '1.5GiB', got {max_memory!r}")
    if isinstance(max_memory, (int, float)):
        value = float(max_memory)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]i?[bB]|[bB]|)\s*", str(max_memory))
        if not m:
            raise ValueError(f"max_memory must be a byte count or a size like '1.5GiB', got {max_memory!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value >= 1:
        raise ValueError(f"max_memory must be positive, got {max_memory!r}")
    return int(value)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def read_model_dims(model: str) -> ModelDims:
    """Read layer counts and widths from the model's config only (no weights are loaded).

    Raises:
        FileNotFoundError: a local folder without ``config.json``, or a hub id that cannot be
            resolved (offline and not cached, or misspelled).
        ValueError: the config is not a T5Gemma 2 config.
    """
    from transformers import AutoConfig

    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"Model folder {str(path)!r} has no config.json (expected a save_pretrained folder)"
        )
    try:
        config = AutoConfig.from_pretrained(str(path) if looks_local else model)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"Cannot read the config of model {model!r}: {e}. Pass a hub id that is cached or reachable, "
            "or a local folder saved with save_pretrained."
        ) from e
    if getattr(config, "model_type", None) != "t5gemma2":
        raise ValueError(
            f"Model {model!r} is a {getattr(config, 'model_type', '?')!r} model, not a T5Gemma 2 model"
        )
    enc, dec = config.encoder.text_config, config.decoder
    return ModelDims(
        name=str(path.resolve()) if looks_local else model,
        n_layers={"encoder": enc.num_hidden_layers, "decoder": dec.num_hidden_layers},
        d_model={"encoder": enc.hidden_size, "decoder": dec.hidden_size},
        d_attn={
            "encoder": enc.num_attention_heads * enc.head_dim,
            "decoder": dec.num_attention_heads * dec.head_dim,
        },
    )


def expand_hooks(patterns: Sequence[str], dims: ModelDims) -> list[Site]:
    """Expand friendly hook patterns into sites, in order, without duplicates.

    Raises:
        ValueError: a pattern matches nothing, or names a layer the model does not have.
    """
    if not patterns:
        raise ValueError(
            "No hooks given: pass at least one, e.g. 'encoder.5.attn_out' or 'decoder.*.attn_out'"
        )
    n_max = max(dims.n_layers.values())
    out: list[Site] = []
    for pattern in patterns:
        for s in sites_mod.expand(pattern, n_max):
            if s.layer >= dims.n_layers[s.stack]:
                raise ValueError(
                    f"Hook {pattern!r}: the {s.stack} of {dims.name} has {dims.n_layers[s.stack]} layers "
                    f"(0-{dims.n_layers[s.stack] - 1}), no layer {s.layer}"
                )
            if s not in out:
                out.append(s)
    return out


def resolve_dataset_files(dataset: str | Sequence[str] | Path) -> tuple[Path, ...]:
    """Local dataset files named by ``dataset``; an empty tuple means a Hugging Face dataset name.

    Raises:
        FileNotFoundError: a path that looks local (a file suffix or a path separator) is missing.
        ValueError: an unsupported suffix, an empty folder, a mix of text and JSON files, a line
            that is not UTF-8, or a JSONL line that is not an object with a ``text``/``tokens``/
            ``input_ids`` field.
    """
    items = [dataset] if isinstance(dataset, (str, Path)) else list(dataset)
    if not items:
        raise ValueError("No dataset given")
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in _LOCAL_SUFFIXES and q.is_file())
            if not found:
                raise ValueError(f"Dataset folder {str(p)!r} holds no .txt or .jsonl files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in _LOCAL_SUFFIXES:
                raise ValueError(
                    f"Dataset file {str(p)!r}: unsupported suffix {p.suffix!r} (use .txt or .jsonl)"
                )
            files.append(p)
        elif (
            isinstance(item, str)
            and len(items) == 1
            and p.suffix not in _LOCAL_SUFFIXES
            and not item.startswith((".", "/", "~"))
        ):
            return ()  # a Hugging Face dataset name
        else:
            raise FileNotFoundError(f"Dataset file {str(p)!r} does not exist")
    kinds = {_LOCAL_SUFFIXES[f.suffix] for f in files}
    if len(kinds) > 1:
        raise ValueError(f"Dataset mixes text and JSON files ({[str(f) for f in files]}); pass one kind")
    column: list[str] = []
    for f in files:
        _check_local_file(f, column)
    return tuple(f.resolve() for f in files)


# The field SAELens' ActivationsStore reads, by preference, decided by the dataset's first row.
_COLUMNS = ("tokens", "input_ids", "text")


def _check_field(path: Path, n: int, name: str, value: Any) -> None:
    if name == "text":
        if not isinstance(value, str):
            raise ValueError(
                f"Dataset file {str(path)!r} line {n}: 'text' must be a string, got {value!r:.80}"
            )
        return
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise ValueError(
            f"Dataset file {str(path)!r} line {n}: {name!r} must be a list of token ids (whole numbers >= 0), "
            f"got {json.dumps(value)[:80]}"
        )


def _check_local_file(path: Path, column: list[str] | None = None) -> None:
    """Every line: UTF-8, and for ``.jsonl`` a JSON object whose fields have the right types and
    that holds the field SAELens reads (chosen by the dataset's first row, kept in ``column``),
    so that a bad line fails here, before the model loads, not hours into a run."""
    kind = _LOCAL_SUFFIXES[path.suffix]
    column = [] if column is None else column
    seen = False
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"Dataset file {str(path)!r} line {n} is not UTF-8 text ({e.reason} at byte {e.start})"
                ) from e
            if not line.strip():
                continue
            seen = True
            if kind == "text":
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"Dataset file {str(path)!r} line {n} is not valid JSON: {e}") from e
            if not isinstance(record, dict) or not {"text", "tokens", "input_ids"} & set(record):
                raise ValueError(
                    f"Dataset file {str(path)!r} line {n}: expected a JSON object with a 'text' field "
                    f"(or 'tokens'/'input_ids'), got {line.strip()[:80]!r}"
                )
            for name in _COLUMNS:
                if name in record:
                    _check_field(path, n, name, record[name])
            if not column:
                column.append(next(c for c in _COLUMNS if c in record))
            elif column[0] not in record:
                raise ValueError(
                    f"Dataset file {str(path)!r} line {n}: no {column[0]!r} field, which the dataset's first row "
                    "has and SAELens reads from every row"
                )
    if not seen:
        raise ValueError(f"Dataset file {str(path)!r} is empty")


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
    for name in ("lr", "k", "l1", "lr_decay_fraction", "sparsity_warm_up_fraction"):
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
    for name in ("lr_decay_fraction", "sparsity_warm_up_fraction"):
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


def plan_training(cfg: TrainConfig) -> TrainingPlan:
    """Check a config completely, without loading the model or the dataset.

    Reads the model's ``config.json`` (for layer counts and widths), expands the hooks,
    checks the numbers, the local dataset files and the output folder.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: with a message naming the bad field.
    """
    _check_numbers(cfg)
    files = resolve_dataset_files(cfg.dataset)
    dims = read_model_dims(cfg.model)
    sites = expand_hooks(cfg.hooks, dims)
    out = Path(cfg.out)
    check_output_path(out)
    if not cfg.overwrite and not cfg.resume:
        taken = [s.friendly for s in sites if (out / s.friendly / "cfg.json").exists()]
        if taken:
            raise FileExistsError(
                f"Output folder {str(out)!r} already holds SAE(s) {taken}; choose another --out, pass --resume "
                "to continue an interrupted run there, or overwrite"
            )
    plan = TrainingPlan(cfg, dims, tuple(sites), files, tuple(dict.fromkeys(s.stack for s in sites)))
    _check_encoder_keeps_a_token(plan)
    if files:
        _check_documents(cfg, files)
    return plan


def check_output_path(out: Path) -> None:
    """``out`` is a folder, or one can be made there: no file on the way, and writable.

    Raises:
        FileExistsError: ``out`` or a folder above it is a file (or a dangling symlink).
        PermissionError: the folder to write into (or to create ``out`` and its lock in) is read-only.
    """
    for p in (out, *out.parents):
        if p.is_symlink() and not p.exists():
            raise FileExistsError(f"Output path {str(out)!r}: {str(p)!r} is a symlink to a missing target")
        if not p.exists():
            continue
        if not p.is_dir():
            where = (
                "exists and is not a folder"
                if p == out
                else f"lies inside {str(p)!r}, which is a file, not a folder"
            )
            raise FileExistsError(f"Output path {str(out)!r} {where}")
        # The lock lies beside out (outputs.lock_path), so out's parent is written too.
        for folder in {p, out.parent} if p == out else {p}:
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"Output path {str(out)!r}: folder {str(folder)!r} is not writable")
        return


def _check_encoder_keeps_a_token(plan: TrainingPlan) -> None:
    """Under prefix_lm the encoder's SAEs train on positions ``< p``; position 0 holds BOS in every
    row of text, which exclude_special_tokens drops, so ``p = 1`` would leave them nothing (and
    SAELens would wait forever for an activation)."""
    cfg = plan.config
    encoder = any(s.stack == "encoder" for s in plan.sites)
    if encoder and cfg.convention == "prefix_lm" and cfg.exclude_special_tokens and plan.split < 2:
        given = (
            f"prefix_len={cfg.prefix_len}"
            if cfg.prefix_len
            else f"context_size={cfg.context_size} (p = context_size // 2)"
        )
        raise ValueError(
            f"{given}: the encoder's SAEs would train on position 0 only, which holds BOS in every row and "
            "exclude_special_tokens drops; use a context_size of at least 4 or prefix_len >= 2"
        )


def _check_documents(cfg: TrainConfig, files: Sequence[Path], max_docs: int = 2000) -> None:
    """Read the first documents with the model's tokenizer, before the model loads.

    - With exclude_special_tokens, some token must be other than bos/eos/pad (SAELens' special
      ids): a dataset of special tokens only leaves SAELens waiting forever for an activation.
    - Pretokenized rows (``tokens``/``input_ids``) must hold ``context_size`` tokens (SAELens
      cuts each row to the context and does not pack them).
    - With one text per row, SAELens skips texts shorter than a row; some must reach it.
    """
    from sae_lens.util import get_special_token_ids
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError):
        return  # no tokenizer to count with here; SAELens reports a too-small dataset itself
    special = set(get_special_token_ids(tokenizer)) if cfg.exclude_special_tokens else set()
    seen = usable = 0
    fills_a_row = False
    for f in files:
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = json.loads(line) if f.suffix == ".jsonl" else {"text": line.rstrip("\n")}
                column = next(c for c in _COLUMNS if c in record)
                if column == "text":
                    ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
                    fills_a_row = fills_a_row or len(ids) + 1 >= cfg.context_size  # SAELens prepends BOS
                else:
                    ids = record[column]
                    if len(ids) < cfg.context_size:
                        raise ValueError(
                            f"Dataset file {str(f)!r} line {n}: {len(ids)} token ids, fewer than context_size="
                            f"{cfg.context_size} (SAELens cuts pretokenized rows to the context, never packs them)"
                        )
                    ids = ids[: cfg.context_size]
                    fills_a_row = True
                usable += sum(1 for t in ids if t not in special)
                seen += 1
                if seen >= max_docs:
                    break
        if seen >= max_docs:
            break
    names = [str(f) for f in files]
    if not usable:
        raise ValueError(
            f"Dataset {names}: the first {seen} documents hold only special tokens (ids {sorted(special)}: "
            "bos/eos/pad...), which exclude_special_tokens drops, so there is nothing to train on"
        )
    if cfg.disable_concat_sequences and not fills_a_row:
        raise ValueError(
            f"Dataset {names}: none of the first {seen} documents reaches context_size="
            f"{cfg.context_size} tokens, and rows hold one document each (disable_concat_sequences), so "
            "SAELens would skip them all. Pass --pack (disable_concat_sequences=False) or a smaller --context-size."
        )


# ---------------------------------------------------------------------------- dataset


def load_training_dataset(plan_or_cfg: TrainingPlan | TrainConfig) -> Dataset | IterableDataset:
    """Load the run's dataset with ``datasets`` (local files via the text/json builders).

    Raises:
        ValueError: a Hugging Face dataset that cannot be loaded (unknown, offline, no split).
    """
    from datasets import load_dataset

    plan = plan_or_cfg if isinstance(plan_or_cfg, TrainingPlan) else None
    cfg = plan.config if plan else plan_or_cfg  # type: ignore[union-attr]
    files = plan.dataset_files if plan else resolve_dataset_files(cfg.dataset)
    if files:
        builder = _LOCAL_SUFFIXES[files[0].suffix]
        # Streaming reads the files lazily and writes no arrow cache.
        ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
        if builder == "text":
            ds = ds.filter(lambda row: bool(row["text"].strip()))
        return ds
    name = str(cfg.dataset)
    try:
        return load_dataset(name, split=cfg.dataset_split, streaming=cfg.streaming)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " The hub is offline (HF_HUB_OFFLINE set)." if offline else ""
        raise ValueError(
            f"Cannot load the Hugging Face dataset {name!r} (split {cfg.dataset_split!r}): "
            f"{type(e).__name__}: {e}.{hint} For local data pass .txt or .jsonl files."
        ) from e


def write_text_dataset(texts: Sequence[str], path: str | Path) -> Path:
    """Write texts as a JSONL dataset (one ``{"text": ...}`` per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return path
