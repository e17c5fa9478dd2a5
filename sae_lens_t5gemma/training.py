"""Train SAEs on T5Gemma 2 with SAELens' own runners.

SAELens trains SAEs with three runners, and each of them runs here unchanged on T5Gemma 2:

- ``LanguageModelSAETrainingRunner``: one SAE at one hook, any architecture;
- ``MultiSAETrainingRunner``: one SAE per hook, all fed by a single forward pass;
- ``CacheActivationsRunner``: activations cached to disk as a Hugging Face dataset, then
  trained from with ``use_cached_activations=True``.

They reach T5Gemma 2 through ``override_model=HookedT5Gemma2(...)``, which serves SAELens'
``run_with_cache(tokens, names_filter=..., stop_at_layer=...)`` calls with the encoder-
decoder input convention (encoder sees the tokens, decoder sees them shifted right, labels
are the tokens). This module only builds the runner configs from a small ``TrainConfig``
(model, hooks by friendly name with wildcards, dataset, architecture, width, sparsity,
token budget), checks all of it before any model is loaded, and writes SAELens-native
folders that ``SAE.load_from_disk`` reads, plus a release YAML so that
``SAE.from_pretrained(release=..., sae_id=...)`` loads them by name.

About the eval scores: SAELens' CE-loss and KL scores splice the SAE into the model and
compare losses. Under this package's convention the labels are the input tokens, which the
encoder has already read, so the scores measure how well the model still reproduces its
input with the SAE spliced in, not free language modelling.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma import sites as sites_mod
from sae_lens_t5gemma.sites import Site

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from sae_lens import SAE, TrainingSAE, TrainingSAEConfig
    from transformer_lens.hook_points import HookedRootModule

# Written into every trained SAE's metadata: how the hooked model feeds T5Gemma 2, so a
# reader of the SAE knows which activations it was trained on.
INPUT_CONVENTION = "encoder=tokens; decoder=shift_right(tokens); labels=tokens"
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
# The multi-hook runner keeps its norm-estimation batches for every hook in memory at once.
_NORM_ESTIMATE_BYTES = 2 * 1024**3


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
    store_batch_size_prompts: int = 16
    """Sequences per model forward pass while harvesting activations."""
    n_batches_in_buffer: int | None = None
    """Activation buffer, in sequences (SAELens: n_batches_in_buffer x context_size tokens);
    None picks enough for four SAE batches (at least 16). Must hold at least one SAE batch."""
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
    """SAE and activation dtype."""
    model_dtype: str = "float32"
    """Model weights dtype (float32 or bfloat16)."""
    dataset_split: str = "train"
    """Split of a Hugging Face dataset."""
    streaming: bool = True
    """Stream the dataset rather than materialising it."""
    seed: int = 42
    """Seeds SAE initialisation."""
    overwrite: bool = False
    """Replace SAE folders that already exist in ``out``."""
    preset: str | None = None
    """The preset these values came from, recorded with the run."""

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
    - SAELens' L1 term is weighted by decoder norms and its MSE is summed over d_in (not
      averaged), so the same coefficient does not give the same balance as the card's loop. With inputs
      normalised to norm sqrt(d_in), L1 0.01 is weak, which reproduces the card's
      character: a dense SAE (the card reports L0 about 1,367 of 4,096).
    """
    return dict(
        architecture="standard", d_sae=4096, l1=0.01, lr=1e-4, context_size=128,
        train_batch_size_tokens=256, store_batch_size_prompts=8, training_tokens=1_000_000,
        lr_decay_fraction=0.0, exclude_special_tokens=False, hooks=["encoder.*.attn_out", "decoder.*.attn_out"],
    )  # fmt: skip


def preset_recommended() -> dict[str, Any]:
    """A modern default, argued from SAELens' documentation and Gemma Scope 2's choices.

    - **BatchTopK, k = 40.** BatchTopK fixes the mean L0 directly (k), so no sparsity
      coefficient has to be searched and every run lands at the intended sparsity even on
      short budgets; SAELens saves it as a JumpReLU SAE (a threshold per latent), the same
      inference architecture as Gemma Scope 2, so the result loads and compares like Gemma
      Scope 2's SAEs. k = 40 sits in Gemma Scope 2's "medium" L0 band (30-60), the band its
      card recommends for most tasks. (For Gemma Scope 2's own training objective use
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
    - **100M tokens** per SAE: a single-GPU budget for a 270M model; raise it for quality.
    """
    return dict(
        architecture="batchtopk", d_sae=16384, k=40, lr=3e-4, context_size=512,
        train_batch_size_tokens=4096, store_batch_size_prompts=16, training_tokens=100_000_000,
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
    def total_steps(self) -> int:
        return self.config.training_tokens // self.config.train_batch_size_tokens

    @property
    def n_batches_in_buffer(self) -> int:
        cfg = self.config
        if cfg.n_batches_in_buffer is not None:
            return cfg.n_batches_in_buffer
        # Four SAE batches: the mixing buffer shuffles tokens across sequences within it.
        return max(16, math.ceil(4 * cfg.train_batch_size_tokens / cfg.context_size))


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
        ValueError: an unsupported suffix, an empty folder, a mix of text and JSON files, or a
            JSONL file whose first record has no ``text``/``tokens``/``input_ids`` field.
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
    for f in files:
        _check_local_file(f)
    return tuple(f.resolve() for f in files)


def _check_local_file(path: Path) -> None:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if _LOCAL_SUFFIXES[path.suffix] == "text":
                return
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"Dataset file {str(path)!r} line {n} is not valid JSON: {e}") from e
            if not isinstance(record, dict) or not {"text", "tokens", "input_ids"} & set(record):
                raise ValueError(
                    f"Dataset file {str(path)!r} line {n}: expected a JSON object with a 'text' field "
                    f"(or 'tokens'/'input_ids'), got {line.strip()[:80]!r}"
                )
            return
    raise ValueError(f"Dataset file {str(path)!r} is empty")


