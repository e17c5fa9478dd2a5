"""The T5Gemma 2 family in one table: ids, Gemma 3 origins, Gemma Scope 2 releases, dimensions.

T5Gemma 2 comes in 270M-270M, 1B-1B and 4B-4B. Each was adapted (UL2) from a Gemma 3
checkpoint and keeps its text dimensions; Gemma Scope 2 trained SAEs on those Gemma 3
checkpoints. :data:`SIZES` holds, per size:

- the hub ids (``t5gemma2_id``, ``gemma3_id``, ``gemma_scope_repo``) and SAELens' names of
  the every-layer Gemma Scope 2 releases (``gemma_scope_releases``: site -> release);
- the real text dimensions of both models (``t5gemma2_text``, ``gemma3_text``) and of the
  SigLIP vision tower (``vision``);
- the shrunken stand-in dimensions (:meth:`TextDims.stand_in`): every structural field of
  the real model (layer pattern, heads, KV heads, head_dim, RoPE bases and scaling, sliding
  window, soft-caps, ``query_pre_attn_scalar``) with small hidden/intermediate/vocab sizes
  and a shorter stack that still ends the way the real layer pattern ends.

Where each number comes from (and which are guesses) is in ``docs/family.md``.

:func:`check_text_config` is the gate on the T5Gemma 2 load path: a text-config field this
package does not handle is refused with its name and value instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# Gemma 3's attention pattern: five sliding-window layers, then one full-attention layer.
SLIDING_WINDOW_PATTERN = 6
# Stand-in sizes: small enough to build a model in about a second on one CPU core.
STAND_IN_VOCAB = 512  # the synthetic BPE tokenizer's vocabulary
STAND_IN_MAX_POSITIONS = 2048  # > every real sliding window; keeps TL's rotary tables small


def gemma3_layer_types(n_layers: int, pattern: int = SLIDING_WINDOW_PATTERN) -> tuple[str, ...]:
    """``layer_types`` of Gemma 3 / T5Gemma 2: every ``pattern``-th layer attends fully."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers))


@dataclass(frozen=True)
class TextDims:
    """One text stack's configuration, as transformers' ``Gemma3TextConfig`` spells it."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    vocab_size: int
    max_position_embeddings: int
    query_pre_attn_scalar: float
    rope_theta_full: float = 1_000_000.0
    rope_theta_sliding: float = 10_000.0
    rope_linear_factor_full: float | None = None
    """Linear RoPE scaling on full-attention layers only (None: no scaling)."""
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"

    @property
    def layer_types(self) -> tuple[str, ...]:
        return gemma3_layer_types(self.num_hidden_layers)

    @property
    def rope_parameters(self) -> dict[str, dict[str, Any]]:
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta_full}
        if self.rope_linear_factor_full is not None:
            full = {
                "rope_type": "linear",
                "factor": self.rope_linear_factor_full,
                "rope_theta": self.rope_theta_full,
            }
        return {
            "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
            "full_attention": full,
        }

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Gemma3TextConfig`` / T5Gemma 2's text and decoder configs."""
        kwargs = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("rope_")
        }
        return kwargs | {"layer_types": list(self.layer_types), "rope_parameters": self.rope_parameters}

    def stand_in(self, hidden_size: int, intermediate_size: int) -> TextDims:
        """The same structure, shrunk: small widths and vocabulary, a shorter stack.

        The stack keeps one full period of the layer pattern plus the real remainder
        (18 -> 6, 26 -> 8, 34 -> 10 layers), so it ends as the real one does.
        """
        n = SLIDING_WINDOW_PATTERN + self.num_hidden_layers % SLIDING_WINDOW_PATTERN
        return dataclasses.replace(
            self,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=n,
            vocab_size=STAND_IN_VOCAB,
            max_position_embeddings=STAND_IN_MAX_POSITIONS,
        )


@dataclass(frozen=True)
class VisionDims:
    """The SigLIP vision tower and the multimodal projector of T5Gemma 2's encoder."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 896
    patch_size: int = 14
    mm_tokens_per_image: int = 256


@dataclass(frozen=True)
class ModelSize:
    """One size of the family: its models, SAE releases and dimensions."""

    name: str
    t5gemma2_id: str
    gemma3_id: str
    """The Gemma 3 checkpoint T5Gemma 2 was adapted from and Gemma Scope 2 was trained on."""
    gemma_scope_repo: str
    gemma_scope_releases: Mapping[str, str]
    """Site (``attn_out``, ``resid_post``, ``mlp_out``) -> SAELens' every-layer release."""
    t5gemma2_text: TextDims
    gemma3_text: TextDims
    vision: VisionDims
    stand_in_widths: tuple[int, int]
    """(hidden, intermediate) of the stand-ins; every other structural field is real."""
    mindchain_repo: str | None = None
    """The hub repo of the mindchain SAEs for this size (only 270M has them)."""

    def stand_in_text(self, model: str = "t5gemma2") -> TextDims:
        """Shrunk text dims of the ``"t5gemma2"`` or ``"gemma3"`` stand-in."""
        dims = {"t5gemma2": self.t5gemma2_text, "gemma3": self.gemma3_text}[model]
        return dims.stand_in(*self.stand_in_widths)

    def gemma_scope_d_in(self, site: str, dims: TextDims | None = None) -> int:
        """Input width of a Gemma Scope 2 SAE: ``attn_out`` reads the o_proj input (heads x head_dim)."""
        dims = dims or self.gemma3_text
        return dims.num_attention_heads * dims.head_dim if site == "attn_out" else dims.hidden_size


