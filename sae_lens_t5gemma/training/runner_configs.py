"""SAELens configs from a plan: the ``TrainingSAEConfig`` of each SAE, the runner configs
(single- and multi-hook) and the activation-cache config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_t5gemma.model.sites import Site
from sae_lens_t5gemma.training.checkpoints import CHECKPOINTS, _multi_key, checkpoint_folder
from sae_lens_t5gemma.training.config import TrainConfig, _matryoshka_widths
from sae_lens_t5gemma.training.plan import TrainingPlan

if TYPE_CHECKING:
    from sae_lens import TrainingSAEConfig


def sae_metadata(site: Site, model_name: str, convention: dict[str, Any] | None = None) -> dict[str, Any]:
    """The T5Gemma 2 metadata every trained SAE carries (beyond SAELens' own fields).

    ``convention`` is :meth:`TrainingPlan.convention_metadata`: the convention, the split and
    the positions the SAE trained on.
    """
    return {
        "model_name": model_name,
        "model_class_name": "HookedT5Gemma2",
        "hook_name": site.hook_name,
        "hf_hook_name": f"{site.hf_module}.{site.kind.hf_io}",
        "t5gemma2_site": site.friendly,
        **(convention or {}),
    }


def build_sae_config(
    cfg: TrainConfig, d_in: int, site: Site, model_name: str, convention: dict[str, Any] | None = None
) -> TrainingSAEConfig:
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
        metadata=SAEMetadata(**sae_metadata(site, model_name, convention)),
    )  # fmt: skip
    arch = cfg.architecture
    if arch == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=cfg.l1, l1_warm_up_steps=warm, **common)  # type: ignore[arg-type]
    if arch == "topk":
        if cfg.sparse_decode:
            # SAELens' sparse backward cannot run its default decoder-norm rescaling (aten::view
            # on a sparse tensor, torch 2.13), so sparse decode trains without it.
            return TopKTrainingSAEConfig(
                k=int(cfg.k),  # type: ignore[arg-type]
                use_sparse_activations=True,
                rescale_acts_by_decoder_norm=False,
                **common,
            )
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


def _runner_common(plan: TrainingPlan, run_name: str, sites: Sequence[Site]) -> dict[str, Any]:
    """The runner-config fields that single- and multi-hook runs (of one stack) share."""
    cfg = plan.config
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    sizing = plan.store_sizing(sites)
    return dict(
        model_name=plan.dims.name,
        model_class_name="HookedT5Gemma2",
        dataset_path=plan.dataset_label,
        streaming=cfg.streaming,
        context_size=cfg.context_size,
        n_batches_in_buffer=sizing.n_batches_in_buffer,
        training_tokens=cfg.training_tokens,
        store_batch_size_prompts=sizing.store_batch_size_prompts,
        autocast=cfg.autocast,
        autocast_lm=cfg.autocast_lm,
        device=cfg.device,
        seed=cfg.seed,
        dtype=cfg.dtype,
        prepend_bos=True,
        exclude_special_tokens=cfg.exclude_special_tokens,
        n_eval_batches=cfg.n_eval_batches,
        eval_batch_size_prompts=cfg.eval_batch_size_prompts,
        logger=_logger_config(cfg, run_name),
        checkpoint_path=str(plan.out / CHECKPOINTS),  # SAELens appends a random id: _pin_checkpoints
        n_checkpoints=cfg.n_checkpoints,
        lr=cfg.lr,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=int(steps * cfg.lr_decay_fraction),
        train_batch_size_tokens=cfg.train_batch_size_tokens,
        seqpos_slice=plan.seqpos_slice(sites[0].stack),
        disable_concat_sequences=cfg.disable_concat_sequences,
        activations_mixing_fraction=cfg.activations_mixing_fraction,
    )


def build_runner_config(plan: TrainingPlan, site: Site, output_path: str | Path | None = None, **extra: Any):
    """SAELens' ``LanguageModelSAERunnerConfig`` for one site of a plan.

    ``extra`` goes to the config as is (e.g. ``use_cached_activations=True``).
    """
    from sae_lens import LanguageModelSAERunnerConfig

    cfg = plan.config
    out = Path(output_path) if output_path is not None else plan.out / site.friendly
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=build_sae_config(
            cfg, plan.dims.d_in(site), site, plan.dims.name, plan.convention_metadata(site.stack)
        ),
        hook_name=site.hook_name,
        is_dataset_tokenized=False,
        n_batches_for_norm_estimate=min(cfg.n_batches_for_norm_estimate, max(1, plan.total_steps)),
        output_path=str(out),
        verbose=False,
        **_runner_common(plan, f"{site.friendly}-{cfg.architecture}-{cfg.d_sae}", (site,)),
        **extra,
    )
    return _pin_checkpoints(runner_cfg, plan, site.friendly)


def build_multi_runner_config(plan: TrainingPlan):
    """SAELens' ``MultiSAETrainingRunnerConfig``: one SAE per site, named by SAE id (one stack only)."""
    from sae_lens import MultiSAETrainingRunnerConfig

    cfg = plan.config
    stacks = {s.stack for s in plan.sites}
    if len(stacks) != 1:
        raise ValueError(
            f"A multi-hook runner serves one stack (one seqpos_slice); got sites on {sorted(stacks)}"
        )
    stack = stacks.pop()
    saes = {
        s.friendly: build_sae_config(
            cfg, plan.dims.d_in(s), s, plan.dims.name, plan.convention_metadata(stack)
        )
        for s in plan.sites
    }
    # Norm estimation keeps every batch of every hook in memory at once: the sizing caps it
    # by what max_memory leaves after the store (a mean norm over one 4096-token batch is
    # already within a fraction of a percent).
    runner_cfg = MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names={s.friendly: s.hook_name for s in plan.sites},
        n_batches_for_norm_estimate=plan.store_sizing().n_batches_for_norm_estimate,
        output_path=str(plan.out),
        **_runner_common(plan, f"multi-{len(saes)}-{cfg.architecture}-{cfg.d_sae}", plan.sites),
    )
    return _pin_checkpoints(runner_cfg, plan, _multi_key(stack))