def _check_numbers(cfg: TrainConfig) -> None:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {cfg.architecture!r}: expected one of {list(ARCHITECTURES)}")
    positive = {
        "d_sae": cfg.d_sae, "training_tokens": cfg.training_tokens, "context_size": cfg.context_size,
        "train_batch_size_tokens": cfg.train_batch_size_tokens, "store_batch_size_prompts": cfg.store_batch_size_prompts,
        "eval_every_n_steps": cfg.eval_every_n_steps, "n_eval_batches": cfg.n_eval_batches,
        "n_batches_for_norm_estimate": cfg.n_batches_for_norm_estimate,
    }  # fmt: skip
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be positive, got {cfg.lr!r}")
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
    for name in ("dtype", "model_dtype"):
        if getattr(cfg, name) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(cfg, name)!r}")
    if cfg.release_name is not None:
        _check_release_name(cfg.release_name)


def _check_release_name(name: str) -> None:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from sae_lens_t5gemma import registration

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
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"Output path {str(out)!r} exists and is not a folder")
    if not cfg.overwrite:
        taken = [s.friendly for s in sites if (out / s.friendly / "cfg.json").exists()]
        if taken:
            raise FileExistsError(
                f"Output folder {str(out)!r} already holds SAE(s) {taken}; choose another --out or pass overwrite"
            )
    return TrainingPlan(cfg, dims, tuple(sites), files)


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


# ----------------------------------------------------------------------- SAE configs


def sae_metadata(site: Site, model_name: str) -> dict[str, Any]:
    """The T5Gemma 2 metadata every trained SAE carries (beyond SAELens' own fields)."""
    return {
        "model_name": model_name,
        "hook_name": site.hook_name,
        "hf_hook_name": f"{site.hf_module}.{site.kind.hf_io}",
        "t5gemma2_site": site.friendly,
        INPUT_CONVENTION_KEY: INPUT_CONVENTION,
    }


def build_sae_config(cfg: TrainConfig, d_in: int, site: Site, model_name: str) -> TrainingSAEConfig:
    """The SAELens ``TrainingSAEConfig`` for one site, per the architecture and sparsity."""
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    warm = int(steps * cfg.sparsity_warm_up_fraction)
    common: dict[str, Any] = dict(
        d_in=d_in, d_sae=cfg.d_sae, dtype=cfg.dtype, device=cfg.device,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input, normalize_activations=cfg.normalize_activations,
        metadata=SAEMetadata(**sae_metadata(site, model_name)),
    )  # fmt: skip
    arch = cfg.architecture
    if arch == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=cfg.l1, l1_warm_up_steps=warm, **common)  # type: ignore[arg-type]
    if arch == "topk":
        return TopKTrainingSAEConfig(k=int(cfg.k), **common)  # type: ignore[arg-type]
    if arch == "batchtopk":
        return BatchTopKTrainingSAEConfig(k=float(cfg.k), **common)  # type: ignore[arg-type]
    if arch == "matryoshka":
        return MatryoshkaBatchTopKTrainingSAEConfig(
            k=float(cfg.k),  # type: ignore[arg-type]
            matryoshka_widths=_matryoshka_widths(cfg),
            **common,
        )
    # jumprelu: a target L0 means Gemma Scope 2's quadratic loss around it.
    if cfg.k is not None:
        return JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic", target_l0=float(cfg.k),
            l0_coefficient=cfg.l1 if cfg.l1 is not None else 1.0, l0_warm_up_steps=warm, **common,
        )  # fmt: skip
    return JumpReLUTrainingSAEConfig(l0_coefficient=cfg.l1, l0_warm_up_steps=warm, **common)  # type: ignore[arg-type]


