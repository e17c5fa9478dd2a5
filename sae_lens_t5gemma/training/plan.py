"""What to train: the training config, its presets, and every check made before a model loads.

``TrainConfig`` says what a run trains (model, hooks by friendly name with wildcards,
dataset, architecture, width, sparsity, token budget). ``plan_training`` turns it into a
``TrainingPlan`` reading only the model's ``config.json``: hooks expanded through
``sites.py``, widths per site, dataset files found, and every number checked, so bad input
fails before any weights load. ``runner.py`` runs the plan with SAELens' runners.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import dtype_name, resolve_dtype
from sae_lens_t5gemma.model.sites import Site
from sae_lens_t5gemma.training.config import INPUT_CONVENTION_KEY, TrainConfig, _check_numbers
from sae_lens_t5gemma.training.data import _check_documents, resolve_dataset_files
from sae_lens_t5gemma.training.memory import (
    StoreSizing,
    _gib,
    memory_budget,
    sae_state_bytes,
    sae_step_bytes,
    store_bytes,
)

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


def per_stack(plan: TrainingPlan) -> list[TrainingPlan]:
    """The plan split by stack, in order: one runner per stack (a runner has one ``seqpos_slice``)."""
    stacks = dict.fromkeys(s.stack for s in plan.sites)
    return [replace(plan, sites=tuple(s for s in plan.sites if s.stack == st)) for st in stacks]
