"""Routing of hooked sites to transformers' modules, as a table of small handlers.

The transformers model runs unchanged. For each site whose hook point has hooks attached (or
an SAE spliced in), a PyTorch forward (pre-)hook on the matching transformers module sends the
tensor through the ``HookPoint``; whatever the hook returns flows on. How a site is reached is
data: :attr:`SiteKind.route <sae_lens_t5gemma.model.sites.SiteKind.route>` names one handler
in :data:`ROUTES` (``out``, ``in``, ``heads``, ``layer_in``, ``resid_mid``), as TransformerLens'
bridge adapter keeps a model as a table and its special cases as small classes. The
``attention`` route is the one exception: the pattern and z parts of one layer's merged
attention are computed together, inside the softmax, by :meth:`Router._attention_fn`.

Hooks see activations in the position contract's shape (:mod:`~sae_lens_t5gemma.model.conventions`):
:meth:`Router.through` pads a stack's positions to the batch's ``n`` and takes them back out.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_t5gemma import _compat
from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.conventions import _pad, _Span, _take
from sae_lens_t5gemma.model.sites import Site, VisionSite

_KIND_ORDER = {k.friendly: i for i, k in enumerate(sites_mod.SITE_KINDS)}
_STACK_ORDER = {s: i for i, s in enumerate(sites_mod.STACKS)}
ATTENTION_ROUTE = "attention"
"""The route of the attention-internal sites (patterns, z_self, z_cross): one per layer."""


class _StopForward(Exception):
    """Raised from a hook once the deepest needed site has fired; caught in ``forward``."""


def find_hf_module(hf_model: nn.Module, s: Site | VisionSite) -> nn.Module:
    """The transformers module a site reads, in today's layout or the older one.

    Raises:
        ValueError: neither path exists in ``hf_model``.
    """
    for path in (s.hf_module, s.hf_module_legacy):
        try:
            return hf_model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(
        f"Hook site {s.hook_name}: neither {s.hf_module!r} nor {s.hf_module_legacy!r} exists in "
        f"the wrapped {type(hf_model).__name__}."
    )


def _hidden_states(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args, kwargs
    return kwargs["hidden_states"], args, kwargs


def _with_hidden_states(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


# ------------------------------------------------------------------ the route table


@dataclass(frozen=True)
class RoutedSite:
    """What a route handler gets for one hooked site."""

    target: nn.Module
    """The site's transformers module (``Site.hf_module``)."""
    layer: nn.Module
    """The transformers layer the site sits in."""
    heads: tuple[int, int]
    """``(n_heads, d_head)`` of the site's stack."""
    send: Callable[[torch.Tensor], torch.Tensor]
    """Through the hook point in the position contract's shape, and back (:meth:`Router.through`)."""
    finish: Callable[[Any], Any]
    """Wraps what the PyTorch hook returns; raises ``_StopForward`` after the deepest site."""


RouteHandler = Callable[[RoutedSite], list[Any]]
"""Registers the PyTorch hooks of one site; returns their handles."""


def _route_out(r: RoutedSite) -> list[Any]:
    """The module's output (forward hook)."""

    def out_hook(_mod: nn.Module, _args: Any, output: torch.Tensor) -> Any:
        new = r.send(output)
        return r.finish(None if new is output else new)

    return [r.target.register_forward_hook(out_hook)]


def _route_in(r: RoutedSite) -> list[Any]:
    """The module's first input (forward pre-hook)."""

    def in_hook(_mod: nn.Module, args: tuple) -> Any:
        x = args[0]
        new = r.send(x)
        return r.finish(None if new is x else (new.reshape(x.shape), *args[1:]))

    return [r.target.register_forward_pre_hook(in_hook)]


def _route_heads(r: RoutedSite) -> list[Any]:
    """The module's first input viewed as ``[..., n_heads, d_head]`` (o_proj's input: hook_z)."""
    n_heads, d_head = r.heads

    def in_hook(_mod: nn.Module, args: tuple) -> Any:
        x = args[0]
        view = x.view(*x.shape[:-1], n_heads, d_head)
        new = r.send(view)
        return r.finish(None if new is view else (new.reshape(x.shape), *args[1:]))

    return [r.target.register_forward_pre_hook(in_hook)]


def _route_layer_in(r: RoutedSite) -> list[Any]:
    """The layer's ``hidden_states`` input, positional or keyword."""

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        x, args, kwargs = _hidden_states(args, kwargs)
        new = r.send(x)
        if new is x:
            return r.finish(None)
        return r.finish(_with_hidden_states(args, kwargs, new))

    return [r.layer.register_forward_pre_hook(pre_hook, with_kwargs=True)]