def _logger_config(cfg: TrainConfig, run_name: str):
    from sae_lens import LoggingConfig

    # SAELens evals every wandb_log_frequency x eval_every_n_wandb_logs steps: pick a log
    # frequency (at most 10) that divides the eval period, so evals land exactly on it.
    n = cfg.eval_every_n_steps
    log_every = next(d for d in range(min(10, n), 0, -1) if n % d == 0)
    return LoggingConfig(
        # SAELens runs its in-training evals only inside its wandb branch. With wandb off we
        # keep that branch on against a disabled wandb run (see _wandb_mode), so the evals
        # still run; nothing is sent or written.
        log_to_wandb=True,
        wandb_project=cfg.wandb_project,
        run_name=run_name,
        wandb_log_frequency=log_every,
        eval_every_n_wandb_logs=n // log_every,
        log_weights_to_wandb=cfg.wandb,
    )


def _runner_common(plan: TrainingPlan, run_name: str) -> dict[str, Any]:
    """The runner-config fields that single- and multi-hook runs share."""
    cfg = plan.config
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    return dict(
        model_name=plan.dims.name,
        model_class_name="HookedT5Gemma2",
        dataset_path=plan.dataset_label,
        streaming=cfg.streaming,
        context_size=cfg.context_size,
        n_batches_in_buffer=plan.n_batches_in_buffer,
        training_tokens=cfg.training_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        device=cfg.device,
        seed=cfg.seed,
        dtype=cfg.dtype,
        prepend_bos=True,
        exclude_special_tokens=cfg.exclude_special_tokens,
        n_eval_batches=cfg.n_eval_batches,
        eval_batch_size_prompts=cfg.eval_batch_size_prompts,
        logger=_logger_config(cfg, run_name),
        checkpoint_path=str(plan.out / "checkpoints"),
        lr=cfg.lr,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=int(steps * cfg.lr_decay_fraction),
        train_batch_size_tokens=cfg.train_batch_size_tokens,
    )


def build_runner_config(plan: TrainingPlan, site: Site, output_path: str | Path | None = None, **extra: Any):
    """SAELens' ``LanguageModelSAERunnerConfig`` for one site of a plan.

    ``extra`` goes to the config as is (e.g. ``use_cached_activations=True``).
    """
    from sae_lens import LanguageModelSAERunnerConfig

    cfg = plan.config
    out = Path(output_path) if output_path is not None else plan.out / site.friendly
    return LanguageModelSAERunnerConfig(
        sae=build_sae_config(cfg, plan.dims.d_in(site), site, plan.dims.name),
        hook_name=site.hook_name,
        is_dataset_tokenized=False,
        n_batches_for_norm_estimate=min(cfg.n_batches_for_norm_estimate, max(1, plan.total_steps)),
        output_path=str(out),
        verbose=False,
        **_runner_common(plan, f"{site.friendly}-{cfg.architecture}-{cfg.d_sae}"),
        **extra,
    )


def build_multi_runner_config(plan: TrainingPlan):
    """SAELens' ``MultiSAETrainingRunnerConfig``: one SAE per site, named by SAE id."""
    from sae_lens import MultiSAETrainingRunnerConfig

    cfg = plan.config
    saes = {s.friendly: build_sae_config(cfg, plan.dims.d_in(s), s, plan.dims.name) for s in plan.sites}
    # Norm estimation keeps every batch of every hook in memory at once: cap it.
    bytes_per_batch = cfg.train_batch_size_tokens * sum(plan.dims.d_in(s) for s in plan.sites) * 4
    n_norm = max(
        1, min(cfg.n_batches_for_norm_estimate, plan.total_steps, _NORM_ESTIMATE_BYTES // bytes_per_batch)
    )
    return MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names={s.friendly: s.hook_name for s in plan.sites},
        n_batches_for_norm_estimate=n_norm,
        output_path=str(plan.out),
        **_runner_common(plan, f"multi-{len(saes)}-{cfg.architecture}-{cfg.d_sae}"),
    )


# ----------------------------------------------------------------------------- evals


