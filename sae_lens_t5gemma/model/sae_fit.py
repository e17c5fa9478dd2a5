"""Where an SAE sits on ``HookedT5Gemma2`` and what it reads there.

:func:`splice_sites` gives the canonical (input, output) hooks of an SAE or transcoder, checked
against the model (the width rule is :func:`sites.site_width
<sae_lens_t5gemma.model.sites.site_width>`); :func:`check_sae_fits` the one hook of an SAE that
is not a transcoder; :func:`sae_input` the activation as the SAE reads it. Splicing
(:mod:`~sae_lens_t5gemma.model.splicing`), steering (:mod:`~sae_lens_t5gemma.model.steering`)
and the analyses all check an SAE here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from sae_lens import SAE

from sae_lens_t5gemma.model import sites as sites_mod

if TYPE_CHECKING:
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2


def sae_input(sae: SAE[Any], x: torch.Tensor) -> torch.Tensor:
    """``x`` as the SAE wants it: attn_z activations (``[..., n_heads, d_head]``) are flattened
    unless the SAE flattens them itself (SAELens' hook_z reshaping mode)."""
    if x.ndim == 4 and not getattr(sae, "hook_z_reshaping_mode", False):
        return x.flatten(-2)
    return x


def _fit(model: HookedT5Gemma2, name: str, width: int, what: str) -> str:
    canonical = model.canonical_name(name)
    if sites_mod.resolve_vision(canonical) is not None:
        raise ValueError(
            f"Hook {canonical} (from {name!r}) is a vision-tower site: its activations are per image patch, "
            "not per token, so SAEs cannot be spliced or steered there. Read it with run_with_cache, or "
            "train on it with sae_lens_t5gemma.analysis.images.harvest / train_sae."
        )
    site_width = sites_mod.site_width(model, canonical)
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
    stacks = (model.site(name_in).stack, model.site(name_out).stack)
    if stacks[0] != stacks[1]:
        raise ValueError(
            f"Transcoder reads {name_in} ({stacks[0]}) and writes {name_out} ({stacks[1]}): both hooks "
            "must be in the same stack."
        )
    return name_in, name_out