def _route_resid_mid(r: RoutedSite) -> list[Any]:
    """The residual stream between the attention and MLP blocks, which no module outputs.

    The layer adds post_self_attn_layernorm's output to its input (the residual) and hands the
    sum to the MLP block. Rebuilding that sum here, and returning the hook's change of it as
    the norm's output, makes a modification reach both the MLP and the residual, while an
    unmodified run stays bit-exact.
    """
    residual: dict[str, torch.Tensor] = {}

    def capture(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        residual["x"] = _hidden_states(args, kwargs)[0]

    def mid_hook(_mod: nn.Module, _args: Any, output: torch.Tensor) -> Any:
        res = residual.pop("x")
        mid = res + output
        new = r.send(mid)
        return r.finish(None if new is mid or torch.equal(new, mid) else new - res)

    return [
        r.layer.register_forward_pre_hook(capture, with_kwargs=True),
        r.layer.post_self_attn_layernorm.register_forward_hook(mid_hook),
    ]


ROUTES: dict[str, RouteHandler] = {
    "out": _route_out,
    "in": _route_in,
    "heads": _route_heads,
    "layer_in": _route_layer_in,
    "resid_mid": _route_resid_mid,
}
"""``SiteKind.route`` -> its handler (every route but :data:`ATTENTION_ROUTE`)."""

_unrouted = {k.route for k in sites_mod.SITE_KINDS} - set(ROUTES) - {ATTENTION_ROUTE}
assert not _unrouted, f"site kinds with no route handler: {_unrouted}"


# ------------------------------------------------------------------ the merged attention

# The decoder's merged attention keeps z = softmax([q k_dec | q k_enc]) @ [v_dec | v_enc] inside
# one transformers call. To hook its self and cross parts (and the patterns), a routed
# attention module gets a private config copy naming this attention function (registered with
# transformers on first use, :func:`sae_lens_t5gemma._compat.register_attention`), which
# computes the same softmax eagerly and sends each part through its hook point.
SPLIT_ATTENTION = "sae_lens_t5gemma_split"
_ROUTE_ATTR = "_sae_lens_t5gemma_route"


def _split_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     softcap: float | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return module.__dict__[_ROUTE_ATTR](query, key, value, attention_mask, scaling, softcap)


# ------------------------------------------------------------------ the router


class Router:
    """Routes the hooked sites of one wrapped T5Gemma 2 to its transformers modules.

    Args:
        hf_model: the wrapped ``T5Gemma2ForConditionalGeneration``.
        sites: canonical hook name -> text site (the model's hook-point table).
        vision_sites: canonical hook name -> vision site (empty without a vision tower).
        heads: stack -> ``(n_heads, d_head)``.

    ``spans`` and ``enc_len`` describe the forward in progress (set by the model around it).
    """

    def __init__(self, hf_model: nn.Module, sites: Mapping[str, Site], vision_sites: Mapping[str, VisionSite],
                 heads: Mapping[str, tuple[int, int]]) -> None:  # fmt: skip
        self.sites = sites
        self.vision_sites = vision_sites
        self.heads = heads
        self.hf_modules = {name: find_hf_module(hf_model, s) for name, s in sites.items()}
        self.hf_layers = {
            name: find_hf_module(hf_model, sites_mod.site(s.stack, s.layer, "resid_pre"))
            for name, s in sites.items()
        }
        self.vision_modules = {name: find_hf_module(hf_model, vs) for name, vs in vision_sites.items()}
        self.spans: dict[str, _Span] | None = None
        """Per stack, where its positions sit in the batch; None outside a convention's forward."""
        self.enc_len = 0
        """The number of encoder positions of the forward in progress (the merged softmax's split)."""

    @staticmethod
    def site_key(s: Site) -> tuple[int, int, int]:
        """Where a site is computed: encoder before decoder, by layer, then by kind."""
        return _STACK_ORDER[s.stack], s.layer, _KIND_ORDER[s.kind.friendly]

    def active_sites(self, hook_modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """Sites whose hook point has hooks, or where an SAE is spliced in: they must be routed."""
        active = {}
        for name in self.sites:
            module = hook_modules[name]
            if not isinstance(module, HookPoint) or module.fwd_hooks or module.bwd_hooks:
                active[name] = module
        return active

    def active_vision(self, hook_modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """Vision hook points that have hooks attached."""
        active = {}
        for name in self.vision_sites:
            module = hook_modules[name]
            if module.fwd_hooks or module.bwd_hooks:
                active[name] = module
        return active

    def plan(
        self, active: Mapping[str, nn.Module], stop_at_layer: int | None
    ) -> tuple[str | None, str | None]:
        """Decide (last stack to run, deepest site to stop after) for a run without logits."""
        by_stack: dict[str, list[str]] = {"encoder": [], "decoder": []}
        for name in active:
            s = self.sites[name]
            if stop_at_layer is None or s.layer < stop_at_layer:
                by_stack[s.stack].append(name)
        for stack in ("decoder", "encoder"):
            if by_stack[stack]:
                return stack, max(by_stack[stack], key=lambda n: self.site_key(self.sites[n]))
        return None, None

    def through(
        self, hook_module: nn.Module, x: torch.Tensor, dims: tuple[tuple[int, str], ...]
    ) -> torch.Tensor:
        """Send ``x`` through its hook point in the position contract's shape, and back.

        ``dims`` pairs each position dimension of ``x`` with the stack it indexes. Under a
        convention the tensor is zero-padded to the batch's ``n`` positions for the hook, and the
        stack's own positions are taken back out, so an in-place edit by the hook flows on.
        """
        spans = self.spans
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

    @contextmanager
    def routing(self, active: Mapping[str, nn.Module], stop_after: str | None = None) -> Iterator[None]:
        """Register PyTorch hooks that send each active site's tensor through its hook module."""
        handles = []
        order = sorted(active, key=lambda n: self.site_key(self.sites[n]))
        try:
            for name in order:
                if self.sites[name].kind.route != ATTENTION_ROUTE:
                    handles += self._route(name, active[name], stop=name == stop_after)
            with self._attention_routing(active, stop_after):
                yield
        finally:
            for h in handles:
                h.remove()

    def _route(self, name: str, hook_module: nn.Module, stop: bool) -> list[Any]:
        s = self.sites[name]
        pos = ((1, s.stack),)

        def finish(value: Any) -> Any:
            if stop:
                raise _StopForward
            return value

        routed = RoutedSite(
            target=self.hf_modules[name],
            layer=self.hf_layers[name],
            heads=self.heads[s.stack],
            send=lambda x: self.through(hook_module, x, pos),
            finish=finish,
        )
        return ROUTES[s.kind.route](routed)

    @contextmanager
    def vision_routing(
        self, active: Mapping[str, nn.Module], stop_after: str | None = None
    ) -> Iterator[None]:
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
                target, through = self.vision_modules[name], routed(name, hook_module)
                if self.vision_sites[name].kind.hf_io == "input":

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
    def _attention_routing(self, active: Mapping[str, nn.Module], stop_after: str | None) -> Iterator[None]:
        """Route the attention-internal sites (patterns, z_self, z_cross) of each hooked layer."""
        layers: dict[tuple[str, int], dict[str, nn.Module]] = {}
        attns: dict[tuple[str, int], nn.Module] = {}
        for name, module in active.items():
            s = self.sites[name]
            if s.kind.route == ATTENTION_ROUTE:
                layers.setdefault((s.stack, s.layer), {})[s.kind.friendly] = module
                attns[(s.stack, s.layer)] = self.hf_modules[name]
        if layers:
            _compat.register_attention(SPLIT_ATTENTION, _split_attention)
        patched = []
        try:
            for (stack, layer), hooks in layers.items():
                attn = attns[(stack, layer)]
                stop = stop_after is not None and self.sites[stop_after].kind.route == ATTENTION_ROUTE
                stop = stop and (self.sites[stop_after].stack, self.sites[stop_after].layer) == (stack, layer)
                attn.__dict__[_ROUTE_ATTR] = self._attention_fn(stack, attn, hooks, stop)
                config = copy.copy(attn.config)
                config._attn_implementation = SPLIT_ATTENTION
                patched.append((attn, attn.config))
                attn.config = config
            yield
        finally:
            for attn, config in patched:
                attn.config = config
                attn.__dict__.pop(_ROUTE_ATTR, None)

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
            n_self = k.shape[2] - (self.enc_len if cross else 0)
            parts = {"pattern": probs[..., :n_self], "cross_pattern": probs[..., n_self:]}
            keys = {"pattern": stack, "cross_pattern": "encoder"}
            for part in ("pattern", "cross_pattern"):
                if part in hooks:
                    parts[part] = self.through(hooks[part], parts[part], ((2, stack), (3, keys[part])))
            z_self = torch.matmul(parts["pattern"], v[:, :, :n_self]).transpose(1, 2)
            z = z_self
            if cross:
                z_cross = torch.matmul(parts["cross_pattern"], v[:, :, n_self:]).transpose(1, 2)
                if "z_self" in hooks:
                    z_self = self.through(hooks["z_self"], z_self, ((1, stack),))
                if "z_cross" in hooks:
                    z_cross = self.through(hooks["z_cross"], z_cross, ((1, stack),))
                z = z_self + z_cross
            if stop:
                raise _StopForward
            return z.contiguous(), probs

        return run
