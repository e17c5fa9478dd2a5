"""The image stand-in: a tiny T5Gemma 2 with a SigLIP tower, its Gemma 3 processor, and test images.

A tiny SigLIP whose 56x56 image makes (56 / 14)^2 = 16 patches, pooled 2x2 to 4 soft tokens per
image (the real models make 4096 patches pooled 4x4 to 256 tokens: image 896, patch 14); the
processor is Gemma 3's, over the stand-in tokenizer with Gemma 3's image tokens added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.stand_in.synthetic import TINY_TEXT_DIMS, build_tokenizer, t5gemma2_config

# A tiny SigLIP whose 56x56 image makes (56 / 14)^2 = 16 patches, pooled 2x2 to 4 soft tokens
# per image: the real models make 4096 patches pooled 4x4 to 256 tokens (image 896, patch 14).
STAND_IN_VISION: dict[str, Any] = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    image_size=56, patch_size=14, vision_use_head=False,  # Gemma 3's tower has no pooling head
)  # fmt: skip
STAND_IN_MM_TOKENS = 4
# Gemma 3's image tokens (the processor writes "\n\n<boi>" + <image>*mm_tokens + "<eoi>\n\n").
IMAGE_SPECIAL_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


def build_image_processor(folder: str | Path, mm_tokens_per_image: int = STAND_IN_MM_TOKENS,
                          image_size: int = STAND_IN_VISION["image_size"]):  # fmt: skip
    """A transformers ``Gemma3Processor`` (the class T5Gemma 2 checkpoints name) for the stand-ins.

    The small BPE tokenizer of :func:`build_tokenizer` gets Gemma 3's three image tokens
    (begin, end, soft placeholder) appended after its vocabulary; the image processor is the
    PIL one (no torchvision here) at ``image_size``. Saved to ``folder`` and loaded back with
    ``AutoProcessor``, so the code path is the one a real checkpoint takes.
    """
    from transformers import AutoProcessor, AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    folder = Path(folder)
    build_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens=IMAGE_SPECIAL_TOKENS)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor, tokenizer, image_seq_length=mm_tokens_per_image)
    processor.save_pretrained(folder)
    return AutoProcessor.from_pretrained(folder)


def t5gemma2_image_config(processor: Any, vision: dict[str, Any] | None = None, **text_overrides: Any):
    """A tiny ``T5Gemma2Config`` whose image-token ids and ``mm_tokens_per_image`` match ``processor``.

    The vocabulary grows to hold the processor's image tokens (they are ordinary embedding
    rows that the projector's output overwrites, as on the real models).
    """
    from transformers import T5Gemma2Config

    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in IMAGE_SPECIAL_TOKENS.items()}
    base = t5gemma2_config(**{"vocab_size": max(TINY_TEXT_DIMS["vocab_size"], len(tok)), **text_overrides})
    encoder = base.encoder.to_dict()
    encoder.update(
        vision_config=dict(vision or STAND_IN_VISION),
        mm_tokens_per_image=processor.image_seq_length,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
    )
    return T5Gemma2Config(
        encoder=encoder,
        decoder=base.decoder.to_dict(),
        image_token_index=ids["image_token"],
        tie_word_embeddings=True,
    )


def build_image_stand_in(folder: str | Path, seed: int = 0, **text_overrides: Any) -> tuple[Any, Any]:
    """A tiny random T5Gemma 2 with a 2-layer SigLIP, and its processor (saved in ``folder``).

    Returns:
        ``(hf_model, processor)``: a ``T5Gemma2ForConditionalGeneration`` in eval mode whose
        images become :data:`STAND_IN_MM_TOKENS` soft tokens each, and the ``Gemma3Processor``
        that writes that many placeholders per ``<start_of_image>`` in a prompt.
    """
    from transformers import T5Gemma2ForConditionalGeneration

    processor = build_image_processor(folder)
    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(t5gemma2_image_config(processor, **text_overrides))
    # transformers initialises the projector's weight to zeros (the real one is trained); random
    # values make the soft tokens depend on the image, which the stand-in exists to show.
    with torch.no_grad():
        weight = model.model.encoder.multi_modal_projector.mm_input_projection_weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return model.eval(), processor


def stand_in_image(seed: int = 0, height: int = 40, width: int = 50) -> torch.Tensor:
    """A random RGB image as a ``uint8`` tensor ``[3, height, width]`` (what processors accept).

    Smooth colour gradients plus noise, so that two seeds differ everywhere. Synthetic.
    """
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(1, height, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, width)
    a, b, c = torch.rand(3, 3, 1, 1, generator=g)
    img = a * ys + b * xs + c * ys * xs + 0.3 * torch.rand(3, height, width, generator=g)
    return (img / img.amax() * 255).round().to(torch.uint8)