def _releases(size: str) -> Mapping[str, str]:
    kinds = {"attn_out": "att", "resid_post": "res", "mlp_out": "mlp"}
    return MappingProxyType({site: f"gemma-scope-2-{size}-pt-{kind}-all" for site, kind in kinds.items()})


_GEMMA3_270M = TextDims(
    hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, sliding_window=512, vocab_size=262144,
    max_position_embeddings=32768, query_pre_attn_scalar=256,
)  # fmt: skip
_GEMMA3_1B = TextDims(
    hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, sliding_window=512, vocab_size=262144,
    max_position_embeddings=32768, query_pre_attn_scalar=256,
)  # fmt: skip
_GEMMA3_4B = TextDims(
    hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, sliding_window=1024, vocab_size=262208,
    max_position_embeddings=131072, query_pre_attn_scalar=256, rope_linear_factor_full=8.0,
)  # fmt: skip

SIZES: Mapping[str, ModelSize] = MappingProxyType(
    {
        "270m": ModelSize(
            name="270m",
            t5gemma2_id="google/t5gemma-2-270m-270m",
            gemma3_id="google/gemma-3-270m",
            gemma_scope_repo="google/gemma-scope-2-270m-pt",
            gemma_scope_releases=_releases("270m"),
            # The printed hub config: Gemma 3 270M's dims, plus linear RoPE x8 on full layers.
            t5gemma2_text=dataclasses.replace(_GEMMA3_270M, rope_linear_factor_full=8.0),
            gemma3_text=_GEMMA3_270M,
            vision=VisionDims(),
            stand_in_widths=(64, 192),
            mindchain_repo="mindchain/t5gemma2-sae-all-layers",
        ),
        "1b": ModelSize(
            name="1b",
            t5gemma2_id="google/t5gemma-2-1b-1b",
            gemma3_id="google/gemma-3-1b-pt",
            gemma_scope_repo="google/gemma-scope-2-1b-pt",
            gemma_scope_releases=_releases("1b"),
            # Guess (docs/family.md): RoPE scaling as in T5Gemma 2 270M.
            t5gemma2_text=dataclasses.replace(_GEMMA3_1B, rope_linear_factor_full=8.0),
            gemma3_text=_GEMMA3_1B,
            vision=VisionDims(),
            stand_in_widths=(72, 432),
        ),
        "4b": ModelSize(
            name="4b",
            t5gemma2_id="google/t5gemma-2-4b-4b",
            gemma3_id="google/gemma-3-4b-pt",
            gemma_scope_repo="google/gemma-scope-2-4b-pt",
            gemma_scope_releases=_releases("4b"),
            # Guess (docs/family.md): the family's 262144-token vocabulary, not Gemma 3 4B's 262208.
            t5gemma2_text=dataclasses.replace(_GEMMA3_4B, vocab_size=262144),
            gemma3_text=_GEMMA3_4B,
            vision=VisionDims(),
            stand_in_widths=(80, 320),
        ),
    }
)


DEFAULT_SIZE = "270m"
"""The size whose ids are the package's defaults (the mindchain SAEs were trained on it)."""
# The default size's ids, read from SIZES (the one home of every hub id).
T5GEMMA2_MODEL: str = SIZES[DEFAULT_SIZE].t5gemma2_id
GEMMA3_MODEL: str = SIZES[DEFAULT_SIZE].gemma3_id
GEMMA_SCOPE_REPO: str = SIZES[DEFAULT_SIZE].gemma_scope_repo
GEMMA_SCOPE_RELEASES: Mapping[str, str] = SIZES[DEFAULT_SIZE].gemma_scope_releases
MINDCHAIN_REPO: str = SIZES[DEFAULT_SIZE].mindchain_repo  # type: ignore[assignment]


def get_size(size: str) -> ModelSize:
    """``SIZES[size]`` with a clear error for an unknown size."""
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"Unknown T5Gemma 2 size {size!r}: expected one of {sorted(SIZES)}.") from None


# --------------------------------------------------------------- the load-path check

