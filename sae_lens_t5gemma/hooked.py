"""``HookedT5Gemma2``: a TransformerLens ``HookedRootModule`` around transformers' T5Gemma 2.

SAELens' ActivationsStore, runners and evals drive a ``HookedRootModule``. This module wraps
a ``T5Gemma2ForConditionalGeneration`` (text path only) so that they can:

- Hook points carry TransformerBridge's names (``encoder_blocks.5.attn.hook_out``,
  ``decoder_blocks.3.self_attn.hook_z``, ...). They are derived from :mod:`sites`, the
  one table of sites; aliases (bridge alternates, transformers module paths in both layouts,
  friendly names) resolve through :func:`sites.resolve` wherever a name is accepted.
- The transformers model is run unchanged. For each hook point that has a hook attached
  (or an SAE spliced in), a PyTorch forward (pre-)hook on the matching transformers module
  routes the tensor through the ``HookPoint``; whatever the hook returns flows on.
- The forward pass runs only what is needed. Without logits or loss asked for, an
  encoder-only run stops right after the deepest hooked site (a private exception raised
  from the hook), and a run with decoder hooks runs the encoder fully, the decoder up to
  its deepest hooked site, and never the 262k-vocab LM head.

Input convention (the one transformers' own T5Gemma 2 classification heads use): for a
token batch ``[batch, pos]`` the encoder sees the tokens as given, the decoder sees
``prepare_decoder_input_ids_from_labels(tokens)`` (shifted right behind the decoder's BOS)
and the loss is the seq2seq cross-entropy on ``labels=tokens``. Decoder position ``t``
therefore predicts token ``t`` having read tokens ``< t``, while the encoder has already
seen every token: CE/KL numbers measure how well the model reproduces its input, not free
language modelling. Encoder and decoder activations have the batch's length, which
SAELens' token masks assume. Token tensors get no attention mask unless one is passed
(exactly ``model(input_ids=tokens, labels=tokens)``); text input is tokenised with padding
and its padding is masked (labels ``-100`` there).
"""

from __future__ import annotations

import logging
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

from sae_lens_t5gemma import sites as sites_mod
from sae_lens_t5gemma.sites import Site
from sae_lens_t5gemma.steering import SAEMixin

logger = logging.getLogger(__name__)

ReturnType = Literal["logits", "loss", "both"] | None
_KIND_ORDER = {k.friendly: i for i, k in enumerate(sites_mod.SITE_KINDS)}
_STACK_ORDER = {s: i for i, s in enumerate(sites_mod.STACKS)}


class _StopForward(Exception):
    """Raised from a hook once the deepest needed site has fired; caught in ``forward``."""


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


class T5Gemma2ActivationCache(ActivationCache):
    """An ``ActivationCache`` whose keys can be any spelling of a site (aliases resolve)."""

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, str) and key not in self.cache_dict:
            try:
                canonical = sites_mod.resolve(key).hook_name
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
            return sites_mod.resolve(str(key)).hook_name in self.cache_dict
        except ValueError:
            return False


