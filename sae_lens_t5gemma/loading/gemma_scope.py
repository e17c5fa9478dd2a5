"""Gemma 3 270M and its Gemma Scope 2 SAEs, ready to be compared with T5Gemma 2.

Gemma Scope 2 SAEs load through SAELens' own ``gemma_3`` loader and hook TransformerLens
names (``blocks.L.attn.hook_z``, ``blocks.L.hook_resid_post``, ``blocks.L.hook_mlp_out``),
so Gemma 3 is driven through a TransformerLens ``HookedTransformer``. Two things stand
between that and an offline run, and each is handled in one place here:

- **Model config.** TransformerLens 3.9 builds its Gemma 3 configs (270M, 1B, 4B, ...) from
  hard-coded recipes with the real dimensions. :func:`gemma3_tl_config` takes the recipe of
  the matching size (every architectural flag: RMS norms before and after each sublayer,
  QK norm, local/global attention) and fills every dimension, RoPE base and scaling
  (``rotary_scaling_factor`` 8 on 4B's global layers), window and layer pattern from the
  transformers config of the weights actually in hand; a field it cannot represent is
  refused by name. For the real 270M, 1B and 4B configs the result equals TransformerLens'
  own, key by key (the tests check this); for a stand-in under a real name it has the
  stand-in's dimensions.
- **Tensor shapes.** SAELens reads a Gemma Scope 2 SAE's shapes with HTTP range requests
  that fail offline; :func:`sae_lens_t5gemma._compat.read_gemma_scope_shapes_from_cache`
  (called by :func:`sae_lens_t5gemma.loading.inspection.load_sae_spec` before it loads one)
  reads them from the local hub cache instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.model.sizes import GEMMA3_MODEL

__all__ = [
    "gemma3_tl_config",
    "gemma3_tl_config_dict",
    "load_gemma3",
]


# TransformerLens' Gemma 3 recipes set these architecture flags; every Gemma 3 size shares them.
_GEMMA3_ARCHITECTURE = {
    "normalization_type": "RMS",
    "positional_embedding_type": "rotary",
    "use_attn_scale": True,
    "gated_mlp": True,
    "final_rms": True,
    "use_normalization_before_and_after": True,
    "use_qk_norm": True,
    "quantization_method": None,
}


def _tl_recipe_name(model_name: str) -> str:
    """TransformerLens' official Gemma 3 name for ``model_name``, or the 270M recipe as a template."""
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

    if model_name in OFFICIAL_MODEL_NAMES and "gemma-3-" in model_name:
        return model_name
    # A local folder or an unlisted name: the recipe only supplies what every Gemma 3 size
    # shares (checked below) and n_ctx's cap; everything else is read from the config.
    return GEMMA3_MODEL


