"""SAEs on image tokens: harvest encoder activations at image positions, then train.

T5Gemma 2's encoder reads each image as ``mm_tokens_per_image`` soft tokens (256 on the real
models) at the image placeholder positions of its input (:meth:`HookedT5Gemma2.image_token_mask`).

Why a harvest-then-train path rather than SAELens' runners: SAELens' ``ActivationsStore``
calls ``model.run_with_cache(batch_tokens, ..., **model_kwargs)`` with one fixed
``model_kwargs`` dict for every batch (``sae_lens/training/activations_store.py``,
``get_activations``), and its batches are token rows from a text dataset. Images differ per
row, so ``pixel_values`` cannot ride along. This module therefore:

1. :func:`harvest` runs the hooked model on processor batches (``input_ids``,
   ``attention_mask``, ``pixel_values``) and keeps the activations at the chosen positions
   (``"image"``, ``"text"`` or ``"both"``) as a ``[rows, d]`` tensor; vision-tower sites keep
   every patch of every image;
2. :func:`train_sae` trains a SAELens training SAE (``BatchTopKTrainingSAE`` by default, or
   ``StandardTrainingSAE`` / ``TopKTrainingSAE``) on those rows through SAELens' own
   ``SAETrainer``, so the loss, the normalisation and the dead-feature bookkeeping are
   SAELens'.

Under ``prefix_lm`` the harvest lets the encoder read the whole row (``prefix_len = n``), as
it reads a prompt in generation; that is recorded in the SAE's metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import to_sae

if TYPE_CHECKING:
    from sae_lens.saes.sae import TrainingSAE

    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2

Positions = Literal["image", "text", "both"]
POSITIONS: dict[str, str] = {
    "image": "image placeholder positions (the image's soft tokens as the encoder transforms them)",
    "text": "real (unpadded) positions that are not image placeholders",
    "both": "every real (unpadded) position",
}
HARVEST_CONVENTION = "encoder reads the whole row (image + text), as in generation"
IMAGE_TOKEN_LABEL = sites_mod.IMAGE_TOKEN_LABEL


def position_mask(
    model: HookedT5Gemma2,
    tokens: torch.Tensor,
    positions: Positions = "image",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[batch, n]`` bool: the encoder positions of ``tokens`` to read, by kind.

    Args:
        model: the hooked model (its image-token id and convention decide).
        tokens: ``[batch, n]`` ids with the processor's image placeholders.
        positions: ``"image"``, ``"text"`` or ``"both"`` (see :data:`POSITIONS`).
        attention_mask: ``[batch, n]``, 0 at padding (dropped from ``"text"`` and ``"both"``).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {sorted(POSITIONS)}, not {positions!r}")
    tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
    image = model.image_token_mask(tokens)
    keep = model.covered_mask(tokens, "encoder", attention_mask)
    if attention_mask is not None:
        keep = keep & attention_mask.to(tokens.device).bool()
    if positions == "image":
        return keep & image
    return keep & ~image if positions == "text" else keep


def check_image_batch(model: HookedT5Gemma2, tokens: torch.Tensor, pixel_values: Any) -> None:
    """Refuse pixel values and placeholder rows the model would read wrongly, one line each.

    Args:
        model: the hooked model (its ``mm_tokens_per_image`` and image-token id decide).
        tokens: ``[batch, n]`` ids with the processor's image placeholders.
        pixel_values: the processor's ``[n_images, channels, height, width]`` pixels, or None.

    Raises:
        ValueError: ``pixel_values`` that are not a floating-point tensor (bool, integer or
            complex), that hold NaN or Inf, or a row whose image placeholders are not a whole
            number of images (an image would be split across rows).
    """
    if pixel_values is None:
        return
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, not {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values are {str(pixel_values.dtype).removeprefix('torch.')}: expected floating-point "
            "pixels as the processor makes them (float32, bfloat16 or float16), not bool, integer or complex values"
        )
    finite = torch.isfinite(pixel_values)
    if not bool(finite.all()):
        n_nan, n_inf = int(torch.isnan(pixel_values).sum()), int(torch.isinf(pixel_values).sum())
        bad = (
            (~finite).reshape(finite.shape[0], -1).any(1).nonzero().flatten().tolist() if finite.ndim else []
        )
        raise ValueError(
            f"pixel_values hold {n_nan} NaN and {n_inf} Inf values (images {bad[:5]}): the vision tower "
            "would turn them into NaN activations"
        )
    if model.image_token_id is None:
        return
    per_image = int(model.hf_model.config.encoder.mm_tokens_per_image)
    tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
    counts = model.image_token_mask(tokens).sum(1)
    uneven = (counts % per_image != 0).nonzero().flatten().tolist()
    if uneven:
        r = uneven[0]
        raise ValueError(
            f"Row {r} holds {int(counts[r])} image placeholder tokens, not a multiple of {per_image} (one "
            "image's soft tokens): an image would be split across rows. Build the rows with the model's processor."
        )


def image_text_batches(
    processor: Any, prompts: Sequence[str], images: Sequence[Any], batch_size: int = 8
) -> Iterator[Mapping[str, torch.Tensor]]:
    """Processor batches (``input_ids``, ``attention_mask``, ``pixel_values``), one image per prompt.

    A prompt without the processor's begin-of-image token gets one in front, so the image
    comes first (inside the encoder's prefix).
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt")
    boi = processor.boi_token
    for start in range(0, len(prompts), batch_size):
        texts = [p if boi in p else f"{boi}{p}" for p in prompts[start : start + batch_size]]
        imgs = [[img] for img in images[start : start + batch_size]]
        yield processor(text=texts, images=imgs, return_tensors="pt", padding=True)


@dataclass
class Harvest:
    """Activations of one site at the chosen positions, flattened to ``[rows, d]``."""

    activations: torch.Tensor
    hook_name: str
    positions: str
    """``"image"``, ``"text"``, ``"both"``, or ``"patches"`` for a vision-tower site."""
    n_images: int
    n_image_positions: int
    """Image placeholder positions seen (all of them, whatever ``positions`` kept)."""
    synthetic: bool
    convention: str = HARVEST_CONVENTION

    @property
    def n_rows(self) -> int:
        return int(self.activations.shape[0])

    def metadata(self) -> dict[str, Any]:
        """What an SAE trained on these rows records about them."""
        return {
            "hook_name": self.hook_name,
            "t5gemma2_positions": self.positions,
            "t5gemma2_convention": self.convention,
            "t5gemma2_synthetic_data": self.synthetic,
        }


@torch.no_grad()
def harvest(
    model: HookedT5Gemma2,
    batches: Iterable[Mapping[str, torch.Tensor]],
    hook_name: str,
    positions: Positions = "image",
    synthetic: bool = False,
) -> Harvest:
    """Run ``model`` on image+text batches and keep ``hook_name``'s activations at ``positions``.

    Args:
        model: a hooked T5Gemma 2 with a vision tower.
        batches: processor outputs with ``input_ids``, ``pixel_values`` and optionally
            ``attention_mask`` (e.g. :func:`image_text_batches`).
        hook_name: an encoder site (rows: the chosen positions) or a vision-tower site (rows:
            every patch, or every soft token for ``hook_mm_proj_out``, of every image).
        positions: for encoder sites, ``"image"``, ``"text"`` or ``"both"``.
        synthetic: whether the images and texts are synthetic (recorded, and shown in reports).

    Raises:
        ValueError: a decoder site (the decoder never reads images), ``"text"``/``"both"`` for
            a vision site, a batch without ``pixel_values``, or one :func:`check_image_batch` refuses.
    """
    name = model.canonical_name(hook_name)
    vision = name in model._vision_sites
    if not vision and sites_mod.resolve(name).stack != "encoder":
        raise ValueError(
            f"{hook_name!r} is a decoder site: the decoder never reads images. Harvest image "
            "tokens at an encoder site (encoder_blocks.N...) or a vision site (vision_blocks.N..., hook_mm_proj_out)."
        )
    if vision and positions != "image":
        raise ValueError(
            f"{hook_name!r} is a vision-tower site: its rows are image patches only, so positions must "
            f"be 'image', not {positions!r}"
        )
    rows, n_images, n_image_positions = [], 0, 0
    for i, batch in enumerate(batches):
        if batch.get("pixel_values") is None:
            raise ValueError(f"Batch {i} has no pixel_values: harvest reads image+text batches")
        tokens = batch["input_ids"].to(model.cfg.device)
        mask = batch.get("attention_mask")
        pixel_values = batch["pixel_values"]
        try:
            check_image_batch(model, tokens, pixel_values)
        except ValueError as e:
            raise ValueError(f"Batch {i}: {e}") from None
        with model.fed(prefix_len=tokens.shape[1]):
            _, cache = model.run_with_cache(
                tokens, pixel_values=pixel_values, attention_mask=mask, names_filter=[name], return_type=None
            )
            keep = None if vision else position_mask(model, tokens, positions, mask)
        act = cache[name]
        rows.append(act.reshape(-1, act.shape[-1]) if keep is None else act.reshape(*tokens.shape, -1)[keep])
        n_images += int(pixel_values.shape[0])
        n_image_positions += int(model.image_token_mask(tokens).sum())
    if not rows:
        raise ValueError("harvest got no batches")
    return Harvest(
        activations=torch.cat(rows).float().cpu(),
        hook_name=name,
        positions="patches" if vision else positions,
        n_images=n_images,
        n_image_positions=n_image_positions,
        synthetic=synthetic,
    )


@dataclass
class ImageSAEResult:
    """A SAELens training SAE trained on harvested rows, with its before/after scores."""

    sae: TrainingSAE[Any]
    harvest: Harvest
    architecture: str
    d_sae: int
    fvu_before: float
    """Fraction of variance unexplained by the untrained SAE on the harvested rows."""
    fvu_after: float
    l0_after: float
    history: list[float] = field(default_factory=list)

    def summary(self) -> str:
        """One line naming the site, width, positions, convention and whether the data are synthetic."""
        h = self.harvest
        data = "synthetic data" if h.synthetic else "real data"
        return (
            f"{h.hook_name} ({h.positions} positions, {h.n_rows} rows from {h.n_images} images; "
            f"{h.convention}; {data}): {self.architecture} d_sae={self.d_sae}, "
            f"FVU {self.fvu_before:.3f} -> {self.fvu_after:.3f}, L0 {self.l0_after:.1f}"
        )


def _rows_forever(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled batches of rows, epoch after epoch (SAELens' trainer pulls as many as it needs)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=g)
        for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
            yield rows[order[start : start + batch_size]]


@torch.no_grad()
def _scores(sae: TrainingSAE[Any], rows: torch.Tensor) -> tuple[float, float]:
    """(fraction of variance unexplained, mean L0) of ``sae`` on ``rows``, through its own forward."""
    from sae_lens.saes.sae import TrainStepInput

    # Coefficients at their full value (past any warm-up), as the trainer ends with them.
    coefficients = {k: float(getattr(v, "value", v)) for k, v in sae.get_coefficients().items()}
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=rows,
            coefficients=coefficients,
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )  # fmt: skip
    )
    recon = out.sae_out.float()
    var = (rows - rows.mean(0)).pow(2).sum()
    fvu = float((recon - rows).pow(2).sum() / var)
    return fvu, float((out.feature_acts > 0).float().sum(-1).mean())


def train_sae(
    harvested: Harvest,
    d_sae: int = 256,
    architecture: Literal["batchtopk", "topk", "standard"] = "batchtopk",
    k: int = 8,
    l1: float = 1.0,
    training_samples: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    model_name: str = "t5gemma-2",
    seed: int = 0,
    device: str = "cpu",
) -> ImageSAEResult:
    """Train a SAELens SAE on harvested rows with SAELens' ``SAETrainer``.

    Args:
        harvested: rows from :func:`harvest`.
        d_sae: dictionary width.
        architecture: ``"batchtopk"`` (default), ``"topk"`` (both with ``k``) or ``"standard"``
            (L1 penalty ``l1``).
        training_samples: rows to train on in all (default: 50 passes over the harvest).
        batch_size: rows per step; at most the number of rows.
        lr: Adam learning rate.
        model_name: recorded in the SAE's metadata.
        seed: initialisation and shuffling.

    Returns:
        The trained SAE with the fraction of variance it leaves unexplained before and after.
    """
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    rows = harvested.activations
    if harvested.n_rows < batch_size:
        raise ValueError(
            f"The harvest of {harvested.hook_name} holds {harvested.n_rows} rows, fewer than one batch "
            f"of {batch_size}: harvest more images or lower batch_size"
        )
    metadata = SAEMetadata(model_name=model_name, model_class_name="HookedT5Gemma2", **harvested.metadata())
    common: dict[str, Any] = dict(
        d_in=rows.shape[1], d_sae=d_sae, device=device, metadata=metadata,
        normalize_activations="expected_average_only_in",
    )  # fmt: skip
    torch.manual_seed(seed)
    if architecture == "batchtopk":
        sae: Any = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=float(k), **common))
    elif architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    elif architecture == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1, **common))
    else:
        raise ValueError(f"architecture must be 'batchtopk', 'topk' or 'standard', not {architecture!r}")
    rows = rows.to(device)
    fvu_before, _ = _scores(sae, rows)
    total = training_samples if training_samples is not None else 50 * harvested.n_rows
    cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,  # constant schedule (SAETrainer reads lr_end as the runner config sets it)
        device=device,
        n_batches_for_norm_estimate=max(1, harvested.n_rows // batch_size),
    )
    trainer = SAETrainer(cfg, sae, data_provider=_rows_forever(rows, batch_size, seed))
    sae = trainer.fit()
    sae.eval()
    fvu_after, l0_after = _scores(sae, rows)
    return ImageSAEResult(sae, harvested, architecture, d_sae, fvu_before, fvu_after, l0_after)


