"""SAE splicing for ``HookedT5Gemma2``, as SAELens' ``HookedSAETransformer`` does it.

Same method names and the same wrapper (SAELens' own, through :mod:`sae_lens_t5gemma._compat`),
so the same ``<hook>.hook_sae_acts_post``-style cache names: an SAE replaces the hook point at
its ``cfg.metadata.hook_name``, with or without the error term; a transcoder reads there and
writes at ``hook_name_out`` (both checked by :func:`~sae_lens_t5gemma.model.sae_fit.splice_sites`).

The mixin uses only the model's public surface (``site``, ``canonical_name``, ``mod_dict``,
``setup``, ``hf_model``, ``batch_token_mask``); ``model.steer`` lives in
:mod:`~sae_lens_t5gemma.model.steering`, imported when called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import SAE, logger
from transformer_lens.hook_points import HookPoint

from sae_lens_t5gemma import _compat
from sae_lens_t5gemma.model.dtypes import to_model, to_sae
from sae_lens_t5gemma.model.sae_fit import sae_input, splice_sites

if TYPE_CHECKING:
    from sae_lens_t5gemma.model.steering import SteeringReport

# SAELens' own wrapper (error term, hook points, token masks), reused so that spliced SAEs
# behave and cache exactly as under HookedSAETransformer.
_SAEWrapper = _compat.saelens_sae_wrapper()


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
        super().capture_input(to_sae(self.sae, sae_input(self.sae, x)))

    def forward(self, original_output: torch.Tensor) -> torch.Tensor:
        flat = sae_input(self.sae, original_output)
        self.hook_sae_output.like = flat
        try:
            return super().forward(to_sae(self.sae, flat)).reshape(original_output.shape)
        finally:
            self.hook_sae_output.like = None


def _set_module(model: Any, name: str, module: torch.nn.Module) -> None:
    parent_path, _, leaf = name.rpartition(".")
    model.get_submodule(parent_path).add_module(leaf, module)


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
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            wrappers = [
                w
                for name, w in self._acts_to_saes.items()
                if w.exclude_special_tokens is not False
                and self.site(self._transcoder_output_hooks.get(name, name)).stack == stack
            ]
            if not wrappers:
                return
            if ids is None:
                raise ValueError(
                    f"exclude_special_tokens needs the token ids the {stack} reads; it was given embeddings."
                )
            for w in wrappers:
                # SAELens' own mask (its special-token choice), on the ids this stack reads.
                mask = _compat.saelens_exclusion_mask(self, ids, w.exclude_special_tokens)
                w.set_token_mask(self.batch_token_mask(mask, stack))

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

    def steer(
        self: Any,
        sae: SAE[Any],
        features: int | Sequence[int],
        *,
        scale: float | None = None,
        value: float | None = None,
        add: float | None = None,
        ablate: bool = False,
    ) -> AbstractContextManager[SteeringReport]:
        """Context manager: edit SAE features at the SAE's hook for every run inside it.

        Exactly one of ``scale`` (multiply), ``value`` (set), ``add`` (add a constant) or
        ``ablate=True`` (set to 0). Works with ``forward``, ``run_with_cache`` and ``generate``,
        on encoder and decoder sites. Yields a :class:`~sae_lens_t5gemma.model.steering.SteeringReport`
        that records, per run, the change made at the site and the change that reaches the
        residual stream: at the o_proj/MLP outputs the edit still passes the block's RMSNorm,
        which divides by the activation's rms (a small edit is amplified, a large one saturates).
        See :func:`sae_lens_t5gemma.model.steering.steer`.

        Example:
            >>> with model.steer(sae, [12, 40], scale=8.0) as report:
            ...     text = model.generate("The cat sat", max_new_tokens=10)
            >>> report.summary()
        """
        from sae_lens_t5gemma.model.steering import steer

        return steer(self, sae, features, scale=scale, value=value, add=add, ablate=ablate)