def gemma3_tl_config_dict(hf_config: Any, model_name: str = GEMMA3_MODEL) -> dict[str, Any]:
    """TransformerLens' Gemma 3 recipe for ``model_name`` with every field read from ``hf_config``.

    Starts from ``convert_hf_model_config`` of the matching official name (for
    ``google/gemma-3-1b-pt`` the 1B recipe, for ``google/gemma-3-4b-pt`` the 4B one with its
    ``rotary_scaling_factor``; a local folder gets the 270M recipe as a template) and then
    takes every dimension, RoPE base and scaling, window and layer pattern from
    ``hf_config``, so a stand-in under a real name gets its own dimensions. For the real
    checkpoints every key equals TransformerLens' own (tests check it). Adds ``attn_scale``
    (Gemma 3 scales by ``query_pre_attn_scalar ** -0.5``).

    Raises:
        ValueError: naming the field, for a config this recipe cannot represent: another model
            type, RoPE other than default (sliding) / default or linear (full), soft-caps,
            attention bias, bidirectional attention, or any unknown field.
    """
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    from sae_lens_t5gemma.model.sizes import check_gemma3_text_fields

    if getattr(hf_config, "model_type", None) == "gemma3":  # multimodal Gemma 3 (4B and up)
        hf_config = hf_config.text_config
    if getattr(hf_config, "model_type", None) != "gemma3_text":
        raise ValueError(
            f"{model_name}: expected a Gemma 3 text config (model_type 'gemma3_text'), "
            f"got {getattr(hf_config, 'model_type', None)!r}."
        )
    where = f"{model_name}: Gemma 3 config"
    check_gemma3_text_fields(hf_config, where)
    if getattr(hf_config, "quantization_config", None):
        raise ValueError(f"{where}.quantization_config is set; this recipe loads unquantized weights only.")
    cfg = convert_hf_model_config(_tl_recipe_name(model_name))
    for key, value in _GEMMA3_ARCHITECTURE.items():
        if cfg.get(key) != value:  # TransformerLens changed its recipe: refuse rather than guess
            raise ValueError(
                f"TransformerLens' Gemma 3 recipe has {key}={cfg.get(key)!r}, expected {value!r}."
            )
    rope = hf_config.rope_parameters
    full = rope.get("full_attention", {})
    factor = float(full["factor"]) if full.get("rope_type") == "linear" else 1.0
    layer_types = list(hf_config.layer_types)
    cfg.update(
        d_model=hf_config.hidden_size,
        d_head=hf_config.head_dim,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(cfg["n_ctx"], hf_config.max_position_embeddings),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_activation,
        initializer_range=hf_config.initializer_range,
        rotary_base=full.get("rope_theta", cfg["rotary_base"]),
        rotary_base_local=rope.get("sliding_attention", {}).get("rope_theta", cfg["rotary_base_local"]),
        window_size=hf_config.sliding_window,
        use_local_attn="sliding_attention" in layer_types,
        attn_types=["global" if t == "full_attention" else "local" for t in layer_types],
        # Gemma 3 scales attention by query_pre_attn_scalar**-0.5 (= d_head**-0.5 on 270M-4B).
        attn_scale=float(hf_config.query_pre_attn_scalar) ** 0.5,
    )
    # TransformerLens applies this linear factor to global layers only, as Gemma 3 does.
    cfg.pop("rotary_scaling_factor", None)
    if factor != 1.0:
        cfg["rotary_scaling_factor"] = factor
    cfg["tokenizer_name"] = model_name
    return cfg


def gemma3_tl_config(
    hf_config: Any,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_name: str = GEMMA3_MODEL,
) -> Any:
    """A ``HookedTransformerConfig`` for a Gemma 3 text model, dimensions from ``hf_config``.

    See :func:`gemma3_tl_config_dict`: TransformerLens' own recipe for the matching size,
    every field filled (or refused) from the transformers config (``Gemma3TextConfig``), so
    weights of any Gemma 3 size load without a mismatch and nothing is silently dropped.
    """
    from transformer_lens.config import HookedTransformerConfig

    cfg = gemma3_tl_config_dict(hf_config, model_name)
    cfg.update(
        model_name=model_name.split("/")[-1],
        init_weights=False,
        device=device,
        dtype=dtype,
        n_devices=1,
        default_prepend_bos=True,
        from_checkpoint=False,
    )
    return HookedTransformerConfig.from_dict(cfg)


def load_gemma3(
    name_or_path: str | Path = GEMMA3_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hf_model: Any = None,
    tokenizer: Any = None,
) -> Any:
    """Gemma 3 (text) as a TransformerLens ``HookedTransformer``, with no weight processing.

    Equivalent to ``HookedTransformer.from_pretrained_no_processing(name, hf_model=...)``
    (no LayerNorm folding or centring, so activations are the ones Gemma Scope 2 was
    trained on), except that the config comes from :func:`gemma3_tl_config`.

    Args:
        name_or_path: hub id (default ``google/gemma-3-270m``) or local folder.
        hf_model: an already built ``Gemma3ForCausalLM``; loaded from ``name_or_path`` if None.
        tokenizer: its tokenizer; loaded from ``name_or_path`` if None.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if hf_model is None:
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name)
    cfg = gemma3_tl_config(hf_model.config, device=device, dtype=dtype, model_name=name)
    state_dict = get_pretrained_state_dict(name, cfg, hf_model.eval(), dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device).eval()