class HookedT5Gemma2(SAEMixin, HookedRootModule):
    """T5Gemma 2 (text path) with TransformerBridge-named hook points that SAELens can drive.

    Args:
        hf_model: a ``T5Gemma2ForConditionalGeneration`` (any dtype/device; it is put in eval mode).
        tokenizer: its tokenizer (Gemma's: pad 0, eos 1, bos 2, prepends ``<bos>``).
        model_name: name shown in ``cfg.model_name``; defaults to the model's ``name_or_path``.
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, model_name: str | None = None):
        super().__init__()
        config = getattr(hf_model, "config", None)
        if not hasattr(getattr(config, "encoder", None), "text_config") or not hasattr(hf_model, "lm_head"):
            raise ValueError(
                f"HookedT5Gemma2 wraps a transformers T5Gemma2ForConditionalGeneration, not {type(hf_model).__name__}."
            )
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
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
                    child = nn.ModuleList(_Container() for _ in range(self._n_layers[stack]))
                else:
                    child = _Container()
                parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], HookPoint())

    def _find_hf_module(self, s: Site) -> nn.Module:
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
            return out, T5Gemma2ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
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
            padding_side: side to pad a list of texts of unequal length.
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
        side = padding_side or getattr(self.tokenizer, "padding_side", "right")
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
        """One string per token of a text or a 1-D id tensor."""
        ids = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else input
        return [self.tokenizer.decode([i]) for i in torch.as_tensor(ids).reshape(-1).tolist()]

    def _prepare_inputs(
        self,
        input: str | Sequence[str] | torch.Tensor,
        prepend_bos: bool | None,
        padding_side: Literal["left", "right"] | None,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if isinstance(input, torch.Tensor):
            tokens = input if input.ndim == 2 else input.unsqueeze(0)
            tokens = tokens.to(self.cfg.device)
        else:
            tokens, text_mask = self._tokenize(input, prepend_bos, padding_side)
            if attention_mask is None and not bool(text_mask.all()):
                attention_mask = text_mask
                if labels is None and decoder_input_ids is None:
                    labels = tokens.masked_fill(text_mask == 0, -100)
        if labels is None and decoder_input_ids is None:
            labels = tokens
        if decoder_input_ids is None and labels is not None:
            decoder_input_ids = self.hf_model.prepare_decoder_input_ids_from_labels(labels.to(tokens.device))
        return tokens, attention_mask, decoder_input_ids, labels

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
                handles += self._route(name, active[name], stop=name == stop_after)
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _site_key(s: Site) -> tuple[int, int, int]:
        return _STACK_ORDER[s.stack], s.layer, _KIND_ORDER[s.kind.friendly]

    def _route(self, name: str, hook_module: nn.Module, stop: bool) -> list[Any]:
        s = self._sites[name]
        kind = s.kind.friendly
        target = self._hf_modules[name]

        def finish(value: Any) -> Any:
            if stop:
                raise _StopForward
            return value

        if kind in ("attn_out", "mlp_out", "resid_post"):

            def out_hook(_mod: nn.Module, _args: Any, output: torch.Tensor) -> Any:
                new = hook_module(output)
                return finish(None if new is output else new)

            return [target.register_forward_hook(out_hook)]

        if kind == "attn_z":
            n_heads, d_head = self._heads[s.stack]

            def z_hook(_mod: nn.Module, args: tuple) -> Any:
                x = args[0]
                z = x.view(*x.shape[:-1], n_heads, d_head)
                new = hook_module(z)
                return finish(None if new is z else (new.reshape(x.shape), *args[1:]))

            return [target.register_forward_pre_hook(z_hook)]

        if kind == "resid_pre":

            def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                x, args, kwargs = _hidden_states(args, kwargs)
                new = hook_module(x)
                if new is x:
                    return finish(None)
                return finish(_with_hidden_states(args, kwargs, new))

            return [self._hf_layers[name].register_forward_pre_hook(pre_hook, with_kwargs=True)]

        if kind == "resid_mid":
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
                new = hook_module(mid)
                return finish(None if new is mid else new - res)

            return [
                layer.register_forward_pre_hook(capture, with_kwargs=True),
                post_norm.register_forward_hook(mid_hook),
            ]
        raise AssertionError(f"unhandled site kind {kind}")

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
        **hf_kwargs: Any,
    ) -> Any:
        """Run the model on ``input`` (text or ``[batch, pos]`` ids) under the input convention.

        Args:
            input: text, list of texts, or token ids.
            return_type: ``"logits"`` (``[batch, dec_pos, d_vocab]``, after the final soft-cap),
                ``"loss"``, ``"both"`` (``(logits, loss)``) or ``None`` (hooks only).
            loss_per_token: return the loss as ``[batch, pos]`` (0 where labels are -100)
                instead of its mean over labelled tokens. Position ``t`` is the loss of
                predicting token ``t`` (decoder input: tokens ``< t`` behind BOS), so the
                shape equals the token batch's and SAELens' ``[batch, pos]`` masks apply as is.
            prepend_bos: for text input only.
            padding_side: for text input only.
            attention_mask: encoder attention mask ``[batch, pos]`` (1 = attend); default none.
            decoder_input_ids: override the decoder input (default: ``tokens`` shifted right).
            labels: override the targets (default: ``tokens``); ``-100`` is ignored.
            stop_at_layer: as SAELens passes it (hook layer + 1): run no decoder layer at or past
                it, and no encoder layer past it unless decoder hooks need the whole encoder.
                The output is then ``None``.
            **hf_kwargs: passed to the transformers forward.

        Returns:
            Logits, loss, both, or ``None``. Without logits/loss (``return_type=None`` or
            ``stop_at_layer`` given) only the layers the attached hooks need are run.
        """
        tokens, attention_mask, decoder_input_ids, labels = self._prepare_inputs(
            input, prepend_bos, padding_side, attention_mask, decoder_input_ids, labels
        )
        active = self._active_sites()
        if return_type is not None and stop_at_layer is None:
            with self._routing(active):
                out = self.hf_model(
                    input_ids=tokens,
                    attention_mask=attention_mask,
                    decoder_input_ids=decoder_input_ids,
                    use_cache=False,
                    **hf_kwargs,
                )
            return self._outputs(out.logits, labels, return_type, loss_per_token)
        if return_type not in (None, "logits", "loss", "both"):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, not {return_type!r}")

        stack, stop_after = self._plan(active, stop_at_layer)
        if stack is None:
            return None
        try:
            with self._routing(active, stop_after=stop_after):
                if stack == "encoder":
                    self.hf_model.get_encoder()(input_ids=tokens, attention_mask=attention_mask, **hf_kwargs)
                else:
                    self.hf_model.model(
                        input_ids=tokens,
                        attention_mask=attention_mask,
                        decoder_input_ids=decoder_input_ids,
                        use_cache=False,
                        **hf_kwargs,
                    )
        except _StopForward:
            pass
        return None

    def _outputs(
        self, logits: torch.Tensor, labels: torch.Tensor | None, return_type: str, loss_per_token: bool
    ) -> Any:
        if return_type == "logits":
            return logits
        if labels is None:
            raise ValueError(
                "A loss needs labels: pass labels= together with decoder_input_ids= (or neither, "
                "to use labels=tokens)."
            )
        labels = labels.to(logits.device)
        if loss_per_token:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(labels.shape)
        else:
            # transformers' own loss (ForMaskedLM: no further shift) so the numbers match it exactly.
            loss = self.hf_model.loss_function(logits, labels, self.hf_model.vocab_size)
        if return_type == "loss":
            return loss
        if return_type == "both":
            return logits, loss
        raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, not {return_type!r}")

    @torch.no_grad()
    def generate(
        self,
        input: str | Sequence[str] | torch.Tensor,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        attention_mask: torch.Tensor | None = None,
        prepend_bos: bool | None = None,
        return_type: Literal["input", "str", "tokens"] = "input",
        **generate_kwargs: Any,
    ) -> str | list[str] | torch.Tensor:
        """transformers' ``generate`` with this model's hooks, spliced SAEs and steering active.

        The encoder reads ``input``; the decoder starts from its BOS and writes the output.
        Hooks on decoder sites see one position per step after the first (KV cache).

        Returns:
            The generated text (for text input, or ``return_type="str"``), else the
            decoder's output ids ``[batch, out_pos]`` (starting with the decoder BOS).
        """
        if isinstance(input, torch.Tensor):
            tokens = (input if input.ndim == 2 else input.unsqueeze(0)).to(self.cfg.device)
        else:
            tokens, mask = self._tokenize(input, prepend_bos)
            attention_mask = mask if attention_mask is None else attention_mask
        generate_kwargs.setdefault("pad_token_id", self.hf_model.config.decoder.pad_token_id)
        with self._routing(self._active_sites()):
            out = self.hf_model.generate(
                input_ids=tokens,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                **generate_kwargs,
            )
        as_text = return_type == "str" or (return_type == "input" and not isinstance(input, torch.Tensor))
        if not as_text:
            return out
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return texts[0] if isinstance(input, str) else texts


_SAE_SUFFIXES = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_output",
    "hook_sae_recons",
    "hook_sae_error",
)


def _hidden_states(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args, kwargs
    return kwargs["hidden_states"], args, kwargs


def _with_hidden_states(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _tokenizer_prepends_bos(tokenizer: Any) -> bool:
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def load_t5gemma2(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **from_pretrained_kwargs: Any,
) -> HookedT5Gemma2:
    """Load a T5Gemma 2 checkpoint (hub id or local folder) with its tokenizer, hooked.

    Args:
        name_or_path: e.g. ``google/t5gemma-2-270m-270m`` or a folder saved by ``save_pretrained``.
        device: where to put the model.
        dtype: weight dtype.
        **from_pretrained_kwargs: passed to ``T5Gemma2ForConditionalGeneration.from_pretrained``.
    """
    from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration

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
    return HookedT5Gemma2(hf_model.to(device), tokenizer, model_name=name)
