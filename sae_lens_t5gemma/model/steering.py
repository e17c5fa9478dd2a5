"""SAE splicing, feature steering and top-feature reading for ``HookedT5Gemma2``.

Splicing mirrors SAELens' ``HookedSAETransformer`` (same method names, same wrapper, so the
same ``<hook>.hook_sae_acts_post``-style cache names): an SAE replaces the hook point at its
``cfg.metadata.hook_name``, with or without the error term.

Steering does not splice. It adds a hook at the SAE's site that encodes the activation,
edits chosen features (scale, set, add, ablate) and adds to the activation only the change
this makes to the decoded vector, ``delta = (f' - f) @ W_dec``. The SAE's reconstruction
error is kept, so a no-op edit leaves the model exactly unchanged. Unlike the mindchain
card's ``SteeringHook`` it never replaces the activation with the reconstruction and reads
no globals. It works on encoder and decoder sites, in ``forward``/``run_with_cache`` and
during ``generate()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import SAE, logger

# SAELens' own wrapper (error term, hook points, token masks), reused so that spliced SAEs
# behave and cache exactly as under HookedSAETransformer.
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper
from transformer_lens.hook_points import HookPoint

from sae_lens_t5gemma.model.dtypes import to_model, to_sae

if TYPE_CHECKING:
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2


def _site_width(model: HookedT5Gemma2, hook_name: str) -> int:
    s = model._sites[hook_name]
    if s.kind.friendly in ("attn_z", "z_self", "z_cross"):
        n_heads, d_head = model._heads[s.stack]
        return n_heads * d_head
    if s.kind.friendly == "mlp_post":
        return model.cfg.d_mlp
    if s.kind.route == "attention":
        raise ValueError(f"{hook_name} holds attention probabilities, not an activation an SAE reads.")
    return model.cfg.d_model


def _fit(model: HookedT5Gemma2, name: str, width: int, what: str) -> str:
    canonical = model.canonical_name(name)
    if canonical in model._vision_sites:
        raise ValueError(
            f"Hook {canonical} (from {name!r}) is a vision-tower site: its activations are per image patch, "
            "not per token, so SAEs cannot be spliced or steered there. Read it with run_with_cache, or "
            "train on it with sae_lens_t5gemma.analysis.images.harvest / train_sae."
        )
    site_width = _site_width(model, canonical)
    if width != site_width:
        raise ValueError(
            f"SAE {what}={width} does not fit hook {canonical} (from {name!r}), "
            f"whose activations are {site_width} wide."
        )
    return canonical


def check_sae_fits(model: HookedT5Gemma2, sae: SAE[Any]) -> str:
    """The canonical hook name of ``sae`` on ``model``; errors if it has none or ``d_in`` does not fit.

    For steering and reading features: transcoders are refused here (:meth:`SAEMixin.add_sae`
    splices them).

    Raises:
        ValueError: no ``hook_name``, unknown hook, a transcoder, or ``d_in`` != the site's width.
    """
    name_in, name_out = splice_sites(model, sae)
    if name_in != name_out:
        raise ValueError(
            f"SAE reads {name_in} and writes {name_out}: a transcoder; splice it with add_sae instead."
        )
    return name_in


def splice_sites(model: HookedT5Gemma2, sae: SAE[Any]) -> tuple[str, str]:
    """The canonical (input, output) hook names of an SAE or transcoder, checked against ``model``.

    An SAE reads and writes at ``cfg.metadata.hook_name``; a transcoder reads there and writes at
    ``cfg.metadata.hook_name_out`` (``cfg.d_out`` wide), as under SAELens' HookedSAETransformer.

    Raises:
        ValueError: no ``hook_name``, an unknown hook, a width that does not fit, or a transcoder
            whose two hooks sit in different stacks (their positions do not correspond).
    """
    name = sae.cfg.metadata.hook_name
    if not name:
        raise ValueError("The SAE's cfg.metadata.hook_name is empty: it does not say where to attach it.")
    name_in = _fit(model, name, sae.cfg.d_in, "d_in")
    out = sae.cfg.metadata.hook_name_out
    if not out or model.canonical_name(out) == name_in:
        return name_in, name_in
    name_out = _fit(model, out, getattr(sae.cfg, "d_out", sae.cfg.d_in), "d_out")
    stacks = (model._sites[name_in].stack, model._sites[name_out].stack)
    if stacks[0] != stacks[1]:
        raise ValueError(
            f"Transcoder reads {name_in} ({stacks[0]}) and writes {name_out} ({stacks[1]}): both hooks "
            "must be in the same stack."
        )
    return name_in, name_out


class SAEMixin:
    """SAELens' ``HookedSAETransformer`` splicing API, on ``HookedT5Gemma2``.

    Same methods, arguments and semantics as SAELens 6.54's ``HookedSAETransformer``:
    ``_acts_to_saes`` (input hook name -> SAELens ``_SAEWrapper``), ``add_sae(sae,
    use_error_term, exclude_special_tokens)``, ``_reset_sae(name, prev_wrapper=None)``,
    ``reset_saes``, the ``saes`` context, ``run_with_saes``, ``run_with_cache_with_saes`` and
    ``run_with_hooks_with_saes`` (with ``reset_saes_end``), and transcoders (read at
    ``hook_name``, write at ``hook_name_out``). The wrapper and the special-token mask are
    SAELens' own code. Differences, all on bad input: an unknown hook or a width that does not
    fit raises ``ValueError`` (SAELens logs a warning and skips the SAE), and splicing over a
    hook point that has hooks attached (e.g. steering) raises instead of dropping them.

    Hook names may be any spelling (aliases, transformers paths); keys are canonical names.

    ``exclude_special_tokens``: at every position whose token is special the SAE is bypassed
    (the original activation flows on). The token is the one the site's stack read at that
    position, laid out by the position contract: encoder position ``t`` read ``tokens[t]``,
    decoder position ``t`` the state after reading ``tokens[t]`` (under ``prefix_lm`` position
    ``p - 1`` read the decoder's BOS, which is special). So for a token batch the mask is
    SAELens' batch mask. In ``generate()`` and with explicit ``decoder_input_ids`` the decoder's
    mask comes from the ids it actually reads, step by step. Positions a stack does not compute
    (zeros under ``prefix_lm``) also bypass the SAE, so its hooks hold zeros there too.
    """

    # ------------------------------------------------------------------ state

    @property
    def _acts_to_saes(self: Any) -> dict[str, _SAEWrapper]:
        """Canonical input hook name -> SAELens ``_SAEWrapper`` (as HookedSAETransformer keeps it)."""
        return self.__dict__.setdefault("_acts_to_saes_store", {})

    @_acts_to_saes.setter
    def _acts_to_saes(self: Any, value: dict[str, _SAEWrapper]) -> None:
        self.__dict__["_acts_to_saes_store"] = value

    @property
    def _transcoder_output_hooks(self: Any) -> dict[str, str]:
        """Input hook -> output hook, for transcoders only (as HookedSAETransformer keeps it)."""
        return self.__dict__.setdefault("_transcoder_output_hooks_store", {})

    @property
    def acts_to_saes(self: Any) -> dict[str, SAE[Any]]:
        """Canonical hook name -> attached SAE."""
        return {name: wrapper.sae for name, wrapper in self._acts_to_saes.items()}

    def _splice_state(self: Any) -> dict[str, Any]:
        # The hook points an SAE replaced (restored on reset, so identities and hooks survive),
        # the transcoders' capture handles, and the PyTorch hooks that build token masks.
        return self.__dict__.setdefault(
            "_splice_state_store", {"originals": {}, "captures": {}, "mask_handles": []}
        )

    # ------------------------------------------------------------------ add / reset

    def add_sae(
        self: Any,
        sae: SAE[Any],
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
    ) -> None:
        """Splice ``sae`` (an SAE or a transcoder) in until ``reset_saes``; replaces one at the same hook.

        Args:
            sae: a SAELens SAE whose ``cfg.metadata.hook_name`` names a site of this model; a
                ``Transcoder`` also names ``hook_name_out``, where its output replaces the activation.
            use_error_term: add the reconstruction error back so the model's outputs are
                unchanged (hooks on the SAE's internals then act as interventions). Defaults to
                the SAE's own setting.
            exclude_special_tokens: True bypasses the SAE at positions that read a special token
                (BOS, EOS, PAD, ... from the tokenizer, as SAELens picks them); a list of ids
                picks those tokens instead. See the class docstring for decoder positions.

        Raises:
            ValueError: unknown hook name, a site without a width (attention patterns), a width
                that does not fit, or hooks already attached at the output site.
        """
        name_in, name_out = splice_sites(self, sae)
        if name_in in self._acts_to_saes:
            self._reset_sae(name_in)
            self.setup()
        original = self.mod_dict[name_out]
        if not isinstance(original, HookPoint):
            holder = next(k for k, v in self._acts_to_saes.items() if v is original)
            raise ValueError(f"Hook {name_out} already holds the SAE attached at {holder}; reset that first.")
        if original.fwd_hooks or original.bwd_hooks:
            raise ValueError(
                f"Hook {name_out} has hooks attached (e.g. steering); remove them before splicing an SAE there."
            )
        wrapper = _SAEWrapperFlat(
            sae,
            name_out,
            use_error_term=sae.use_error_term if use_error_term is None else use_error_term,
            exclude_special_tokens=exclude_special_tokens,
        )
        state = self._splice_state()
        if name_in != name_out:
            # As HookedSAETransformer: a permanent hook at the input site hands the wrapper its input.
            source = self.mod_dict[name_in]
            source.add_hook(lambda x, hook: (wrapper.capture_input(x), x)[1], dir="fwd", is_permanent=True)  # noqa: ARG005
            state["captures"][name_in] = source.fwd_hooks[-1]
            self._transcoder_output_hooks[name_in] = name_out
        state["originals"][name_out] = original
        _set_module(self, name_out, wrapper)
        self._acts_to_saes[name_in] = wrapper
        self._update_mask_hooks()
        self.setup()

    def _reset_sae(self: Any, act_name: str, prev_wrapper: _SAEWrapper | None = None) -> None:
        """Remove the SAE attached at ``act_name``; with ``prev_wrapper``, attach that wrapper's SAE
        with its settings instead (as HookedSAETransformer does). A name with no SAE logs a warning."""
        name = self.canonical_name(act_name)
        if name not in self._acts_to_saes:
            logger.warning(f"No SAE is attached to {name}. There's nothing to reset.")
            return
        state = self._splice_state()
        name_out = self._transcoder_output_hooks.pop(name, name)
        handle = state["captures"].pop(name, None)
        if handle is not None:
            source = self.mod_dict[name]
            handle.hook.remove()
            source.fwd_hooks = [h for h in source.fwd_hooks if h is not handle]
        _set_module(self, name_out, state["originals"].pop(name_out))
        del self._acts_to_saes[name]
        self._update_mask_hooks()
        if prev_wrapper is not None:
            self.setup()
            self.add_sae(
                prev_wrapper.sae,
                use_error_term=prev_wrapper.use_error_term,
                exclude_special_tokens=prev_wrapper.exclude_special_tokens,
            )

    def reset_saes(self: Any, act_names: str | list[str] | None = None) -> None:
        """Remove attached SAEs (all, or those at the given hook names in any spelling).

        Raises:
            ValueError: a name given explicitly has no SAE attached.
        """
        names = (
            list(self._acts_to_saes)
            if act_names is None
            else [act_names]
            if isinstance(act_names, str)
            else act_names
        )
        for n in names:
            canonical = self.canonical_name(n)
            if canonical not in self._acts_to_saes:
                raise ValueError(f"No SAE is attached at {canonical}; attached: {sorted(self._acts_to_saes)}")
            self._reset_sae(canonical)
        self.setup()

    # ------------------------------------------------------------------ special-token masks

    def _update_mask_hooks(self: Any) -> None:
        """Keep PyTorch pre-hooks on the encoder and decoder exactly while a wrapper needs a mask."""
        state = self._splice_state()
        needed = any(w.exclude_special_tokens is not False for w in self._acts_to_saes.values())
        if needed and not state["mask_handles"]:
            for stack, module in (
                ("encoder", self.hf_model.get_encoder()),
                ("decoder", self.hf_model.get_decoder()),
            ):
                state["mask_handles"].append(
                    module.register_forward_pre_hook(self._mask_hook(stack), with_kwargs=True)
                )
        elif not needed:
            for handle in state["mask_handles"]:
                handle.remove()
            state["mask_handles"].clear()

    def _mask_hook(self: Any, stack: str) -> Callable[..., None]:
        from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer

        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            wrappers = [
                w
                for name, w in self._acts_to_saes.items()
                if w.exclude_special_tokens is not False
                and self._sites[self._transcoder_output_hooks.get(name, name)].stack == stack
            ]
            if not wrappers:
                return
            if ids is None:
                raise ValueError(
                    f"exclude_special_tokens needs the token ids the {stack} reads; it was given embeddings."
                )
            span = None if self._spans is None else self._spans[stack]
            for w in wrappers:
                # SAELens' own mask (its special-token choice), on the ids this stack reads.
                mask = HookedSAETransformer._compute_exclusion_mask(self, ids, w.exclude_special_tokens)  # type: ignore[arg-type]
                if span is not None and (span.offset or mask.shape[1] != span.n):
                    full = torch.ones((mask.shape[0], span.n), dtype=torch.bool, device=mask.device)
                    full[:, span.offset : span.offset + mask.shape[1]] = mask
                    mask = full
                w.set_token_mask(mask)

        return hook

    # ------------------------------------------------------------------ contexts and runs

    @contextmanager
    def saes(
        self: Any,
        saes: SAE[Any] | Sequence[SAE[Any]] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
    ) -> Iterator[Any]:
        """Context manager: attach ``saes``; on exit (if ``reset_saes_end``) restore the previous ones.

        Arguments as :meth:`add_sae`; ``reset_saes_end=False`` leaves the SAEs attached.
        """
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        to_restore: list[tuple[str, _SAEWrapper | None]] = []
        try:
            for sae in saes:
                name = splice_sites(self, sae)[0]
                to_restore.append((name, self._acts_to_saes.get(name)))
                self.add_sae(
                    sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens
                )
            yield self
        finally:
            if reset_saes_end:
                # Newest first, so two SAEs at one hook restore what was there before both.
                for name, prev in reversed(to_restore):
                    self._reset_sae(name, prev)
                self.setup()

    def run_with_saes(
        self: Any,
        *model_args: Any,
        saes: SAE[Any] | Sequence[SAE[Any]] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
        **model_kwargs: Any,
    ) -> Any:
        """Forward pass with ``saes`` attached (for this call only, unless ``reset_saes_end=False``)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self: Any,
        *model_args: Any,
        saes: SAE[Any] | Sequence[SAE[Any]] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``run_with_cache`` with ``saes`` attached; the SAE's own hooks (``<hook>.hook_sae_acts_post``,
        at the output hook for a transcoder) can be cached."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_cache(
                *model_args,
                return_cache_object=return_cache_object,
                remove_batch_dim=remove_batch_dim,
                **kwargs,
            )

    def run_with_hooks_with_saes(
        self: Any,
        *model_args: Any,
        saes: SAE[Any] | Sequence[SAE[Any]] = (),
        reset_saes_end: bool = True,
        exclude_special_tokens: bool | list[int] = False,
        fwd_hooks: list[tuple[Any, Callable]] = [],  # noqa: B006 (mirrors SAELens' signature)
        bwd_hooks: list[tuple[Any, Callable]] = [],  # noqa: B006
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """``run_with_hooks`` with ``saes`` attached (SAELens' signature: no ``use_error_term``)."""
        with self.saes(saes, reset_saes_end, exclude_special_tokens=exclude_special_tokens):
            return self.run_with_hooks(
                *model_args,
                fwd_hooks=fwd_hooks,
                bwd_hooks=bwd_hooks,
                reset_hooks_end=reset_hooks_end,
                clear_contexts=clear_contexts,
                **model_kwargs,
            )

    @contextmanager
    def steer(
        self: Any,
        sae: SAE[Any],
        features: int | Sequence[int],
        *,
        scale: float | None = None,
        value: float | None = None,
        add: float | None = None,
        ablate: bool = False,
    ) -> Iterator[SteeringReport]:
        """Context manager: edit SAE features at the SAE's hook for every run inside it.

        Exactly one of ``scale`` (multiply), ``value`` (set), ``add`` (add a constant) or
        ``ablate=True`` (set to 0). Works with ``forward``, ``run_with_cache`` and ``generate``,
        on encoder and decoder sites. Yields a :class:`SteeringReport` that records, per run,
        the change made at the site and the change that reaches the residual stream: at the
        o_proj/MLP outputs the edit still passes the block's RMSNorm, which divides by the
        activation's rms (a small edit is amplified, a large one saturates).

        Example:
            >>> with model.steer(sae, [12, 40], scale=8.0) as report:
            ...     text = model.generate("The cat sat", max_new_tokens=10)
            >>> report.summary()
        """
        edit = FeatureEdit.make(features, scale=scale, value=value, add=add, ablate=ablate)
        name = check_sae_fits(self, sae)
        if name in self.__dict__.get("_acts_to_saes_store", {}):
            raise ValueError(
                f"An SAE is spliced in at {name}; steer with a model that has none attached there."
            )
        to_residual, where = _residual_path(self, name)
        report = SteeringReport(name, where)

        def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
            delta = steering_delta(sae, x, edit)
            with torch.no_grad():
                live = _flat_positions(x).abs().sum(-1) > 0  # uncovered positions are zeros
                report.site.append((_flat_positions(delta).norm(dim=-1) * live).cpu())
                reached = to_residual(x + delta) - to_residual(x)
                report.residual.append((_flat_positions(reached).norm(dim=-1) * live).cpu())
            return x + delta

        with self.hooks(fwd_hooks=[(name, hook)]):
            yield report


def _flat_positions(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:2], -1)


