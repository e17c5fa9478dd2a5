"""``HookedT5Gemma2``: a TransformerLens ``HookedRootModule`` around transformers' T5Gemma 2.

SAELens' ActivationsStore, runners and evals drive a ``HookedRootModule``. This module wraps
a ``T5Gemma2ForConditionalGeneration`` so that they can:

- Hook points carry TransformerBridge's names (``encoder_blocks.5.attn.hook_out``,
  ``decoder_blocks.3.self_attn.hook_z``, ...). They are derived from :mod:`sites`, the
  one table of sites; aliases (bridge alternates, transformers module paths in both layouts,
  friendly names) resolve through :func:`sites.resolve` wherever a name is accepted.
- The transformers model is run unchanged. For each hook point that has a hook attached
  (or an SAE spliced in), a PyTorch forward (pre-)hook on the matching transformers module
  routes the tensor through the ``HookPoint``; whatever the hook returns flows on.
- Images (``pixel_values=``, as transformers' processor prepares them) go to the encoder's
  SigLIP tower. Its hook points (``vision_blocks.N.hook_resid_post``, ``hook_mm_proj_out``,
  ... from :data:`sites.VISION_SITE_KINDS`) are per image, outside the position contract
  below; :meth:`HookedT5Gemma2.image_token_mask` marks where the image tokens sit.
- The forward pass runs only what is needed. Without logits or loss asked for, an
  encoder-only run stops right after the deepest hooked site (a private exception raised
  from the hook), and a run with decoder hooks runs the encoder fully, the decoder up to
  its deepest hooked site, and never the 262k-vocab LM head.

Input conventions (``model.convention``), for a token batch ``[batch, n]``:

- ``prefix_lm`` (default): the row is split at ``p`` (``model.prefix_len``, default ``n // 2``).
  The encoder reads ``tokens[:, :p]``; the decoder reads its BOS, then ``tokens[:, p:]``; loss
  and logits score only the continuation. This is the task T5Gemma 2 was adapted for (UL2:
  the decoder writes text the encoder did not see).
- ``reconstruct``: the encoder reads the row and the decoder reads the same row as is, so
  decoder position ``t`` predicts token ``t + 1`` with token ``t + 1`` already in the encoder: a
  copy task the model was never trained on, kept as an explicit opt-in.
- Explicit ``decoder_input_ids=`` / ``labels=`` (real source/target pairs) bypass both.

Position contract (both conventions, as HookedTransformer's): hooked activations are
``[batch, n, ...]``; decoder position ``t`` holds the state after reading token ``t`` of the
batch, so SAELens' token-id masks, its ``mask[:, :-1]`` trim and ``seqpos_slice`` apply as
they are. Under ``prefix_lm`` the decoder state that has read only its BOS sits at ``p - 1``;
positions a stack does not compute hold zeros (encoder ``>= p``, decoder ``< p - 1``), and
:meth:`HookedT5Gemma2.covered_mask` says which positions are real. Logits are ``[batch, n,
d_vocab]`` (position ``t`` predicts token ``t + 1``; zeros where nothing is predicted) and
``loss_per_token=True`` gives ``[batch, n - 1]``.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import resolve_dtype
from sae_lens_t5gemma.model.sites import Site
from sae_lens_t5gemma.model.sizes import check_text_config
from sae_lens_t5gemma.model.steering import SAEMixin

logger = logging.getLogger(__name__)

ReturnType = Literal["logits", "loss", "both"] | None
Convention = Literal["prefix_lm", "reconstruct"]
CONVENTIONS: dict[str, str] = {
    "prefix_lm": "encoder reads tokens[:, :p]; decoder reads [BOS] + tokens[:, p:]; "
    "loss and KL on the continuation tokens[:, p:] (p = prefix_len, default n // 2)",
    "reconstruct": "encoder reads the row; decoder reads the same row; position t predicts token t+1, "
    "which the encoder has already read (a copy task)",
}
"""Each convention, described as it is recorded in SAE metadata and report rows."""
DEFAULT_CONVENTION: Convention = "prefix_lm"
_KEEP: Any = object()  # "leave as it is" for HookedT5Gemma2.fed
_KIND_ORDER = {k.friendly: i for i, k in enumerate(sites_mod.SITE_KINDS)}
_STACK_ORDER = {s: i for i, s in enumerate(sites_mod.STACKS)}


class _StopForward(Exception):
    """Raised from a hook once the deepest needed site has fired; caught in ``forward``."""


@dataclass(frozen=True)
class _Span:
    """Where one stack's positions sit in the ``[batch, n]`` token batch.

    ``rows`` (per-row splits, rows of different lengths): ``(offsets, lengths)``, each ``[batch]``;
    a stack's position ``j`` of row ``b`` lands at ``offsets[b] + j`` when ``j < lengths[b]``.
    """

    offset: int
    n: int
    rows: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _Feed:
    """One forward's inputs under a convention, and where each stack's positions land."""

    tokens: torch.Tensor
    enc_ids: torch.Tensor
    enc_mask: torch.Tensor | None
    dec_ids: torch.Tensor | None
    labels: torch.Tensor | None
    """Targets aligned with ``dec_ids`` (transformers' layout: no further shift), -100 = none."""
    spans: dict[str, _Span] | None
    """Per stack; None for explicit decoder inputs (activations keep transformers' shapes)."""
    dec_mask: torch.Tensor | None = None
    """The decoder's attention mask (rows of different lengths), or None."""


def _row_positions(span: _Span, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a per-row span and a stack tensor of ``m`` positions: (row ids, batch positions,
    which of the ``[batch, m]`` stack positions belong to the row)."""
    offsets, lengths = span.rows  # type: ignore[misc]
    j = torch.arange(m, device=offsets.device)
    pos = offsets[:, None] + j
    keep = (j < lengths[:, None]) & (pos < span.n)
    rows = torch.arange(len(offsets), device=offsets.device)[:, None].expand_as(pos)
    return rows, pos, keep


def _pad(x: torch.Tensor, dim: int, span: _Span) -> torch.Tensor:
    if span.rows is not None:
        xm = x.movedim(dim, 1)
        rows, pos, keep = _row_positions(span, xm.shape[1])
        full = xm.new_zeros((xm.shape[0], span.n, *xm.shape[2:]))
        full[rows[keep], pos[keep]] = xm[keep]
        return full.movedim(1, dim)
    if span.offset == 0 and x.shape[dim] == span.n:
        return x
    shape = list(x.shape)
    shape[dim] = span.n
    full = x.new_zeros(shape)
    full.narrow(dim, span.offset, x.shape[dim]).copy_(x)
    return full


def _take(full: torch.Tensor, dim: int, span: _Span, m: int) -> torch.Tensor:
    """The inverse of :func:`_pad`: a stack's ``m`` positions out of the batch's ``n``
    (positions outside a row's own part come back as zeros)."""
    if span.rows is None:
        return full.narrow(dim, span.offset, m)
    fm = full.movedim(dim, 1)
    rows, pos, keep = _row_positions(span, m)
    out = fm.new_zeros((fm.shape[0], m, *fm.shape[2:]))
    out[keep] = fm[rows[keep], pos[keep]]
    return out.movedim(1, dim)


# The decoder's merged attention keeps z = softmax([q k_dec | q k_enc]) @ [v_dec | v_enc] inside
# one transformers call. To hook its self and cross parts (and the patterns), a routed
# attention module gets a private config copy naming this attention function, which
# computes the same softmax eagerly and sends each part through its hook point.
_SPLIT_ATTENTION = "sae_lens_t5gemma_split"


def _split_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     softcap: float | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return module.__dict__["_sae_lens_t5gemma_route"](query, key, value, attention_mask, scaling, softcap)


def _register_split_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_SPLIT_ATTENTION, _split_attention)


_register_split_attention()


@dataclass
class HookedT5Gemma2Config:
    """What SAELens and TransformerLens helpers read from ``model.cfg``."""

    model_name: str
    n_layers: int
    """Layers per stack (encoder and decoder have the same depth in T5Gemma 2)."""
    d_model: int
    d_vocab: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    device: torch.device
    dtype: torch.dtype
    tokenizer_prepends_bos: bool
    default_prepend_bos: bool = True
    n_layers_encoder: int = 0
    n_layers_decoder: int = 0
    original_architecture: str = "T5Gemma2ForConditionalGeneration"
    act_fn: str = "gelu_pytorch_tanh"
    normalization_type: str = "RMS"
    positional_embedding_type: str = "rotary"


class _Container(nn.Module):
    """An empty module that only holds hook points under their bridge-style names."""


# TransformerLens' cache helpers assume one stack of ``blocks.N``; on T5Gemma 2 each would fail
# deep inside (KeyError, AttributeError). They raise one clear error instead, naming what to use.
_SINGLE_STACK_HELPERS = (
    "accumulated_resid", "decompose_resid", "get_full_resid_decomposition", "stack_head_results",
    "stack_neuron_results", "compute_head_results", "get_neuron_results", "logit_attrs", "apply_ln_to_stack",
    "stack_activation",
)  # fmt: skip


def _single_stack_helper(name: str) -> Callable[..., Any]:
    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"ActivationCache.{name} is not supported for T5Gemma 2: TransformerLens builds it from one "
            "stack of blocks.N, and T5Gemma 2 has an encoder and a decoder. Read the sites per stack "
            "instead, e.g. torch.stack([cache[f'encoder_blocks.{l}.hook_resid_post'] for l in "
            "range(model.cfg.n_layers)]), and see model.covered_mask(tokens, stack) for the real positions."
        )

    refuse.__name__ = name
    return refuse


class UncoveredPositionsWarning(UserWarning):
    """A cached encoder or decoder activation holds positions its stack did not compute (zeros)."""


def _stack_of_key(key: str) -> str | None:
    for stack in sites_mod.STACKS:
        if key.startswith(f"{stack}_blocks."):
            return stack
    return None


def _called_from_user_code() -> bool:
    """True unless the caller (two frames up) is this package, SAELens or TransformerLens,
    which read caches with the position masks in hand."""
    module = sys._getframe(2).f_globals.get("__name__", "")
    return not module.startswith(("sae_lens", "transformer_lens"))


class T5Gemma2ActivationCache(ActivationCache):
    """An ``ActivationCache`` whose keys can be any spelling of a site (aliases resolve).

    It knows which positions each stack computed (:meth:`covered_mask`). Under ``prefix_lm`` a
    stack leaves positions of the batch uncovered (the encoder those at and after the split, the
    decoder those before it); reading such a hook from user code warns once per key
    (:class:`UncoveredPositionsWarning`), so ``cache[encoder_hook][:, -1]`` cannot read zeros
    unnoticed. TransformerLens' single-stack helpers (``accumulated_resid``, ``decompose_resid``,
    ...) and its ``cache["resid_post", 5]`` shorthand raise a clear error naming the per-stack
    alternative.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any, has_batch_dim: bool = True,
                 covered: dict[str, torch.Tensor] | None = None, split: str = "") -> None:  # fmt: skip
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self._covered = covered or {}
        self._split = split
        self._warned: set[str] = set()

    def covered_mask(self, key: str) -> torch.Tensor:
        """``[batch, n]`` bool: the positions of ``key`` that its stack computed from a token of
        the batch (all True for the vision tower, under ``reconstruct`` and for explicit decoder
        inputs)."""
        x = self[key] if _stack_of_key(key) is None else self.cache_dict.get(self._canonical(key))
        if x is None:
            raise KeyError(f"{key!r} is not in this cache; cached: {sorted(self.cache_dict)[:8]} ...")
        stack = _stack_of_key(self._canonical(key))
        full = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self._covered[stack].to(x.device) if stack in self._covered else full

    def _canonical(self, key: str) -> str:
        if key in self.cache_dict:
            return key
        try:
            return sites_mod.resolve(key).hook_name
        except ValueError:
            return key

    def _warn_uncovered(self, key: str) -> None:
        stack = _stack_of_key(key)
        if stack not in self._covered or key in self._warned or bool(self._covered[stack].all()):
            return
        self._warned.add(key)
        which = (
            "at and after the split p hold zeros" if stack == "encoder"
            else "before p - 1 hold zeros and p - 1 its BOS-only state"
        )  # fmt: skip
        warnings.warn(
            f"cache[{key!r}]: under prefix_lm ({self._split}) the {stack} reads part of each row: positions "
            f"{which}, so cache[{key!r}][:, -1] is not necessarily the last "
            f"token's {stack} state. cache.covered_mask({key!r}) marks the real positions; "
            "`with model.fed(prefix_len=n): ...` lets the encoder read the whole prompt.",
            UncoveredPositionsWarning,
            stacklevel=3,
        )

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, str) and self._covered and _called_from_user_code():
            self._warn_uncovered(self._canonical(key))
        if isinstance(key, tuple):
            name, layer = (key + (None,))[:2]
            raise KeyError(
                f"cache[{key!r}] is HookedTransformer's shorthand for blocks.{layer}.hook_{name}; T5Gemma 2 has "
                f"two stacks: cache['encoder_blocks.{layer}.hook_{name}'] or cache['decoder_blocks.{layer}.hook_{name}']"
            )
        if isinstance(key, str) and key not in self.cache_dict:
            try:
                vision = sites_mod.resolve_vision(key)
                canonical = vision.hook_name if vision is not None else sites_mod.resolve(key).hook_name
            except ValueError:
                canonical = None
            if canonical is not None and canonical in self.cache_dict:
                return self.cache_dict[canonical]
            raise KeyError(f"{key!r} is not in this cache; cached: {sorted(self.cache_dict)[:8]} ...")
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if key in self.cache_dict:
            return True
        try:
            vision = sites_mod.resolve_vision(str(key))
            site = vision if vision is not None else sites_mod.resolve(str(key))
            return site.hook_name in self.cache_dict
        except ValueError:
            return False


for _name in _SINGLE_STACK_HELPERS:
    setattr(T5Gemma2ActivationCache, _name, _single_stack_helper(_name))


class HookedT5Gemma2(SAEMixin, HookedRootModule):
    """T5Gemma 2 (text path) with TransformerBridge-named hook points that SAELens can drive.

    Args:
        hf_model: a ``T5Gemma2ForConditionalGeneration`` (any dtype/device; it is put in eval mode).
        tokenizer: its tokenizer (Gemma's: pad 0, eos 1, bos 2, prepends ``<bos>``).
        model_name: name shown in ``cfg.model_name``; defaults to the model's ``name_or_path``.
        convention: ``"prefix_lm"`` (default) or ``"reconstruct"``; see the module docstring.
            Settable later: ``model.convention = "reconstruct"``.
        prefix_len: under ``prefix_lm``, the split ``p``: an int, None (``n // 2`` of each batch)
            or ``"random"`` (a fresh split per forward, in ``[1, n - 1]``; see ``last_splits``). Rows of
            different lengths (an attention mask) are split each at its own length: ``L // 2``,
            or the batch's random draw scaled to the row.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any = None,
        model_name: str | None = None,
        convention: Convention = DEFAULT_CONVENTION,
        prefix_len: int | Literal["random"] | None = None,
    ):
        super().__init__()
        config = getattr(hf_model, "config", None)
        if not hasattr(getattr(config, "encoder", None), "text_config") or not hasattr(hf_model, "lm_head"):
            raise ValueError(
                f"HookedT5Gemma2 wraps a transformers T5Gemma2ForConditionalGeneration, not {type(hf_model).__name__}."
            )
        check_text_config(config)  # a text-config field this package does not handle is refused by name
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        self.convention = convention
        self.prefix_len = prefix_len
        self.last_prefix_len: int | None = None
        self.last_splits: torch.Tensor | None = None
        self._held_draw: int | None = None
        """The split the last forward used under ``prefix_lm`` (None otherwise)."""
        self._split_rng = torch.Generator().manual_seed(0)
        self._spans: dict[str, _Span] | None = None
        self._enc_len = 0
        enc_text = config.encoder.text_config
        dec = config.decoder
        self._n_layers = {"encoder": enc_text.num_hidden_layers, "decoder": dec.num_hidden_layers}
        self._heads = {
            "encoder": (enc_text.num_attention_heads, enc_text.head_dim),
            "decoder": (dec.num_attention_heads, dec.head_dim),
        }
        embed = hf_model.get_input_embeddings()
        self.cfg = HookedT5Gemma2Config(
            model_name=model_name or getattr(config, "name_or_path", "") or "t5gemma-2",
            n_layers=max(self._n_layers.values()),
            d_model=dec.hidden_size,
            d_vocab=dec.vocab_size,
            n_heads=dec.num_attention_heads,
            d_head=dec.head_dim,
            d_mlp=dec.intermediate_size,
            n_ctx=dec.max_position_embeddings,
            device=embed.weight.device,
            dtype=embed.weight.dtype,
            tokenizer_prepends_bos=_tokenizer_prepends_bos(tokenizer),
            n_layers_encoder=self._n_layers["encoder"],
            n_layers_decoder=self._n_layers["decoder"],
        )

        # The hook-point tree, derived from the site table: one HookPoint per canonical name.
        self._sites: dict[str, Site] = {}
        for s in sites_mod.all_sites(self.cfg.n_layers):
            if s.layer < self._n_layers[s.stack]:
                self._sites[s.hook_name] = s
                self._add_hook_point(s.hook_name)
        self._hf_modules = {name: self._find_hf_module(s) for name, s in self._sites.items()}
        self._hf_layers = {
            name: self._find_hf_module(sites_mod.site(s.stack, s.layer, "resid_pre"))
            for name, s in self._sites.items()
        }
        # Vision-tower hook points: per image, outside the text position contract (sites.py).
        self._vision_sites: dict[str, sites_mod.VisionSite] = {}
        self._vision_modules: dict[str, nn.Module] = {}
        self._n_vision_layers = 0
        vision_config = getattr(config.encoder, "vision_config", None)
        if vision_config is not None and _has_module(hf_model, sites_mod.HF_VISION):
            self._n_vision_layers = vision_config.num_hidden_layers
            for vs in sites_mod.vision_sites(self._n_vision_layers):
                self._vision_sites[vs.hook_name] = vs
                self._vision_modules[vs.hook_name] = self._find_hf_module(vs)
                self._add_hook_point(vs.hook_name)
        self.setup()

    # ------------------------------------------------------------------ structure

    def _add_hook_point(self, hook_name: str) -> None:
        parts = hook_name.split(".")
        parent: nn.Module = self
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                parent = parent[int(part)]  # type: ignore[index]
                continue
            child = parent._modules.get(part)
            if child is None:
                # A ModuleList where the next part is a layer index, so ``encoder_blocks[5]`` works.
                if parts[i + 1].isdigit():
                    stack = "encoder" if part.startswith("encoder") else "decoder"
                    n = self._n_vision_layers if part == sites_mod.VISION_BLOCKS else self._n_layers[stack]
                    child = nn.ModuleList(_Container() for _ in range(n))
                else:
                    child = _Container()
                parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], HookPoint())

    def _find_hf_module(self, s: Site | sites_mod.VisionSite) -> nn.Module:
        for path in (s.hf_module, s.hf_module_legacy):
            try:
                return self.hf_model.get_submodule(path)
            except AttributeError:
                continue
        raise ValueError(
            f"Hook site {s.hook_name}: neither {s.hf_module!r} nor {s.hf_module_legacy!r} exists in "
            f"the wrapped {type(self.hf_model).__name__}."
        )

    def setup(self) -> None:
        """Index hook points (and spliced SAE wrappers) by name; the transformers model is left alone."""
        self.mod_dict = {}
        self.hook_dict = {}
        for name, module in self.named_modules():
            if name == "" or name == "hf_model" or name.startswith("hf_model."):
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def _apply(self, fn: Any, recurse: bool = True) -> HookedT5Gemma2:
        super()._apply(fn, recurse)
        weight = self.hf_model.get_input_embeddings().weight
        self.cfg.device, self.cfg.dtype = weight.device, weight.dtype
        return self

    @property
    def W_E(self) -> torch.Tensor:
        """The (tied) token embedding table ``[d_vocab, d_model]``, before Gemma's sqrt(d_model) scale."""
        return self.hf_model.get_input_embeddings().weight

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding ``[d_model, d_vocab]`` (tied to ``W_E``)."""
        return self.hf_model.get_output_embeddings().weight.T

    # ------------------------------------------------------------------ convention

    @property
    def convention(self) -> Convention:
        """How a token batch is fed: ``"prefix_lm"`` or ``"reconstruct"`` (see :data:`CONVENTIONS`)."""
        return self._convention

    @convention.setter
    def convention(self, value: str) -> None:
        if value not in CONVENTIONS:
            raise ValueError(f"Unknown convention {value!r}: expected one of {sorted(CONVENTIONS)}")
        self._convention: Convention = value  # type: ignore[assignment]

    @property
    def prefix_len(self) -> int | Literal["random"] | None:
        """The ``prefix_lm`` split: an int, None (``n // 2``) or ``"random"``."""
        return self._prefix_len

    @prefix_len.setter
    def prefix_len(self, value: int | str | None) -> None:
        ok = value is None or value == "random" or (isinstance(value, int) and not isinstance(value, bool))
        if not ok or (isinstance(value, int) and value < 1):
            raise ValueError(f"prefix_len must be a positive int, None (n // 2) or 'random', not {value!r}")
        self._prefix_len = value

    def split_point(self, n: int) -> int:
        """The ``prefix_lm`` split ``p`` for rows of ``n`` tokens (a fixed prefix_len, or ``n // 2``).

        Raises:
            ValueError: ``prefix_len`` is larger than ``n``, or ``"random"`` (no fixed split).
        """
        if self.prefix_len == "random":
            raise ValueError("prefix_len='random' has no fixed split point; see model.last_splits")
        p = max(1, n // 2) if self.prefix_len is None else self.prefix_len
        if p > n:
            raise ValueError(f"prefix_len={p} is longer than the token batch ({n} positions)")
        return p

    @staticmethod
    def row_lengths(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch]``: each row's length (the mask's ones; rows start at position 0).

        Raises:
            ValueError: a mask row is not ones followed by zeros (left padding or holes): the
                position contract and the per-row split read a row from position 0.
        """
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        if attention_mask is None:
            return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
        mask = (attention_mask if attention_mask.ndim == 2 else attention_mask.unsqueeze(0)).to(
            tokens.device
        ) != 0
        lengths = mask.sum(1)
        pos = torch.arange(mask.shape[1], device=mask.device)
        bad = ((pos[None] < lengths[:, None]) != mask).any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} is not right-padded (ones, then zeros): rows must start at "
                "position 0 (to_tokens pads on the right whatever the tokenizer says)"
            )
        return lengths

    def splits(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, first: int = 1
    ) -> torch.Tensor:
        """``[batch]``: the ``prefix_lm`` split of each row, at the row's own length.

        ``prefix_len=None``: ``max(1, L // 2)``; an int: that int for every row; ``"random"``: the
        held draw (:meth:`held_split`) or a fresh one, one per batch, scaled to each row's length.
        """
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        lengths = self.row_lengths(tokens, attention_mask)
        n = tokens.shape[1]
        if self.prefix_len == "random":
            longest = int(lengths.max()) if len(lengths) else n
            r = self._held_draw if self._held_draw is not None else self._random_split(longest, first)
            if longest <= first + 1:
                return torch.full_like(lengths, r)
            # The same draw in every row, scaled from the longest row to each row's own length.
            scaled = first + (r - first) * (lengths - first).clamp(min=1) // (longest - first)
            return scaled.clamp(min=first)
        if self.prefix_len is None:
            return (lengths // 2).clamp(min=1)
        return torch.full_like(lengths, self.split_point(n))

    def covered_mask(
        self, tokens: torch.Tensor, stack: str, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[batch, n]`` bool: the positions whose state ``stack`` computes from a token of the batch.

        Under ``prefix_lm``: encoder ``t < p``; decoder ``t >= p`` (the BOS-only state at ``p - 1``
        is left out: it has read no token of the batch), with ``p`` each row's split
        (:meth:`splits`; pass the forward's ``attention_mask`` for padded rows). Under
        ``reconstruct``: every position. A ``"random"`` split is the held one
        (:meth:`held_split`), else the last forward's.
        """
        if stack not in sites_mod.STACKS:
            raise ValueError(f"Unknown stack {stack!r}: expected one of {sites_mod.STACKS}")
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        if self.convention == "reconstruct":
            return mask
        if self.prefix_len == "random" and self._held_draw is None:
            p = self.last_splits
            if p is None or len(p) != tokens.shape[0]:
                raise ValueError(
                    "prefix_len='random': covered_mask reads the split of the forward it describes; hold "
                    "one for the batch with `with model.held_split(tokens): ...` (or run the forward first)"
                )
        else:
            p = self.splits(tokens, attention_mask)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        p = p.to(tokens.device)[:, None]
        return mask & ((pos < p) if stack == "encoder" else (pos >= p))

    @property
    def image_token_id(self) -> int | None:
        """The id of the image placeholder token (``config.image_token_id``); None without a vision tower."""
        return self.hf_model.config.image_token_id if self._vision_sites else None

    def image_token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[batch, n]`` bool: the positions of image placeholder tokens (``image_token_id``).

        The encoder reads each image's ``mm_tokens_per_image`` soft tokens (the projector's
        output, ``hook_mm_proj_out``) at these positions, in order, so an encoder activation
        ``cache[hook][mask]`` is an image token's. Text positions are
        ``covered_mask(tokens, "encoder") & ~image_token_mask(tokens)`` (and the attention mask).
        Only the encoder reads images: under ``prefix_lm`` they must sit before the split (the
        forward refuses otherwise); the decoder never sees them (under ``reconstruct`` it reads
        the placeholder ids as plain tokens).

        Raises:
            ValueError: the model has no vision tower.
        """
        if self.image_token_id is None:
            raise ValueError("This model has no vision tower, so no image tokens.")
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        return tokens == self.image_token_id

    def _check_images(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """The image-token mask of ``tokens`` after checking it against ``pixel_values``."""
        if self.image_token_id is None:
            if pixel_values is not None:
                raise ValueError("pixel_values given, but this model has no vision tower.")
            return None
        image = self.image_token_mask(tokens)
        n_tokens = int(image.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(
                    f"The tokens hold {n_tokens} image placeholder tokens (image_token_id="
                    f"{self.image_token_id}) but no pixel_values were given: pass the processor's "
                    "pixel_values=, or remove the placeholders."
                )
            return None
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be [n_images, channels, height, width] as the processor makes "
                f"them, not shape {tuple(pixel_values.shape)}"
            )
        per_image = self.hf_model.config.encoder.mm_tokens_per_image
        if n_tokens != pixel_values.shape[0] * per_image:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} images, which need "
                f"{pixel_values.shape[0] * per_image} image placeholder tokens ({per_image} each, "
                f"image_token_id={self.image_token_id}); the tokens hold {n_tokens}. Build the row "
                "with the model's processor."
            )
        return image

    @contextmanager
    def fed(self, convention: str | None = None, prefix_len: Any = _KEEP) -> Iterator[HookedT5Gemma2]:
        """Run a block under another convention and/or ``prefix_len``; the model's own come back after.

        Example:
            >>> with model.fed(prefix_len=tokens.shape[1]):  # the encoder reads the whole row
            ...     _, cache = model.run_with_cache(tokens, names_filter=[hook])
        """
        before = self.convention, self.prefix_len
        try:
            if convention is not None:
                self.convention = convention
            if prefix_len is not _KEEP:
                self.prefix_len = prefix_len
            yield self
        finally:
            self.convention, self.prefix_len = before

    @contextmanager
    def held_split(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor | None]:
        """Under ``prefix_len="random"``: draw one split for ``tokens`` and hold it for every forward
        inside (clean, spliced, ablated; :meth:`covered_mask` reads it too). Yields each row's
        split (:meth:`splits`), or None when the split is not random (nothing to hold)."""
        if self.convention != "prefix_lm" or self.prefix_len != "random":
            yield None
            return
        lengths = self.row_lengths(tokens, attention_mask)
        before = self._held_draw
        self._held_draw = self._random_split(int(lengths.max()))
        try:
            yield self.splits(tokens, attention_mask)
        finally:
            self._held_draw = before

    def _random_split(self, n: int, first: int = 1) -> int:
        """A ``prefix_len="random"`` split in ``[first, n - 1]`` from the model's own generator."""
        if n < 2:
            raise ValueError("prefix_len='random' needs rows of at least 2 tokens")
        if n - first < 1:
            raise ValueError(
                f"prefix_len='random' needs a split in [{first}, {n - 1}] (after the last image "
                f"token and before the row's end); rows of {n} tokens leave none"
            )
        return int(torch.randint(first, n, (1,), generator=self._split_rng))

    def describe_convention(self) -> str:
        """One line for metadata and report rows: the convention, its split and what it means."""
        if self.convention == "reconstruct":
            return f"reconstruct: {CONVENTIONS['reconstruct']}"
        split = {None: "n // 2", "random": "random per batch"}.get(self.prefix_len, str(self.prefix_len))  # type: ignore[arg-type]
        return f"prefix_lm (p = {split}): {CONVENTIONS['prefix_lm']}"

    # ------------------------------------------------------------------ names

    def canonical_name(self, name: str) -> str:
        """The canonical hook name for any spelling (bridge name, alias, HF module path, friendly).

        Raises:
            ValueError: unknown name or layer out of range; the message lists close matches.
        """
        if name in self._sites or name in self.mod_dict:
            return name
        # Sub-hooks of a spliced SAE, e.g. ``<alias>.hook_sae_acts_post``.
        for suffix in _SAE_SUFFIXES:
            if name.endswith("." + suffix):
                return f"{self.canonical_name(name[: -len(suffix) - 1])}.{suffix}"
        vs = sites_mod.resolve_vision(name, n_layers=self._n_vision_layers)
        if vs is not None:
            if vs.hook_name not in self._vision_sites:
                raise ValueError(f"Hook {name!r}: this model has no vision tower.")
            return vs.hook_name
        s = sites_mod.resolve(name, n_layers=self.cfg.n_layers)
        if s.layer >= self._n_layers[s.stack]:
            raise ValueError(f"Hook {name!r}: the {s.stack} has only {self._n_layers[s.stack]} layers.")
        return s.hook_name

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Literal["fwd", "bwd"]) -> None:
        super()._enable_hook_with_name(self.canonical_name(name), hook, dir)

    def add_hook(self, name: Any, hook: Callable, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if isinstance(name, str):
            name = self.canonical_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    def _canonical_filter(self, names_filter: Any) -> tuple[Any, dict[str, str]]:
        """Resolve string names in a names filter; returns the filter and alias -> canonical."""
        if names_filter is None or callable(names_filter):
            return names_filter, {}
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        aliases = {n: self.canonical_name(n) for n in names}
        return list(dict.fromkeys(aliases.values())), {a: c for a, c in aliases.items() if a != c}

    def run_with_cache(  # type: ignore[override]
        self,
        *model_args: Any,
        names_filter: Any = None,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, torch.Tensor]]:
        """Run the model and cache activations at the hooks ``names_filter`` selects.

        Only what those hooks need is computed: see :meth:`forward`. Names may be any
        spelling; the cache answers to the spelling asked for as well as the canonical one.
        ``stop_at_layer`` (as SAELens passes it) makes the output ``None``.
        """
        names_filter, aliases = self._canonical_filter(names_filter)
        out, cache = super().run_with_cache(
            *model_args, names_filter=names_filter, remove_batch_dim=remove_batch_dim, **kwargs
        )
        if return_cache_object:
            covered, split = {}, ""
            if self.convention == "prefix_lm" and self.last_splits is not None and not remove_batch_dim:
                p = self.last_splits
                split = f"p = {int(p[0])}" if bool((p == p[0]).all()) else f"p = {p.tolist()} per row"
                pos = torch.arange(self._last_width, device=p.device)[None, :]
                covered = {"encoder": pos < p[:, None], "decoder": pos >= p[:, None]}
            return out, T5Gemma2ActivationCache(cache, self, not remove_batch_dim, covered, split)
        for alias, canonical in aliases.items():
            if canonical in cache:
                cache[alias] = cache[canonical]
        return out, cache

    # ------------------------------------------------------------------ tokens

    def to_tokens(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Tokenise text to ``[batch, pos]`` ids (padded with pad id 0 on the right by default).

        Args:
            input: a string or a list of strings.
            prepend_bos: put ``<bos>`` first (default ``cfg.default_prepend_bos``, True, as Gemma does).
            padding_side: side to pad a list of texts of unequal length (default right, whatever
                ``tokenizer.padding_side`` says).
            move_to_device: move the ids to ``cfg.device``.
            truncate: cut to ``cfg.n_ctx`` tokens.
        """
        return self._tokenize(input, prepend_bos, padding_side, move_to_device, truncate)[0]

    def _tokenize(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("HookedT5Gemma2 has no tokenizer: pass token ids, or build it with one.")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        texts = [input] if isinstance(input, str) else list(input)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos:
            ids = [[self.tokenizer.bos_token_id, *x] for x in ids]
        if truncate:
            ids = [x[: self.cfg.n_ctx] for x in ids]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Right, whatever the tokenizer's own padding_side (transformers 5's GemmaTokenizer says
        # "left"): rows then start at position 0, as the position contract and the split assume.
        side = padding_side or "right"
        tokens = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            sl = slice(width - len(x), width) if side == "left" else slice(0, len(x))
            tokens[i, sl] = torch.tensor(x, dtype=torch.long)
            mask[i, sl] = 1
        if move_to_device:
            tokens, mask = tokens.to(self.cfg.device), mask.to(self.cfg.device)
        return tokens, mask

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Decode ids to text (a list for a batch)."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [self.tokenizer.decode(t) for t in tokens.tolist()]
        return self.tokenizer.decode(tokens.tolist())

    def to_str_tokens(self, input: str | torch.Tensor, prepend_bos: bool | None = None) -> list[str]:
        """One string per token of a text or a 1-D id tensor (image placeholders show as ``<img>``)."""
        ids = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else input
        return [self.token_string(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]

    def token_string(self, token_id: int) -> str:
        """The text of one token; an image placeholder is ``sites.IMAGE_TOKEN_LABEL`` (``<img>``)."""
        if token_id == self.image_token_id:
            return sites_mod.IMAGE_TOKEN_LABEL
        return self.tokenizer.decode([token_id])

    def _prepare_inputs(
        self,
        input: str | Sequence[str] | torch.Tensor,
        prepend_bos: bool | None,
        padding_side: Literal["left", "right"] | None,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
    ) -> _Feed:
        if isinstance(input, torch.Tensor):
            tokens = (input if input.ndim == 2 else input.unsqueeze(0)).to(self.cfg.device)
        else:
            tokens, text_mask = self._tokenize(input, prepend_bos, padding_side)
            if attention_mask is None and not bool(text_mask.all()):
                attention_mask = text_mask
        if attention_mask is not None:
            attention_mask = attention_mask.to(tokens.device)
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, the tokens {tuple(tokens.shape)}"
                )
        self.last_prefix_len, self.last_splits = None, None
        image = self._check_images(tokens, pixel_values)
        if decoder_input_ids is not None or labels is not None:
            # Real source/target pairs: transformers' own semantics, no position contract.
            if decoder_input_ids is None:
                decoder_input_ids = self.hf_model.prepare_decoder_input_ids_from_labels(
                    labels.to(tokens.device)
                )
            return _Feed(tokens, tokens, attention_mask, decoder_input_ids.to(tokens.device), labels, None)

        n = tokens.shape[1]
        targets = tokens if attention_mask is None else tokens.masked_fill(attention_mask == 0, -100)
        if image is not None:
            targets = targets.masked_fill(image, -100)  # a placeholder is no text to predict
        no_target = torch.full_like(tokens[:, :1], -100)
        if self.convention == "reconstruct":
            spans = {"encoder": _Span(0, n), "decoder": _Span(0, n)}
            dec_labels = torch.cat([targets[:, 1:], no_target], dim=1)
            dec_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
            return _Feed(tokens, tokens, attention_mask, tokens, dec_labels, spans, dec_mask)
        # The encoder alone reads images: a random split falls after the last image token.
        first = 1 if image is None else max(1, _last_true(image) + 1)
        splits = self.splits(tokens, attention_mask, first)
        if image is not None and bool((splits < first).any()):
            p = int(splits.min())
            raise ValueError(
                f"An image placeholder token sits at position {first - 1}, at or after the prefix_lm "
                f"split p={p}: only the encoder (tokens[:, :p]) reads images, the decoder cannot. "
                f"Put the images before the split: model.prefix_len >= {first} (e.g. "
                f"`with model.fed(prefix_len={first}): ...`)."
            )
        self.last_splits, self._last_width = splits, n
        bos = torch.full_like(tokens[:, :1], self.hf_model.config.decoder.bos_token_id)
        if bool((splits == splits[0]).all()):
            p = int(splits[0])
            self.last_prefix_len = p
            spans = {"encoder": _Span(0, n), "decoder": _Span(p - 1, n)}
            enc_mask = None if attention_mask is None else attention_mask[:, :p]
            dec_ids = torch.cat([bos, tokens[:, p:]], dim=1)
            dec_labels = torch.cat([targets[:, p:], no_target], dim=1)
            dec_mask = None
            if attention_mask is not None and not bool(attention_mask.all()):
                dec_mask = torch.cat([torch.ones_like(bos), attention_mask[:, p:]], dim=1)
            return _Feed(tokens, tokens[:, :p], enc_mask, dec_ids, dec_labels, spans, dec_mask)
        # Rows of different lengths, each split at its own p: the encoder reads tokens[b, :p_b],
        # the decoder [BOS] + tokens[b, p_b:L_b] (left-aligned, padded on the right).
        self.last_prefix_len = None
        lengths = self.row_lengths(tokens, attention_mask)
        width = int(splits.max())
        enc_mask = (torch.arange(width, device=tokens.device) < splits[:, None]).long()
        if attention_mask is not None:
            enc_mask = enc_mask * (attention_mask[:, :width] != 0)
        cont = (lengths - splits).clamp(min=0)
        k = torch.arange(max(int(cont.max()), 1), device=tokens.device)
        idx = (splits[:, None] + k).clamp(max=n - 1)
        valid = k < cont[:, None]
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer is not None and self.tokenizer.pad_token_id is not None
            else 0
        )
        dec_ids = torch.cat([bos, tokens.gather(1, idx).masked_fill(~valid, pad)], dim=1)
        dec_mask = torch.cat([torch.ones_like(bos), valid.long()], dim=1)
        dec_labels = torch.cat([targets.gather(1, idx).masked_fill(~valid, -100), no_target], dim=1)
        spans = {
            "encoder": _Span(0, n, (torch.zeros_like(splits), splits)),
            "decoder": _Span(0, n, (splits - 1, cont + 1)),
        }
        return _Feed(tokens, tokens[:, :width], enc_mask, dec_ids, dec_labels, spans, dec_mask)

    # ------------------------------------------------------------------ forward

    def _active_sites(self) -> dict[str, nn.Module]:
        """Sites whose hook point has hooks, or where an SAE is spliced in: they must be routed."""
        active = {}
        for name in self._sites:
            module = self.mod_dict[name]
            if not isinstance(module, HookPoint) or module.fwd_hooks or module.bwd_hooks:
                active[name] = module
        return active

    @contextmanager
    def _routing(self, active: dict[str, nn.Module], stop_after: str | None = None) -> Iterator[None]:
        """Register PyTorch hooks that send each active site's tensor through its hook module."""
        handles = []
        order = sorted(active, key=lambda n: self._site_key(self._sites[n]))
        try:
            for name in order:
                if self._sites[name].kind.route != "attention":
                    handles += self._route(name, active[name], stop=name == stop_after)
            with self._attention_routing(active, stop_after):
                yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _site_key(s: Site) -> tuple[int, int, int]:
        return _STACK_ORDER[s.stack], s.layer, _KIND_ORDER[s.kind.friendly]

    def _through(
        self, hook_module: nn.Module, x: torch.Tensor, dims: tuple[tuple[int, str], ...]
    ) -> torch.Tensor:
        """Send ``x`` through its hook point in the position contract's shape, and back.

        ``dims`` pairs each position dimension of ``x`` with the stack it indexes. Under a
        convention the tensor is zero-padded to the batch's ``n`` positions for the hook, and the
        stack's own positions are taken back out, so an in-place edit by the hook flows on.
        """
        spans = self._spans
        full = x
        if spans is not None:
            for dim, stack in dims:
                full = _pad(full, dim, spans[stack])
        new = hook_module(full)
        if full is x:
            return new
        for dim, stack in dims:
            new = _take(new, dim, spans[stack], x.shape[dim])  # type: ignore[index]
        return new

    def _route(self, name: str, hook_module: nn.Module, stop: bool) -> list[Any]:
        s = self._sites[name]
        kind, stack = s.kind.friendly, s.stack
        target = self._hf_modules[name]
        pos = ((1, stack),)

        def finish(value: Any) -> Any:
            if stop:
                raise _StopForward
            return value

        route = s.kind.route
        if route == "out":

            def out_hook(_mod: nn.Module, _args: Any, output: torch.Tensor) -> Any:
                new = self._through(hook_module, output, pos)
                return finish(None if new is output else new)

            return [target.register_forward_hook(out_hook)]

        if route in ("in", "heads"):
            n_heads, d_head = self._heads[stack]

            def in_hook(_mod: nn.Module, args: tuple) -> Any:
                x = args[0]
                view = x.view(*x.shape[:-1], n_heads, d_head) if route == "heads" else x
                new = self._through(hook_module, view, pos)
                return finish(None if new is view else (new.reshape(x.shape), *args[1:]))

            return [target.register_forward_pre_hook(in_hook)]

        if route == "layer_in":

            def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                x, args, kwargs = _hidden_states(args, kwargs)
                new = self._through(hook_module, x, pos)
                if new is x:
                    return finish(None)
                return finish(_with_hidden_states(args, kwargs, new))

            return [self._hf_layers[name].register_forward_pre_hook(pre_hook, with_kwargs=True)]

        if route == "resid_mid":
            # The layer adds post_self_attn_layernorm's output to its input (the residual) and
            # hands the sum to the MLP block. Rebuilding that sum here, and returning the hook's
            # change of it as the norm's output, makes a modification reach both the MLP and
            # the residual, while an unmodified run stays bit-exact.
            layer = self._hf_layers[name]
            post_norm = layer.post_self_attn_layernorm
            residual: dict[str, torch.Tensor] = {}

            def capture(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
                residual["x"] = _hidden_states(args, kwargs)[0]

            def mid_hook(_mod: nn.Module, _args: Any, output: torch.Tensor) -> Any:
                res = residual.pop("x")
                mid = res + output
                new = self._through(hook_module, mid, pos)
                return finish(None if new is mid or torch.equal(new, mid) else new - res)

            return [
                layer.register_forward_pre_hook(capture, with_kwargs=True),
                post_norm.register_forward_hook(mid_hook),
            ]
        raise AssertionError(f"unhandled site kind {kind}")

    def _active_vision(self) -> dict[str, nn.Module]:
        """Vision hook points that have hooks attached."""
        active = {}
        for name in self._vision_sites:
            module = self.mod_dict[name]
            if module.fwd_hooks or module.bwd_hooks:
                active[name] = module
        return active

    @contextmanager
    def _vision_routing(self, active: dict[str, nn.Module], stop_after: str | None = None) -> Iterator[None]:
        """Send each hooked vision site's tensor through its hook point (per image: no padding)."""
        handles = []

        def routed(name: str, hook_module: nn.Module) -> Any:
            def through(x: torch.Tensor) -> torch.Tensor:
                new = hook_module(x)
                if name == stop_after:
                    raise _StopForward
                return new

            return through

        try:
            for name, hook_module in active.items():
                target, through = self._vision_modules[name], routed(name, hook_module)
                if self._vision_sites[name].kind.hf_io == "input":

                    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict, through: Any = through) -> Any:
                        x, args, kwargs = _hidden_states(args, kwargs)
                        new = through(x)
                        return None if new is x else _with_hidden_states(args, kwargs, new)

                    handles.append(target.register_forward_pre_hook(pre_hook, with_kwargs=True))
                else:

                    def out_hook(
                        _mod: nn.Module, _args: Any, output: torch.Tensor, through: Any = through
                    ) -> Any:
                        new = through(output)
                        return None if new is output else new

                    handles.append(target.register_forward_hook(out_hook))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _attention_routing(self, active: dict[str, nn.Module], stop_after: str | None) -> Iterator[None]:
        """Route the attention-internal sites (patterns, z_self, z_cross) of each hooked layer."""
        layers: dict[tuple[str, int], dict[str, nn.Module]] = {}
        attns: dict[tuple[str, int], nn.Module] = {}
        for name, module in active.items():
            s = self._sites[name]
            if s.kind.route == "attention":
                layers.setdefault((s.stack, s.layer), {})[s.kind.friendly] = module
                attns[(s.stack, s.layer)] = self._hf_modules[name]
        patched = []
        try:
            for (stack, layer), hooks in layers.items():
                attn = attns[(stack, layer)]
                stop = stop_after is not None and self._sites[stop_after].kind.route == "attention"
                stop = stop and (self._sites[stop_after].stack, self._sites[stop_after].layer) == (
                    stack,
                    layer,
                )
                attn.__dict__["_sae_lens_t5gemma_route"] = self._attention_fn(stack, attn, hooks, stop)
                config = copy.copy(attn.config)
                config._attn_implementation = _SPLIT_ATTENTION
                patched.append((attn, attn.config))
                attn.config = config
            yield
        finally:
            for attn, config in patched:
                attn.config = config
                attn.__dict__.pop("_sae_lens_t5gemma_route", None)

    def _attention_fn(self, stack: str, attn: nn.Module, hooks: dict[str, nn.Module], stop: bool) -> Callable:
        """The eager attention of one layer with its pattern and z parts sent through hook points."""
        from transformers.models.t5gemma2.modeling_t5gemma2 import repeat_kv

        cross = stack == "decoder"

        def run(q, k, v, mask, scaling, softcap):  # noqa: ANN001, ANN202
            k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
            scores = torch.matmul(q, k.transpose(2, 3)) * (
                scaling if scaling is not None else attn.head_dim**-0.5
            )
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            if mask is not None:
                scores = (
                    scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
                )
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            n_self = k.shape[2] - (self._enc_len if cross else 0)
            parts = {"pattern": probs[..., :n_self], "cross_pattern": probs[..., n_self:]}
            keys = {"pattern": stack, "cross_pattern": "encoder"}
            for part in ("pattern", "cross_pattern"):
                if part in hooks:
                    parts[part] = self._through(hooks[part], parts[part], ((2, stack), (3, keys[part])))
            z_self = torch.matmul(parts["pattern"], v[:, :, :n_self]).transpose(1, 2)
            z = z_self
            if cross:
                z_cross = torch.matmul(parts["cross_pattern"], v[:, :, n_self:]).transpose(1, 2)
                if "z_self" in hooks:
                    z_self = self._through(hooks["z_self"], z_self, ((1, stack),))
                if "z_cross" in hooks:
                    z_cross = self._through(hooks["z_cross"], z_cross, ((1, stack),))
                z = z_self + z_cross
            if stop:
                raise _StopForward
            return z.contiguous(), probs

        return run

    def _plan(self, active: dict[str, nn.Module], stop_at_layer: int | None) -> tuple[str | None, str | None]:
        """Decide (last stack to run, deepest site to stop after) for a run without logits."""
        by_stack: dict[str, list[str]] = {"encoder": [], "decoder": []}
        for name in active:
            s = self._sites[name]
            if stop_at_layer is None or s.layer < stop_at_layer:
                by_stack[s.stack].append(name)
        for stack in ("decoder", "encoder"):
            if by_stack[stack]:
                return stack, max(by_stack[stack], key=lambda n: self._site_key(self._sites[n]))
        return None, None

    def forward(
        self,
        input: str | Sequence[str] | torch.Tensor,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        stop_at_layer: int | None = None,
        pixel_values: torch.Tensor | None = None,
        hf_kwargs: dict[str, Any] | None = None,
        **unexpected: Any,
    ) -> Any:
        """Run the model on ``input`` (text or ``[batch, n]`` ids) under ``self.convention``.

        Args:
            input: text, list of texts, or token ids.
            return_type: ``"logits"`` (``[batch, n, d_vocab]`` after the final soft-cap; position
                ``t`` predicts token ``t + 1``), ``"loss"``, ``"both"`` (``(logits, loss)``) or
                ``None`` (hooks only).
            loss_per_token: the loss as ``[batch, n - 1]`` (position ``t``: predicting token
                ``t + 1``; 0 where nothing is predicted) instead of its mean over predicted tokens.
            prepend_bos: for text input only.
            padding_side: for text input only.
            attention_mask: ``[batch, n]`` (1 = real token). The encoder reads its part; targets
                where it is 0 are not scored. Text input is masked by default.
            decoder_input_ids: explicit decoder input (real source/target pairs): the encoder
                reads ``input``, the conventions and the position contract do not apply.
            labels: explicit targets aligned with the decoder input (transformers' layout,
                ``-100`` ignored); alone, the decoder reads them shifted right.
            stop_at_layer: as SAELens passes it (hook layer + 1): run no decoder layer at or past
                it, and no encoder layer past it unless decoder hooks need the whole encoder.
                The output is then ``None``.
            pixel_values: images ``[n_images, 3, H, W]`` as transformers' processor prepares them
                (all images of the batch, in row order); ``input`` must hold
                ``mm_tokens_per_image`` placeholder tokens per image, inside the encoder's part
                (under ``prefix_lm``: before the split). See :meth:`image_token_mask`.
            hf_kwargs: extra keywords for transformers' forward (documented there).

        Returns:
            Logits, loss, both, or ``None``. Without logits/loss (``return_type=None`` or
            ``stop_at_layer`` given) only the layers the attached hooks need are run.

        Raises:
            TypeError: an unknown keyword (transformers' own go in ``hf_kwargs``).
        """
        _refuse_unexpected("forward", unexpected)
        if return_type not in (None, "logits", "loss", "both"):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, not {return_type!r}")
        hf_kwargs = dict(hf_kwargs or {})
        if pixel_values is None:
            pixel_values = hf_kwargs.pop("pixel_values", None)
        feed = self._prepare_inputs(
            input, prepend_bos, padding_side, attention_mask, decoder_input_ids, labels, pixel_values
        )
        if pixel_values is not None:
            hf_kwargs["pixel_values"] = pixel_values.to(self.cfg.device, self.cfg.dtype)
        active = self._active_sites()
        vision = self._active_vision()
        self._spans, self._enc_len = feed.spans, feed.enc_ids.shape[1]
        try:
            if return_type is not None and stop_at_layer is None:
                with self._routing(active), self._vision_routing(vision):
                    out = self.hf_model(
                        input_ids=feed.enc_ids,
                        attention_mask=feed.enc_mask,
                        decoder_input_ids=feed.dec_ids,
                        decoder_attention_mask=feed.dec_mask,
                        use_cache=False,
                        **hf_kwargs,
                    )
                return self._outputs(out.logits, feed, return_type, loss_per_token)
            stack, stop_after = self._plan(active, stop_at_layer)
            vision_stop = None
            if stack is None and vision and pixel_values is not None:
                # Only vision hooks: the tower runs inside the encoder, before its text layers.
                stack = "encoder"
                vision_stop = max(vision, key=lambda n: self._vision_sites[n].order)
            if stack is None:
                return None
            try:
                with self._routing(active, stop_after=stop_after), self._vision_routing(vision, vision_stop):
                    if stack == "encoder":
                        self.hf_model.get_encoder()(
                            input_ids=feed.enc_ids, attention_mask=feed.enc_mask, **hf_kwargs
                        )
                    else:
                        self.hf_model.model(
                            input_ids=feed.enc_ids,
                            attention_mask=feed.enc_mask,
                            decoder_input_ids=feed.dec_ids,
                            decoder_attention_mask=feed.dec_mask,
                            use_cache=False,
                            **hf_kwargs,
                        )
            except _StopForward:
                pass
            return None
        finally:
            self._spans = None

    def _outputs(self, logits: torch.Tensor, feed: _Feed, return_type: str, loss_per_token: bool) -> Any:
        span = None if feed.spans is None else feed.spans["decoder"]
        out_logits = logits if span is None else _pad(logits, 1, span)
        if return_type == "logits":
            return out_logits
        if feed.labels is None:
            raise ValueError("A loss needs labels: pass labels= with decoder_input_ids= (or neither).")
        labels = feed.labels.to(logits.device)
        if not bool((labels != -100).any()):
            raise ValueError(
                "Nothing to predict: every target is masked or the prefix covers the whole row "
                f"(prefix_len={self.prefix_len!r}, n={feed.tokens.shape[1]})."
            )
        if loss_per_token:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(labels.shape)
            if span is not None:
                loss = _pad(loss, 1, span)[:, :-1]
        else:
            # transformers' own loss (ForMaskedLM: no further shift) so the numbers match it exactly.
            loss = self.hf_model.loss_function(logits, labels, self.hf_model.vocab_size)
        return loss if return_type == "loss" else (out_logits, loss)

    @torch.no_grad()
    def generate(
        self,
        input: str | Sequence[str] | torch.Tensor,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        attention_mask: torch.Tensor | None = None,
        prepend_bos: bool | None = None,
        return_type: Literal["input", "str", "tokens"] = "input",
        pixel_values: torch.Tensor | None = None,
        hf_kwargs: dict[str, Any] | None = None,
        **unexpected: Any,
    ) -> str | list[str] | torch.Tensor:
        """transformers' ``generate`` with this model's hooks, spliced SAEs and steering active.

        The encoder reads ``input`` (the whole prompt); the decoder starts from its BOS and
        writes the output, as in T5Gemma 2's real use. Hooks see transformers' shapes here (no
        position contract): encoder ``[batch, prompt]``, decoder one position per step after the
        first (KV cache).

        Args:
            pixel_values: the prompt's images, as for :meth:`forward` (the encoder reads them).
            hf_kwargs: further keywords for transformers' ``generate`` (e.g. ``num_beams``).

        Returns:
            The generated text (for text input, or ``return_type="str"``), else the
            decoder's output ids ``[batch, out_pos]`` (starting with the decoder BOS).
        """
        _refuse_unexpected("generate", unexpected)
        if isinstance(input, torch.Tensor):
            tokens = (input if input.ndim == 2 else input.unsqueeze(0)).to(self.cfg.device)
        else:
            tokens, mask = self._tokenize(input, prepend_bos)
            attention_mask = mask if attention_mask is None else attention_mask
        kwargs = dict(hf_kwargs or {})
        self._check_images(tokens, pixel_values)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(self.cfg.device, self.cfg.dtype)
        kwargs.setdefault("pad_token_id", self.hf_model.config.decoder.pad_token_id)
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        kwargs.update({k: v for k, v in sampling.items() if v is not None})
        self._spans, self._enc_len = None, tokens.shape[1]
        with self._routing(self._active_sites()), self._vision_routing(self._active_vision()):
            out = self.hf_model.generate(
                input_ids=tokens,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                **kwargs,
            )
        as_text = return_type == "str" or (return_type == "input" and not isinstance(input, torch.Tensor))
        if not as_text:
            return out
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return texts[0] if isinstance(input, str) else texts

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        convention: Convention = DEFAULT_CONVENTION,
        prefix_len: int | Literal["random"] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> HookedT5Gemma2:
        """Same as :func:`load_t5gemma2` (``dtype=None``: float32, as TransformerLens)."""
        return load_t5gemma2(name_or_path, device, dtype, convention, prefix_len, **from_pretrained_kwargs)


_SAE_SUFFIXES = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_output",
    "hook_sae_recons",
    "hook_sae_error",
)


