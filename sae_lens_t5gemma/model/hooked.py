"""``HookedT5Gemma2``: a TransformerLens ``HookedRootModule`` around transformers' T5Gemma 2.

SAELens' ActivationsStore, runners and evals drive a ``HookedRootModule``. This module wraps
a ``T5Gemma2ForConditionalGeneration`` so that they can:

- Hook points carry TransformerBridge's names (``encoder_blocks.5.attn.hook_out``,
  ``decoder_blocks.3.self_attn.hook_z``, ...). They are derived from :mod:`sites`, the
  one table of sites; aliases (bridge alternates, transformers module paths in both layouts,
  friendly names) resolve through :func:`sites.resolve` wherever a name is accepted.
- The transformers model is run unchanged: :mod:`~sae_lens_t5gemma.model.routing` sends the
  tensor of each hooked site through its ``HookPoint`` with PyTorch hooks.
- A token batch is fed under a convention (``prefix_lm`` by default, or ``reconstruct``), and
  hooked activations follow HookedTransformer's position contract; both are described in
  :mod:`~sae_lens_t5gemma.model.conventions`. Caches are
  :class:`~sae_lens_t5gemma.model.cache.T5Gemma2ActivationCache`.
- SAEs splice in as under SAELens' ``HookedSAETransformer``
  (:mod:`~sae_lens_t5gemma.model.splicing`), and ``model.steer`` edits SAE features
  (:mod:`~sae_lens_t5gemma.model.steering`).
- Images (``pixel_values=``, as transformers' processor prepares them) go to the encoder's
  SigLIP tower. Its hook points (``vision_blocks.N.hook_resid_post``, ``hook_mm_proj_out``,
  ... from :data:`sites.VISION_SITE_KINDS`) are per image, outside the position contract;
  :meth:`HookedT5Gemma2.image_token_mask` marks where the image tokens sit.
- The forward pass runs only what is needed. Without logits or loss asked for, an
  encoder-only run stops right after the deepest hooked site (a private exception raised
  from the hook), and a run with decoder hooks runs the encoder fully, the decoder up to
  its deepest hooked site, and never the 262k-vocab LM head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.cache import T5Gemma2ActivationCache
from sae_lens_t5gemma.model.conventions import (
    CONVENTIONS,
    DEFAULT_CONVENTION,
    Convention,
    ConventionMixin,
    _tokenizer_prepends_bos,
    mask_on_batch,
)
from sae_lens_t5gemma.model.dtypes import resolve_dtype
from sae_lens_t5gemma.model.routing import Router, _StopForward
from sae_lens_t5gemma.model.sites import Site
from sae_lens_t5gemma.model.sizes import check_text_config
from sae_lens_t5gemma.model.splicing import SAEMixin

logger = logging.getLogger(__name__)

ReturnType = Literal["logits", "loss", "both"] | None


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


class HookedT5Gemma2(SAEMixin, ConventionMixin, HookedRootModule):
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
        self._init_conventions(convention, prefix_len)
        enc_text = config.encoder.text_config
        dec = config.decoder
        self._n_layers = {"encoder": enc_text.num_hidden_layers, "decoder": dec.num_hidden_layers}
        heads = {
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
        # Vision-tower hook points: per image, outside the text position contract (sites.py).
        self._vision_sites: dict[str, sites_mod.VisionSite] = {}
        self._n_vision_layers = 0
        vision_config = getattr(config.encoder, "vision_config", None)
        if vision_config is not None and _has_module(hf_model, sites_mod.HF_VISION):
            self._n_vision_layers = vision_config.num_hidden_layers
            for vs in sites_mod.vision_sites(self._n_vision_layers):
                self._vision_sites[vs.hook_name] = vs
                self._add_hook_point(vs.hook_name)
        self._router = Router(hf_model, self._sites, self._vision_sites, heads)
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

    @property
    def image_token_id(self) -> int | None:
        """The id of the image placeholder token (``config.image_token_id``); None without a vision tower."""
        return self.hf_model.config.image_token_id if self._vision_sites else None

    def site(self, name: str) -> Site:
        """The text site a hook name (any spelling) names, e.g. ``model.site("encoder.5.attn_out").stack``.

        Raises:
            ValueError: unknown name, layer out of range, or a vision-tower site.
        """
        canonical = self.canonical_name(name)
        if canonical not in self._sites:
            raise ValueError(f"Hook {name!r} ({canonical}) is not a text site of this model.")
        return self._sites[canonical]

    def hf_layer(self, name: str) -> nn.Module:
        """The transformers layer that holds the text site ``name`` (any spelling)."""
        return self._router.hf_layers[self.site(name).hook_name]

    def batch_token_mask(self, mask: torch.Tensor, stack: str) -> torch.Tensor:
        """A ``[batch, m]`` mask over the ids ``stack`` reads, laid out on the batch's positions.

        During a forward under a convention the stack's ``m`` positions sit at an offset in the
        batch's ``n`` (:mod:`~sae_lens_t5gemma.model.conventions`); the other positions are True.
        Elsewhere (``generate``, explicit decoder inputs, outside a forward) ``mask`` is returned as is.
        """
        spans = self._router.spans
        return mask if spans is None else mask_on_batch(mask, spans[stack])

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
            covered, split = ({}, "") if remove_batch_dim else self._last_covered()
            return out, T5Gemma2ActivationCache(cache, self, not remove_batch_dim, covered, split)
        for alias, canonical in aliases.items():
            if canonical in cache:
                cache[alias] = cache[canonical]
        return out, cache

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
        router = self._router
        active, vision = router.active_sites(self.mod_dict), router.active_vision(self.mod_dict)
        router.spans, router.enc_len = feed.spans, feed.enc_ids.shape[1]
        try:
            if return_type is not None and stop_at_layer is None:
                with router.routing(active), router.vision_routing(vision):
                    out = self.hf_model(
                        input_ids=feed.enc_ids,
                        attention_mask=feed.enc_mask,
                        decoder_input_ids=feed.dec_ids,
                        decoder_attention_mask=feed.dec_mask,
                        use_cache=False,
                        **hf_kwargs,
                    )
                return self._outputs(out.logits, feed, return_type, loss_per_token)
            stack, stop_after = router.plan(active, stop_at_layer)
            vision_stop = None
            if stack is None and vision and pixel_values is not None:
                # Only vision hooks: the tower runs inside the encoder, before its text layers.
                stack = "encoder"
                vision_stop = max(vision, key=lambda n: self._vision_sites[n].order)
            if stack is None:
                return None
            try:
                with router.routing(active, stop_after), router.vision_routing(vision, vision_stop):
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
            router.spans = None

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
        router = self._router
        router.spans, router.enc_len = None, tokens.shape[1]
        with (
            router.routing(router.active_sites(self.mod_dict)),
            router.vision_routing(router.active_vision(self.mod_dict)),
        ):
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


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


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