@dataclass
class EvalRecorder:
    """SAELens' in-training eval (``run_evals``) with KL as well as CE loss, recording each call.

    SAELens' own evaluators compute the CE-loss score but leave KL off; this one runs the
    same ``run_evals`` with both on, and keeps every result in ``history``.
    """

    model: HookedRootModule
    activations_store: Any
    n_eval_batches: int
    eval_batch_size_prompts: int | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self, sae: SAE[Any], scaler: Any = None) -> dict[str, Any]:
        """One eval of ``sae`` (nested dict of SAELens' metric groups)."""
        from sae_lens.evals import EvalConfig, run_evals
        from sae_lens.training.activation_scaler import ActivationScaler

        store = self.activations_store
        exclude: bool | list[int] = False
        if store.exclude_special_tokens is not None:
            exclude = store.exclude_special_tokens.tolist()
        eval_config = EvalConfig(
            batch_size_prompts=self.eval_batch_size_prompts,
            n_eval_reconstruction_batches=self.n_eval_batches,
            n_eval_sparsity_variance_batches=self.n_eval_batches,
            compute_kl=True,
            compute_ce_loss=True,
            compute_l2_norms=True,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
        )
        was_training = sae.training
        sae.eval()
        try:
            metrics, _ = run_evals(
                sae=sae,
                activation_store=store,
                model=self.model,
                activation_scaler=scaler if scaler is not None else ActivationScaler(),
                eval_config=eval_config,
                exclude_special_tokens=exclude,
                model_kwargs=getattr(store, "model_kwargs", {}) or {},
            )
        finally:
            sae.train(was_training)
        return metrics

    def __call__(self, sae: SAE[Any], data_provider: Any, activation_scaler: Any) -> dict[str, Any]:
        """SAELens' single-SAE ``Evaluator`` signature."""
        with _paused(data_provider):
            metrics = self.evaluate(sae, activation_scaler)
        self.history.append(copy.deepcopy(metrics))
        return metrics


class MultiEvalRecorder(EvalRecorder):
    """:class:`EvalRecorder` for ``MultiSAETrainingRunner``'s evaluator signature.

    Returns keys prefixed by SAE name, as SAELens' ``MultiSAEEvaluator`` does (for wandb);
    ``history`` entries are ``{sae name: metrics}``.
    """

    def __call__(  # type: ignore[override]
        self,
        saes: dict[str, SAE[Any]],
        data_provider: Any,
        activation_scalers: dict[str, Any],
        hook_names: Any = None,
    ) -> dict[str, Any]:
        with _paused(data_provider):
            per_sae = {name: self.evaluate(sae, activation_scalers[name]) for name, sae in saes.items()}
        self.history.append(copy.deepcopy(per_sae))
        return {f"{name}/{k}": v for name, metrics in per_sae.items() for k, v in metrics.items()}


def _paused(data_provider: Any) -> AbstractContextManager[None]:
    from sae_lens.training.prefetch import PrefetchingIterator

    # Evals pull tokens from the same store as a prefetch thread would: pause it.
    return data_provider.paused() if isinstance(data_provider, PrefetchingIterator) else nullcontext()


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"model_performance_preservation": {"ce_loss_score": x}}`` -> ``{"model_performance_preservation/ce_loss_score": x}``."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, key + "/"))
        else:
            flat[key] = v
    return flat


@contextlib.contextmanager
def _wandb_mode(enabled: bool) -> Iterator[None]:
    """With wandb off, make SAELens' ``wandb.init`` a disabled run (no network, no files)."""
    if enabled:
        yield
        return
    saved = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = saved