def _pin_checkpoints(runner_cfg: Any, plan: TrainingPlan, key: str) -> Any:
    """Checkpoints of one runner go to ``out/checkpoints/<key>`` (an SAE id, or ``multi-<stack>``).

    SAELens' ``__post_init__`` appends a random id to ``checkpoint_path``, so a later run could
    not tell which folder is its own; the trainer reads the path only when ``run`` starts.
    """
    runner_cfg.checkpoint_path = str(checkpoint_folder(plan.out, key))
    return runner_cfg


# ----------------------------------------------------------------------------- evals


def build_cache_config(plan: TrainingPlan, site: Site, cache_dir: str | Path, shard_tokens: int = 2**20):
    """SAELens' ``CacheActivationsRunnerConfig`` for one site (``training_tokens`` of activations)."""
    from sae_lens import CacheActivationsRunnerConfig

    cfg = plan.config
    d_in = plan.dims.d_in(site)
    prompts = plan.store_sizing((site,)).store_batch_size_prompts
    batch_tokens = prompts * cfg.context_size
    bytes_per_token = d_in * torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    # SAELens sizes its shards in GB; pick a whole number of model batches per shard.
    per_shard = max(1, min(cfg.training_tokens, shard_tokens) // batch_tokens) * batch_tokens
    return CacheActivationsRunnerConfig(
        dataset_path=plan.dataset_label,
        model_name=plan.dims.name,
        model_class_name="HookedT5Gemma2",
        model_batch_size=prompts,
        hook_name=site.hook_name,
        d_in=d_in,
        training_tokens=cfg.training_tokens,
        context_size=cfg.context_size,
        new_cached_activations_path=str(cache_dir),
        seed=cfg.seed,
        shuffle=True,  # rows (one per document row) in a random order, saved: sae_lens_seams._save_shuffled
        dtype=cfg.dtype,
        device=cfg.device,
        buffer_size_gb=(per_shard * bytes_per_token + bytes_per_token // 2) / 1e9,
        prepend_bos=True,
        streaming=cfg.streaming,
        seqpos_slice=plan.seqpos_slice(site.stack),
    )