@torch.no_grad()
def top_features_with_images(
    model: HookedT5Gemma2,
    sae: Any,
    inputs: Mapping[str, torch.Tensor],
    k: int = 10,
    per_token: bool = False,
    row: int = 0,
) -> list[Any]:
    """:func:`steering.top_features` for an image+text row: image positions show as ``<img>``.

    Args:
        model: the hooked model.
        sae: an SAE on an encoder site (the encoder reads the whole row, image and text).
        inputs: a processor output (``input_ids``, ``pixel_values``, optionally ``attention_mask``).
        k: how many rows (overall), or per position if ``per_token``.
        per_token: the top ``k`` features of every position instead of the top ``k`` overall.
        row: which row of ``inputs`` to report.

    Returns:
        ``FeatureHit`` rows sorted by activation; ``token`` is ``<img>`` at image positions.
    """
    from sae_lens_t5gemma.model.sae_fit import check_sae_fits, sae_input
    from sae_lens_t5gemma.model.steering import rank_features

    hook = getattr(sae.cfg.metadata, "hook_name", None)
    if hook is not None and sites_mod.resolve_vision(hook) is not None:
        raise ValueError(
            f"SAE hooks {hook!r}, a vision-tower site: its activations are per image patch, not per token"
        )
    name = check_sae_fits(model, sae)
    if model.site(name).stack != "encoder":
        raise ValueError(f"SAE hooks {name!r}: the decoder never reads images; use steering.top_features")
    tokens = inputs["input_ids"].to(model.cfg.device)
    mask = inputs.get("attention_mask")
    check_image_batch(model, tokens, inputs.get("pixel_values"))
    with model.fed(prefix_len=tokens.shape[1]):
        _, cache = model.run_with_cache(
            tokens,
            pixel_values=inputs["pixel_values"],
            attention_mask=mask,
            names_filter=[name],
            return_type=None,
        )
    real = (
        torch.ones_like(tokens[row], dtype=torch.bool) if mask is None else mask[row].bool().to(tokens.device)
    )
    feats = sae.encode(to_sae(sae, sae_input(sae, cache[name][row])))
    return rank_features(feats, real, model.to_str_tokens(tokens[row]), k, per_token)