class _DropOverrideNotices(logging.Filter):
    """SAELens warns that ``override_model``/``override_dataset`` make a run irreproducible
    from its config alone; here overriding is the design (the config records both), so the
    notices are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not msg.startswith(
            ("You just passed in a", "override_dataset overrides", "override_model overrides")
        )


@contextlib.contextmanager
def _quiet_runner_setup() -> Iterator[None]:
    sae_lens_logger = logging.getLogger("sae_lens")
    notice_filter = _DropOverrideNotices()
    sae_lens_logger.addFilter(notice_filter)
    try:
        with warnings.catch_warnings():
            # Text is tokenised on the fly by design; and SAELens compares a dataset's rows
            # with the token budget, which says nothing when rows are sentences.
            warnings.filterwarnings("ignore", message=".*(not tokenized|fewer samples).*")
            yield
    finally:
        sae_lens_logger.removeFilter(notice_filter)


# ------------------------------------------------------------------------------ train


@dataclass
class TrainingResult:
    """What a run produced."""

    out: Path
    """The output folder."""
    paths: dict[str, Path]
    """SAE id -> its SAELens folder."""
    saes: dict[str, SAE[Any]]
    """SAE id -> the saved SAE, loaded back with ``SAE.load_from_disk``."""
    eval_metrics: dict[str, dict[str, Any]]
    """SAE id -> the final eval (CE-loss and KL scores, L0, explained variance...) of the saved SAE."""
    eval_history: list[dict[str, Any]]
    """Every in-training eval, in order, each ``{sae id: metrics}``."""
    initial_saes: dict[str, TrainingSAE[Any]] = field(default_factory=dict)
    """Copies of the SAEs as initialised (only with ``keep_initial=True``)."""
    release: str | None = None
    """The registered release name, if any."""
    release_yaml: Path | None = None


def _load_model(plan: TrainingPlan):
    from sae_lens_t5gemma.hooked import load_t5gemma2

    dtype = getattr(torch, plan.config.model_dtype)
    return load_t5gemma2(plan.config.model, device=plan.config.device, dtype=dtype)


def _check_model(model: Any, plan: TrainingPlan) -> None:
    cfg = getattr(model, "cfg", None)
    n, d = getattr(cfg, "n_layers", None), getattr(cfg, "d_model", None)
    want_n, want_d = max(plan.dims.n_layers.values()), plan.dims.d_model["decoder"]
    if (n, d) != (want_n, want_d) and None not in (n, d):
        raise ValueError(
            f"The model passed has {n} layers per stack and width {d}; the config of {plan.dims.name} "
            f"says {want_n} and {want_d}"
        )


def train(
    cfg: TrainConfig | TrainingPlan,
    model: HookedRootModule | None = None,
    dataset: Any = None,
    keep_initial: bool = False,
) -> TrainingResult:
    """Train one SAE per hook with SAELens' runners and save them.

    One hook: ``LanguageModelSAETrainingRunner``. Several hooks: ``MultiSAETrainingRunner``
    (one forward pass feeds them all) unless ``cfg.multi_hook`` is False, in which case one
    single-hook runner per site. Everything is checked before the model is loaded.

    Args:
        cfg: the run, or a plan from :func:`plan_training`.
        model: an already loaded ``HookedT5Gemma2`` (otherwise loaded from ``cfg.model``).
        dataset: a ``datasets`` dataset to use instead of ``cfg.dataset``.
        keep_initial: keep copies of the freshly initialised SAEs in the result.

    Returns:
        The saved SAEs (loaded back), their folders, the final evals and the in-training evals.
    """
    plan = cfg if isinstance(cfg, TrainingPlan) else plan_training(cfg)
    dataset = dataset if dataset is not None else load_training_dataset(plan)
    model = model if model is not None else _load_model(plan)
    _check_model(model, plan)
    torch.manual_seed(plan.config.seed)
    with _wandb_mode(plan.config.wandb):
        if len(plan.sites) > 1 and plan.config.multi_hook:
            result = _train_multi(plan, model, dataset, keep_initial)
        else:
            result = _train_single_sites(plan, model, dataset, keep_initial)
    return _finish(plan, result)


def _train_single_sites(
    plan: TrainingPlan, model: Any, dataset: Any, keep_initial: bool, **extra: Any
) -> TrainingResult:
    from sae_lens import LanguageModelSAETrainingRunner

    paths, evals, history, initial = {}, {}, [], {}
    for site in plan.sites:
        runner_cfg = build_runner_config(plan, site, **extra)
        with _quiet_runner_setup():
            runner = LanguageModelSAETrainingRunner(
                runner_cfg, override_dataset=dataset, override_model=model
            )
        recorder = EvalRecorder(
            model, runner.activations_store, plan.config.n_eval_batches, plan.config.eval_batch_size_prompts
        )
        runner.evaluator = recorder  # type: ignore[assignment]
        if keep_initial:
            initial[site.friendly] = copy.deepcopy(runner.sae).cpu()
        with _quiet_runner_setup():
            runner.run()
        paths[site.friendly] = Path(runner_cfg.output_path)  # type: ignore[arg-type]
        evals[site.friendly] = _final_eval(recorder, paths[site.friendly], plan)
        history.extend({site.friendly: h} for h in recorder.history)
    return TrainingResult(plan.out, paths, {}, evals, history, initial)


def _train_multi(plan: TrainingPlan, model: Any, dataset: Any, keep_initial: bool) -> TrainingResult:
    from sae_lens import MultiSAETrainingRunner

    runner_cfg = build_multi_runner_config(plan)
    with _quiet_runner_setup():
        runner = MultiSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model)
    recorder = MultiEvalRecorder(
        model, runner.activations_store, plan.config.n_eval_batches, plan.config.eval_batch_size_prompts
    )
    runner.evaluator = recorder  # type: ignore[assignment]
    initial = {k: copy.deepcopy(v).cpu() for k, v in runner.saes.items()} if keep_initial else {}
    with _quiet_runner_setup():
        runner.run()
    paths = {s.friendly: plan.out / s.friendly for s in plan.sites}
    evals = {k: _final_eval(recorder, p, plan) for k, p in paths.items()}
    return TrainingResult(plan.out, paths, {}, evals, list(recorder.history), initial)


def _final_eval(recorder: EvalRecorder, path: Path, plan: TrainingPlan) -> dict[str, Any]:
    """Eval the SAE as saved (normalisation folded in), and store it next to the weights."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(path, device=plan.config.device)
    metrics = recorder.evaluate(sae)
    (path / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics


def _finish(plan: TrainingPlan, result: TrainingResult) -> TrainingResult:
    from sae_lens import SAE

    result.saes = {k: SAE.load_from_disk(p, device=plan.config.device) for k, p in result.paths.items()}
    summary = {
        "config": plan.config.to_dict(),
        "model_name": plan.dims.name,
        "saes": {k: str(p) for k, p in result.paths.items()},
        "eval_metrics": result.eval_metrics,
        "note": "CE-loss/KL scores use labels = input tokens (already seen by the encoder): they measure "
        "how well the model reproduces its input with the SAE spliced in.",
    }
    (plan.out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if plan.config.release_name:
        result.release_yaml = write_release_yaml(plan.out, plan.config.release_name, list(result.paths))
        result.release = register_release(result.release_yaml)
    return result


# ------------------------------------------------------------------------ cached path


def _cache_runner_class():
    from sae_lens import CacheActivationsRunner
    from sae_lens.cache_activations_runner import _mk_activations_store

    class T5Gemma2CacheActivationsRunner(CacheActivationsRunner):
        """SAELens' ``CacheActivationsRunner`` with a model passed in.

        SAELens' runner has no ``override_model`` and loads its model with ``load_model``,
        which knows only TransformerLens and causal-LM classes. This subclass takes the
        hooked model and otherwise builds exactly what SAELens' ``__init__`` builds; ``run``
        (sharding, consolidation, shuffling) is SAELens' own.
        """

        def __init__(self, cfg: Any, model: Any, override_dataset: Any = None):
            from datasets import Array2D, Features, Sequence, Value

            self.cfg = cfg
            self.model = model
            self.activations_store = _mk_activations_store(model, cfg, override_dataset=override_dataset)
            self.context_size = self._get_sliced_context_size(cfg.context_size, cfg.seqpos_slice)
            self.features = Features(
                {
                    cfg.hook_name: Array2D(shape=(self.context_size, cfg.d_in), dtype=cfg.dtype),
                    "token_ids": Sequence(Value(dtype="int32"), length=self.context_size),
                }
            )

    return T5Gemma2CacheActivationsRunner


def build_cache_config(plan: TrainingPlan, site: Site, cache_dir: str | Path, shard_tokens: int = 2**20):
    """SAELens' ``CacheActivationsRunnerConfig`` for one site (``training_tokens`` of activations)."""
    from sae_lens import CacheActivationsRunnerConfig

    cfg = plan.config
    d_in = plan.dims.d_in(site)
    batch_tokens = cfg.store_batch_size_prompts * cfg.context_size
    bytes_per_token = d_in * torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    # SAELens sizes its shards in GB; pick a whole number of model batches per shard.
    per_shard = max(1, min(cfg.training_tokens, shard_tokens) // batch_tokens) * batch_tokens
    return CacheActivationsRunnerConfig(
        dataset_path=plan.dataset_label,
        model_name=plan.dims.name,
        model_class_name="HookedT5Gemma2",
        model_batch_size=cfg.store_batch_size_prompts,
        hook_name=site.hook_name,
        d_in=d_in,
        training_tokens=cfg.training_tokens,
        context_size=cfg.context_size,
        new_cached_activations_path=str(cache_dir),
        seed=cfg.seed,
        dtype=cfg.dtype,
        device=cfg.device,
        buffer_size_gb=(per_shard * bytes_per_token + bytes_per_token // 2) / 1e9,
        prepend_bos=True,
        streaming=cfg.streaming,
    )


def _check_cache_dir(plan: TrainingPlan, cache_dir: Path) -> None:
    taken = [
        s.friendly
        for s in plan.sites
        if (cache_dir / s.friendly).is_dir() and any((cache_dir / s.friendly).iterdir())
    ]
    if taken:
        raise FileExistsError(
            f"Activation cache {str(cache_dir)!r} already holds {taken}; choose another folder"
        )


def cache_activations(
    cfg: TrainConfig | TrainingPlan,
    cache_dir: str | Path,
    model: HookedRootModule | None = None,
    dataset: Any = None,
) -> dict[str, Path]:
    """Cache activations of every hook of ``cfg`` to disk with SAELens' ``CacheActivationsRunner``.

    Each hook gets ``<cache_dir>/<sae id>``, a Hugging Face dataset (``datasets.load_from_disk``)
    with one column of ``[context_size, d_in]`` activations named by the hook and one of
    token ids; ``cfg.training_tokens`` tokens each. Returns SAE id -> folder.
    """
    plan = cfg if isinstance(cfg, TrainingPlan) else plan_training(cfg)
    cache_dir = Path(cache_dir)
    _check_cache_dir(plan, cache_dir)
    dataset = dataset if dataset is not None else load_training_dataset(plan)
    model = model if model is not None else _load_model(plan)
    _check_model(model, plan)
    runner_cls = _cache_runner_class()
    out: dict[str, Path] = {}
    for site in plan.sites:
        cache_cfg = build_cache_config(plan, site, cache_dir / site.friendly)
        with _quiet_runner_setup():
            runner_cls(cache_cfg, model, override_dataset=dataset).run()
        out[site.friendly] = cache_dir / site.friendly
    return out


def train_from_cache(
    cfg: TrainConfig | TrainingPlan,
    cache_dir: str | Path,
    model: HookedRootModule | None = None,
    dataset: Any = None,
    keep_initial: bool = False,
) -> TrainingResult:
    """Train from activations cached by :func:`cache_activations` (``use_cached_activations=True``).

    Training reads the cache, not the model; the model and the dataset still serve the
    in-training and final evals (CE-loss and KL scores need forward passes).
    """
    plan = cfg if isinstance(cfg, TrainingPlan) else plan_training(cfg)
    cache_dir = Path(cache_dir)
    missing = [s.friendly for s in plan.sites if not (cache_dir / s.friendly / "dataset_info.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"Activation cache {str(cache_dir)!r} has no cached activations for {missing}"
        )
    dataset = dataset if dataset is not None else load_training_dataset(plan)
    model = model if model is not None else _load_model(plan)
    _check_model(model, plan)
    torch.manual_seed(plan.config.seed)
    results = []
    with _wandb_mode(plan.config.wandb):
        for site in plan.sites:
            sub = replace(plan, sites=(site,))
            results.append(
                _train_single_sites(
                    sub,
                    model,
                    dataset,
                    keep_initial,
                    use_cached_activations=True,
                    cached_activations_path=str(cache_dir / site.friendly),
                )  # fmt: skip
            )
    merged = TrainingResult(plan.out, {}, {}, {}, [], {})
    for r in results:
        merged.paths.update(r.paths)
        merged.eval_metrics.update(r.eval_metrics)
        merged.eval_history.extend(r.eval_history)
        merged.initial_saes.update(r.initial_saes)
    return _finish(plan, merged)


# -------------------------------------------------------------------- one-call run


def describe_plan(plan: TrainingPlan, cached: bool = False) -> str:
    """A few lines saying what a run will do (printed before the model loads)."""
    cfg = plan.config
    parts = [f"k={cfg.k:g}"] if cfg.k is not None else []
    if cfg.l1 is not None:
        parts.append(f"{'l1' if cfg.architecture == 'standard' else 'l0_coefficient'}={cfg.l1:g}")
    sparsity = " ".join(parts)
    if cached:
        runner = "CacheActivationsRunner, then LanguageModelSAETrainingRunner on the cache (per hook)"
    elif len(plan.sites) > 1 and cfg.multi_hook:
        runner = "MultiSAETrainingRunner (one forward pass feeds all hooks)"
    else:
        runner = "LanguageModelSAETrainingRunner" + (" (one run per hook)" if len(plan.sites) > 1 else "")
    lines = [
        f"model    {plan.dims.name} ({plan.dims.n_layers['encoder']}+{plan.dims.n_layers['decoder']} layers)",
        f"dataset  {plan.dataset_label}",
        f"SAEs     {len(plan.sites)} x {cfg.architecture} d_sae={cfg.d_sae} {sparsity}, "
        f"{cfg.training_tokens:,} tokens each, lr {cfg.lr:g}, preset {cfg.preset or '-'}",
        f"runner   {runner}",
    ]
    lines += [f"  {s.friendly:24s} {s.hook_name:40s} d_in={plan.dims.d_in(s)}" for s in plan.sites]
    lines.append(f"out      {plan.out}" + (f" (release {cfg.release_name})" if cfg.release_name else ""))
    return "\n".join(lines)


def format_report(result: TrainingResult) -> str:
    """A table of the final evals of a run, and how to load the SAEs."""
    head = f"{'sae id':24s} {'L0':>8s} {'expl.var':>9s} {'CE score':>9s} {'KL score':>9s}  folder"
    rows = [head]
    for sae_id, path in result.paths.items():
        m = flatten_metrics(result.eval_metrics.get(sae_id, {}))

        def num(key: str, fmt: str, m: dict[str, float] = m) -> str:
            v = m.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        rows.append(
            f"{sae_id:24s} {num('sparsity/l0', '8.1f')} {num('reconstruction_quality/explained_variance', '9.3f')} "
            f"{num('model_performance_preservation/ce_loss_score', '9.3f')} "
            f"{num('model_behavior_preservation/kl_div_score', '9.3f')}  {path}"
        )
    rows.append(
        "CE/KL scores: labels are the input tokens, which the encoder has read; they measure input reproduction."
    )
    first = next(iter(result.paths), None)
    if result.release and first:
        rows.append(f"release {result.release!r} registered; in a new process register it again first:")
        rows.append(f"  sae_lens_t5gemma.training.register_release({str(result.release_yaml)!r})")
        rows.append(f"  SAE.from_pretrained(release={result.release!r}, sae_id={first!r})")
    elif first:
        rows.append(f"load: SAE.load_from_disk({str(result.paths[first])!r})")
    return "\n".join(rows)


def run_training(cfg: TrainConfig, cache_dir: str | Path | None = None, echo: Any = print) -> TrainingResult:
    """Check, train (optionally via an activation cache) and report: what ``sae-lens-t5gemma train`` does.

    Args:
        cfg: the run.
        cache_dir: if given, first cache every hook's activations there with
            ``CacheActivationsRunner``, then train from the cache.
        echo: where progress lines go.
    """
    plan = plan_training(cfg)  # every input error surfaces here, before any model loads
    if cache_dir is not None:
        _check_cache_dir(plan, Path(cache_dir))
    dataset = load_training_dataset(plan)
    echo(describe_plan(plan, cached=cache_dir is not None))
    model = _load_model(plan)
    if cache_dir is not None:
        paths = cache_activations(plan, cache_dir, model=model, dataset=dataset)
        echo(f"cached activations: {', '.join(str(p) for p in paths.values())}")
        result = train_from_cache(plan, cache_dir, model=model, dataset=load_training_dataset(plan))
    else:
        result = train(plan, model=model, dataset=dataset)
    echo(format_report(result))
    return result


# ------------------------------------------------------------------- measurements


@torch.no_grad()
def collect_activations(
    model: HookedRootModule, texts: Sequence[str], hook_names: Sequence[str], context_size: int = 128
) -> dict[str, torch.Tensor]:
    """Activations at ``hook_names`` for ``texts`` (one sequence each), flattened to ``[tokens, d]``.

    Padding positions are dropped, so each row is a real token's activation.
    """
    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    batch = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=context_size
    )
    tokens = batch["input_ids"].to(model.cfg.device)  # type: ignore[attr-defined]
    mask = batch["attention_mask"].bool().reshape(-1)
    _, cache = model.run_with_cache(tokens, names_filter=list(hook_names), prepend_bos=False)
    return {
        h: cache[h].reshape(-1, cache[h].shape[-1])[mask.to(cache[h].device)].float().cpu()
        for h in hook_names
    }


@torch.no_grad()
def reconstruction_mse(sae: SAE[Any], activations: torch.Tensor) -> float:
    """Mean squared reconstruction error per element of ``sae`` on ``[tokens, d_in]`` activations."""
    sae_device = next(sae.parameters()).device
    x = activations.to(sae_device, dtype=next(sae.parameters()).dtype)
    was_training = sae.training
    sae.eval()
    try:
        recon = sae.decode(sae.encode(x))
    finally:
        sae.train(was_training)
    return float((recon.float() - x.float()).pow(2).mean())


# --------------------------------------------------------------------------- release


def write_release_yaml(folder: str | Path, release_name: str, sae_ids: Sequence[str] | None = None) -> Path:
    """Write ``<folder>/release.yaml`` in SAELens' ``pretrained_saes.yaml`` schema.

    Every subfolder holding a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``) is one
    SAE, and its folder name is its SAE id (or pass ``sae_ids``). Entries carry the trained
    L0 and the final eval's explained variance where known. The release loads through this
    package's local-folder loader; :func:`register_release` registers it.
    """
    from sae_lens_t5gemma import registration

    folder = Path(folder).resolve()
    _check_release_name(release_name)
    if sae_ids is None:
        sae_ids = sorted(
            p.name
            for p in folder.iterdir()
            if (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file()
        )
    if not sae_ids:
        raise ValueError(
            f"Folder {str(folder)!r} holds no SAELens SAE folders (cfg.json + sae_weights.safetensors)"
        )
    entries, model = [], None
    for sae_id in sae_ids:
        cfg_path = folder / sae_id / "cfg.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"SAE folder {str(folder / sae_id)!r} has no cfg.json")
        meta = json.loads(cfg_path.read_text()).get("metadata", {})
        model = model or meta.get("model_name")
        entry: dict[str, Any] = {"id": sae_id, "path": sae_id}
        if meta.get("l0") is not None:
            entry["l0"] = round(float(meta["l0"]), 4)
        evals_path = folder / sae_id / "eval_metrics.json"
        if evals_path.is_file():
            ev = json.loads(evals_path.read_text()).get("reconstruction_quality", {})
            if "explained_variance" in ev:
                entry["variance_explained"] = round(float(ev["explained_variance"]), 4)
        entries.append(entry)
    text = registration.release_yaml(
        release_name,
        repo_id=str(folder),
        model=model or "unknown",
        saes=entries,
        conversion_func=registration.LOCAL_LOADER,
        header="SAEs trained on T5Gemma 2 with sae_lens_t5gemma (SAELens pretrained_saes.yaml schema).\n"
        "Load by name after sae_lens_t5gemma.training.register_release(<this file>).",
    )
    path = folder / "release.yaml"
    path.write_text(text)
    return path


def register_release(path: str | Path) -> str:
    """Register a release YAML written by :func:`write_release_yaml`; returns the release name.

    The SAE folders are looked up next to the YAML (so the folder may have moved since).
    Re-registering one of this package's releases replaces it; SAELens' own names are refused.
    """
    from sae_lens_t5gemma import registration

    path = Path(path)
    names = registration.register_release_yaml(path, local_root=path.parent, replace=True)
    return names[-1]