def _refuse_unexpected(where: str, unexpected: dict[str, Any]) -> None:
    if unexpected:
        import inspect

        params = [
            p
            for p in inspect.signature(getattr(HookedT5Gemma2, where)).parameters
            if p not in ("self", "unexpected")
        ]
        raise TypeError(
            f"HookedT5Gemma2.{where}() got unexpected keyword(s) {sorted(unexpected)}. Accepted: "
            f"{params}; transformers' own keywords go in hf_kwargs={{...}}."
        )


def _hidden_states(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args, kwargs
    return kwargs["hidden_states"], args, kwargs


def _with_hidden_states(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _last_true(mask: torch.Tensor) -> int:
    """The largest position index where a ``[batch, n]`` mask is True in any row (-1 if none)."""
    cols = mask.any(dim=0).nonzero()
    return int(cols.max()) if cols.numel() else -1


def _tokenizer_prepends_bos(tokenizer: Any) -> bool:
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def load_t5gemma2(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    convention: Convention = DEFAULT_CONVENTION,
    prefix_len: int | Literal["random"] | None = None,
    **from_pretrained_kwargs: Any,
) -> HookedT5Gemma2:
    """Load a T5Gemma 2 checkpoint (hub id or local folder) with its tokenizer, hooked.

    Args:
        name_or_path: e.g. ``google/t5gemma-2-270m-270m`` or a folder saved by ``save_pretrained``.
        device: where to put the model.
        dtype: weight dtype: ``torch.float32``, ``"float32"``, ``"bfloat16"``, ``"float16"``, or
            ``"auto"`` (bfloat16 where ``device`` runs it natively, see
            :func:`sae_lens_t5gemma.model.dtypes.fast_bf16`). ``None`` (the default) means float32,
            unless ``SAE_LENS_T5GEMMA_DTYPE`` says otherwise (see :mod:`sae_lens_t5gemma.model.dtypes`).
        convention: ``"prefix_lm"`` (default) or ``"reconstruct"``; see :class:`HookedT5Gemma2`.
        prefix_len: the ``prefix_lm`` split (None: half of each row).
        **from_pretrained_kwargs: passed to ``T5Gemma2ForConditionalGeneration.from_pretrained``.
    """
    from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration

    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}: expected one of {sorted(CONVENTIONS)}")
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    looks_local = isinstance(name_or_path, Path) or name.startswith(("/", ".", "~"))
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"Model folder {name} does not exist.")
    try:
        hf_model = T5Gemma2ForConditionalGeneration.from_pretrained(
            name, dtype=dtype, **from_pretrained_kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        # transformers raises a bare OSError for a missing repo/file or no network.
        raise FileNotFoundError(f"Could not load T5Gemma 2 model {name!r}: {e}") from e
    return HookedT5Gemma2(hf_model.to(device), tokenizer, name, convention, prefix_len)