def _residual_path(model: Any, hook_name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The map from a site's activation to what the residual stream receives from it, named."""
    s = model._sites[hook_name]
    kind, layer = s.kind.friendly, model._hf_layers[hook_name]
    attn_norm, mlp_norm = layer.post_self_attn_layernorm, layer.post_feedforward_layernorm
    paths: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
        "attn_out": (attn_norm, "post_self_attn_layernorm(o_proj output)"),
        "attn_z": (
            lambda v: attn_norm(layer.self_attn.o_proj(v.flatten(-2))),
            "post_self_attn_layernorm(o_proj(z))",
        ),
        "mlp_in": (
            lambda v: mlp_norm(layer.mlp(v)),
            "post_feedforward_layernorm(mlp(x)) (the MLP's response)",
        ),
        "mlp_post": (lambda v: mlp_norm(layer.mlp.down_proj(v)), "post_feedforward_layernorm(down_proj(h))"),
        "mlp_out": (mlp_norm, "post_feedforward_layernorm(MLP output)"),
    }
    for part in ("z_self", "z_cross"):
        paths[part] = (
            lambda v: attn_norm(layer.self_attn.o_proj(v.flatten(-2))),
            "post_self_attn_layernorm(o_proj(z))",
        )
    return paths.get(kind, (lambda v: v, "the residual stream itself (no norm in between)"))