# Fields every transformers config carries (bookkeeping, not architecture).
_BOOKKEEPING = frozenset(
    {
        "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "id2label", "label2id",
        "is_encoder_decoder", "model_type", "output_attentions", "output_hidden_states", "problem_type",
        "return_dict", "transformers_version", "torch_dtype", "bos_token_id", "eos_token_id",
        "pad_token_id", "use_cache", "tie_word_embeddings", "initializer_range",
        # Legacy spelling of the layer pattern; layer_types (checked below) is what transformers uses.
        "sliding_window_pattern", "_sliding_window_pattern",
        # Training-time only: HookedT5Gemma2 keeps the model in eval mode.
        "attention_dropout", "dropout_rate",
        # transformers 4.x's generic fields, which configs saved then still carry (the released
        # T5Gemma 2 configs were written by 5.0.0.dev0); T5Gemma 2's modules never read them.
        "add_cross_attention", "cross_attention_hidden_size", "decoder_start_token_id", "finetuning_task",
        "is_decoder", "prefix", "sep_token_id", "task_specific_params", "tokenizer_class", "tie_encoder_decoder",
        "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "num_labels",
    }
)  # fmt: skip
# Any value works: transformers builds the modules from them and the hooks follow.
_DIMENSIONS = frozenset(
    {
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "sliding_window",
        "rms_norm_eps", "query_pre_attn_scalar", "layer_types", "rope_parameters",
    }
)  # fmt: skip
# Fields that must hold one value (the one every released size has).
_FIXED: dict[str, tuple[Any, str]] = {
    "hidden_activation": ("gelu_pytorch_tanh", "HookedT5Gemma2.cfg.act_fn is gelu_pytorch_tanh"),
    "attention_bias": (False, "hook_z splits o_proj's input by head, which an o_proj bias would escape"),
    "attn_logit_softcapping": (None, "no released T5Gemma 2 caps attention logits; untested here"),
    "final_logit_softcapping": (None, "no released T5Gemma 2 caps final logits; untested here"),
    "use_bidirectional_attention": (False, "the stacks' masks come from T5Gemma 2 itself"),
}
_ROPE_TYPES = {"sliding_attention": ("default",), "full_attention": ("default", "linear")}


def _refuse(where: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{where}.{field} = {value!r} is not handled by sae_lens_t5gemma: {why}.")


def check_gemma3_text_fields(config: Any, where: str, fixed_none_ok: tuple[str, ...] = ()) -> None:
    """Refuse any field of a Gemma-3-style text config this package does not handle.

    Shared by the T5Gemma 2 load path and the Gemma 3 TransformerLens recipe: unknown fields,
    RoPE types other than default (sliding layers) / default or linear (full layers), any
    value but the released one for activation, attention bias, soft-caps and bidirectionality.

    Raises:
        ValueError: naming ``where.field`` and the value.
    """
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for field, value in values.items():
        if field in _BOOKKEEPING or field in _DIMENSIONS:
            continue
        if field in _FIXED:
            expected, why = _FIXED[field]
            if value != expected and not (value is None and field in fixed_none_ok):
                raise _refuse(where, field, value, f"expected {expected!r} ({why})")
        else:
            raise _refuse(where, field, value, "unknown field (refused rather than ignored)")
    layer_types = list(values["layer_types"])
    for t in layer_types:
        if t not in _ROPE_TYPES:
            raise _refuse(where, "layer_types", t, f"expected {sorted(_ROPE_TYPES)}")
    rope = values.get("rope_parameters") or {}
    if set(rope) != set(layer_types) and set(rope) != set(_ROPE_TYPES):
        raise _refuse(where, "rope_parameters", rope, "expected one entry per layer type")
    for kind, params in rope.items():
        rope_type = params.get("rope_type", "default")
        if rope_type not in _ROPE_TYPES[kind]:
            raise _refuse(
                where,
                f"rope_parameters[{kind!r}]['rope_type']",
                rope_type,
                f"expected one of {_ROPE_TYPES[kind]}",
            )
        extra = set(params) - {"rope_type", "rope_theta"} - ({"factor"} if rope_type == "linear" else set())
        if extra:
            raise _refuse(where, f"rope_parameters[{kind!r}]", params, f"unexpected keys {sorted(extra)}")


def check_text_config(config: Any) -> None:
    """Refuse a T5Gemma 2 config whose text stacks hold a field this package does not handle.

    Called where :class:`~sae_lens_t5gemma.model.hooked.HookedT5Gemma2` wraps a model, so every load
    path passes it. Checks ``encoder.text_config`` and ``decoder`` field by field (see
    :func:`check_gemma3_text_fields`) and that both stacks have the same width.

    Raises:
        ValueError: naming the stack, the field and its value.
    """
    stacks = {"encoder.text_config": config.encoder.text_config, "decoder": config.decoder}
    for where, text in stacks.items():
        # Older configs leave use_bidirectional_attention unset (None) on T5Gemma 2's stacks.
        check_gemma3_text_fields(
            text, f"T5Gemma 2 config {where}", fixed_none_ok=("use_bidirectional_attention",)
        )
    enc, dec = stacks.values()
    if enc.hidden_size != dec.hidden_size:
        raise ValueError(
            f"T5Gemma 2 config: encoder.text_config.hidden_size = {enc.hidden_size} differs from "
            f"decoder.hidden_size = {dec.hidden_size}; this package assumes one residual width."
        )
