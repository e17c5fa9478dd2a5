"""``T5Gemma2ActivationCache``: TransformerLens' ``ActivationCache`` for a model with two stacks.

Keys may be any spelling of a site (aliases resolve through :mod:`sites`). The cache knows which
positions each stack computed under ``prefix_lm`` (the position contract of
:mod:`~sae_lens_t5gemma.model.conventions`) and warns once per key when user code reads a hook
whose stack left positions uncovered; TransformerLens' single-stack helpers raise a clear error.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformer_lens.ActivationCache import ActivationCache

from sae_lens_t5gemma.model import sites as sites_mod

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