@dataclass
class SteeringReport:
    """What :meth:`SAEMixin.steer` changed, one entry per run at the steered hook.

    ``site[i]`` and ``residual[i]`` are ``[batch, pos]`` norms (0 at positions the stack does
    not compute) of the change made at the site and of the change that reaches the residual
    stream through ``path``.
    """

    hook_name: str
    path: str
    site: list[torch.Tensor] = field(default_factory=list)
    residual: list[torch.Tensor] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Mean and max norms over steered positions, and their ratio (the norm's amplification)."""
        if not self.site:
            return {"hook_name": self.hook_name, "path": self.path, "runs": 0}
        site = torch.cat([t.flatten() for t in self.site])
        res = torch.cat([t.flatten() for t in self.residual])
        live = site > 0
        mean_site = float(site[live].mean()) if live.any() else 0.0
        mean_res = float(res[live].mean()) if live.any() else 0.0
        return {
            "hook_name": self.hook_name,
            "path": self.path,
            "runs": len(self.site),
            "positions": int(live.sum()),
            "site_delta_norm_mean": mean_site,
            "site_delta_norm_max": float(site.max()),
            "residual_delta_norm_mean": mean_res,
            "residual_delta_norm_max": float(res.max()),
            "residual_over_site": mean_res / mean_site if mean_site else float("nan"),
        }


def _set_module(model: Any, name: str, module: torch.nn.Module) -> None:
    parent_path, _, leaf = name.rpartition(".")
    model.get_submodule(parent_path).add_module(leaf, module)


@dataclass(frozen=True)
class FeatureEdit:
    """A change to some SAE features: ``f'[i] = f[i] * scale``, ``= value`` or ``= f[i] + add``."""

    features: tuple[int, ...]
    scale: float | None = None
    value: float | None = None
    add: float | None = None

    @classmethod
    def make(
        cls,
        features: int | Sequence[int],
        *,
        scale: float | None = None,
        value: float | None = None,
        add: float | None = None,
        ablate: bool = False,
    ) -> FeatureEdit:
        """Validate and build an edit; ``ablate=True`` means ``value=0``."""
        if ablate:
            if value is not None and value != 0:
                raise ValueError("ablate=True sets features to 0; do not also pass value.")
            value = 0.0
        given = [k for k, v in (("scale", scale), ("value", value), ("add", add)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"Give exactly one of scale=, value=, add= or ablate=True (got {given or 'none'})."
            )
        feats = (int(features),) if isinstance(features, int) else tuple(int(f) for f in features)
        if not feats:
            raise ValueError("No features to steer.")
        return cls(feats, scale, value, add)

    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        """The edited activations of the chosen features (``acts`` is ``[..., len(features)]``)."""
        if self.scale is not None:
            return acts * self.scale
        if self.value is not None:
            return torch.full_like(acts, self.value)
        return acts + self.add  # type: ignore[operator]


def _sae_input(sae: SAE[Any], x: torch.Tensor) -> torch.Tensor:
    """``x`` as the SAE wants it: attn_z activations (``[..., n_heads, d_head]``) are flattened
    unless the SAE flattens them itself (SAELens' hook_z reshaping mode)."""
    if x.ndim == 4 and not getattr(sae, "hook_z_reshaping_mode", False):
        return x.flatten(-2)
    return x


class _ToModel(HookPoint):
    """``hook_sae_output`` that hands on (and caches) the model's dtype: the cast happens in its
    ``forward``, so its hooks see what flows on into the model."""

    like: torch.Tensor | None = None
    where: str = "?"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.like is None else to_model(x, self.like, self.where)


class _SAEWrapperFlat(_SAEWrapper):
    """SAELens' wrapper under this package's dtype contract (:mod:`sae_lens_t5gemma.model.dtypes`).

    SAELens' own ``forward`` runs on the activation cast to the SAE's dtype and device, so the
    SAE's hooks, the error term and the special-token bypass are in the SAE's dtype;
    ``hook_sae_output`` casts back to the model's dtype and device, and that is what flows on.
    attn_z's head axis is flattened for SAEs that do not do it themselves.
    """

    def __init__(self, sae: SAE[Any], hook_name: str, **kwargs: Any) -> None:
        super().__init__(sae, **kwargs)
        self.hook_sae_output = _ToModel()
        self.hook_sae_output.where = f"SAE at {hook_name}"

    def capture_input(self, x: torch.Tensor) -> None:
        super().capture_input(to_sae(self.sae, _sae_input(self.sae, x)))

    def forward(self, original_output: torch.Tensor) -> torch.Tensor:
        flat = _sae_input(self.sae, original_output)
        self.hook_sae_output.like = flat
        try:
            return super().forward(to_sae(self.sae, flat)).reshape(original_output.shape)
        finally:
            self.hook_sae_output.like = None


def steering_delta(sae: SAE[Any], x: torch.Tensor, edit: FeatureEdit) -> torch.Tensor:
    """The change to add to activation ``x`` for ``edit``: ``(f' - f) @ W_dec`` in ``x``'s shape.

    For SAEs with a run-time input normalisation (``constant_norm_rescale``, ``layer_norm``)
    the change is the difference of the two decodes, which includes the output rescaling.
    """
    d_sae = sae.cfg.d_sae
    bad = [f for f in edit.features if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"Feature index {bad} out of range: the SAE has {d_sae} features.")
    flat = to_sae(sae, _sae_input(sae, x))
    idx = torch.tensor(edit.features, device=sae.W_dec.device)
    f = sae.encode(flat)
    if sae.cfg.normalize_activations in ("none", "expected_average_only_in", None):
        sel = f[..., idx]
        delta = (edit.apply(sel) - sel) @ sae.W_dec[idx]
    else:
        edited = f.clone()
        edited[..., idx] = edit.apply(f[..., idx])
        delta = sae.decode(edited) - sae.decode(f)
    return to_model(delta, x, f"steering at {sae.cfg.metadata.hook_name}").reshape(x.shape)


@dataclass(frozen=True)
class FeatureHit:
    """One (position, token, feature, activation) row of :func:`top_features`."""

    position: int
    token: str
    feature: int
    activation: float


@torch.no_grad()
def top_features(
    model: HookedT5Gemma2, sae: SAE[Any], text: str, k: int = 10, per_token: bool = False
) -> list[FeatureHit]:
    """The strongest SAE features on ``text`` at the SAE's hook.

    Args:
        model: the hooked model.
        sae: the SAE (its ``hook_name`` picks the site).
        text: one text, read as every call reads a prompt: under the model's convention
            (``prefix_lm``: the encoder reads the first ``p`` tokens and the decoder the rest, so
            an encoder site lists positions ``< p`` and a decoder site positions ``>= p``). For
            the encoder to read the whole text: ``with model.fed(prefix_len=len(model.to_tokens(text)[0])):``.
        k: how many rows (overall), or per position if ``per_token``.
        per_token: the top ``k`` features of every position instead of the top ``k`` overall.

    Returns:
        Rows sorted by activation (descending; per position if ``per_token``). ``position``
        indexes the text's tokens and ``token`` is the token the site has just read there.
    """
    name = check_sae_fits(model, sae)
    tokens = model.to_tokens(text)
    s = model._sites[name]
    _, cache = model.run_with_cache(tokens, names_filter=[name], stop_at_layer=s.layer + 1)
    covered = cache.covered_mask(name)[0]
    x = cache[name][0]
    feats = sae.encode(to_sae(sae, _sae_input(sae, x)))
    return rank_features(feats, covered, model.to_str_tokens(tokens[0]), k, per_token)


def rank_features(
    feats: torch.Tensor, positions: torch.Tensor, strs: list[str], k: int, per_token: bool
) -> list[FeatureHit]:
    """Top features of one row's ``[n, d_sae]`` activations, at the positions marked in ``positions``.

    Positions not marked are zeroed first; ``strs`` are the row's token strings.
    """
    feats = feats.reshape(feats.shape[0], -1) * positions[:, None].to(feats.device)
    rows: list[FeatureHit] = []
    if per_token:
        vals, idx = feats.topk(min(k, feats.shape[-1]), dim=-1)
        for p in positions.nonzero().flatten().tolist():
            rows += [
                FeatureHit(p, strs[p], int(i), float(v))
                for v, i in zip(vals[p].tolist(), idx[p].tolist(), strict=True)
                if v > 0
            ]
        return rows
    vals, flat_idx = feats.flatten().topk(min(k, feats.numel()))
    for v, fi in zip(vals.tolist(), flat_idx.tolist(), strict=True):
        if v <= 0:
            break
        p, f = divmod(fi, feats.shape[-1])
        rows.append(FeatureHit(p, strs[p], f, float(v)))
    return rows
