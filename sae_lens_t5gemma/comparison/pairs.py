"""What a comparison evaluates: (model, SAE) pairs, and where a Gemma 3 SAE reads on T5Gemma 2.

A :class:`Pair` names an SAE (``RELEASE:SAE_ID`` or a SAELens folder), optionally the model to
run it on and the hook to apply it at (a transfer). :func:`transfer_hook` maps a Gemma 3
(TransformerLens) hook to the T5Gemma 2 hook that reads the same activation;
:func:`gemma_scope_variants` lists Gemma Scope 2's every-layer SAEs at a layer, by expected L0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sae_lens_t5gemma.loading.registration import PACKAGE_RELEASE
from sae_lens_t5gemma.model import sites as sites_mod

MINDCHAIN_RELEASE = PACKAGE_RELEASE
DEFAULT_GEMMA_SCOPE_VARIANT = (
    "all"  # every variant of the width: the L0 sweep, matched per layer in the report
)


# TransformerLens hook suffix -> site key (for models with Gemma's sandwich norms, the
# attn/mlp outputs are taken after the post-sublayer norm: see ``_describe_tl_hook``).
TL_SUFFIXES = {
    "hook_resid_pre": "resid_pre",
    "attn.hook_z": "attn_z",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
# Gemma 3 site key -> the T5Gemma 2 site kind reading the same activation. Gemma 3's
# hook_attn_out / hook_mlp_out sit after the post-sublayer norm, so they map onto T5Gemma 2's
# post-norm sites (hook_attn_out_normed / hook_mlp_out_normed), not onto its o_proj / MLP outputs.
TRANSFER_KINDS = {
    "resid_pre": "resid_pre",
    "attn_z": "attn_z",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
    "attn_out_normed": "attn_out_normed",
    "mlp_out_normed": "mlp_out_normed",
}
# The decoder's self_attn merges self- and cross-attention: its z and attention output are not
# Gemma 3's self-attention, so attention sites transfer onto the encoder only.
_ENCODER_ONLY_KINDS = ("attn_z", "attn_out_normed")
# The TransformerLens hook each Gemma Scope 2 site's SAEs read (SAELens' gemma_3 loader).
GEMMA_SCOPE_HOOKS = {"attn_out": "attn.hook_z", "resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out"}


# ----------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """One (model, SAE) pair to evaluate.

    ``sae`` is ``RELEASE:SAE_ID`` (any registered SAELens release) or a local SAELens folder
    (``cfg.json`` + ``sae_weights.safetensors``, as training here writes). ``model`` is a hub id
    or folder; by default the SAE's own model. ``hook_name`` applies the SAE at another hook
    (transfer); by default its own.
    """

    sae: str
    model: str | None = None
    hook_name: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Pair:
        """Parse ``sae=SPEC[,model=NAME][,hook=HOOK]``, or a bare SAE spec.

        Raises:
            ValueError: unknown key or no ``sae``.
        """
        if "=" not in spec:
            return cls(sae=spec.strip())
        parts: dict[str, str] = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in ("sae", "model", "hook"):
                raise ValueError(f"Pair {spec!r}: expected 'sae=...,model=...,hook=...', got {item!r}.")
            parts[key] = value.strip()
        if not parts.get("sae"):
            raise ValueError(f"Pair {spec!r} names no SAE (sae=RELEASE:SAE_ID or a folder).")
        return cls(sae=parts["sae"], model=parts.get("model") or None, hook_name=parts.get("hook") or None)


def transfer_hook(gemma3_hook: str, stack: str = "encoder") -> str | None:
    """The T5Gemma 2 hook reading the same activation as a Gemma 3 (TransformerLens) hook.

    ``blocks.5.attn.hook_z`` -> ``encoder_blocks.5.attn.hook_z``; ``blocks.5.hook_mlp_out``
    (after post_feedforward_layernorm, as Gemma Scope 2's mlp_out SAEs read it) ->
    ``encoder_blocks.5.hook_mlp_out_normed``. With ``stack="decoder"``, the decoder's hook, or
    None for attention sites (the decoder's self_attn merges self- and cross-attention).
    None where T5Gemma 2 has no such site.
    """
    parts = gemma3_hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    key = TL_SUFFIXES.get(".".join(parts[2:]))
    if key in ("attn_out", "mlp_out"):  # Gemma 3 has sandwich norms: these hooks are post-norm
        key += "_normed"
    kind = TRANSFER_KINDS.get(key or "")
    if kind is None or (stack == "decoder" and kind in _ENCODER_ONLY_KINDS):
        return None
    return sites_mod.site(stack, int(parts[1]), kind).hook_name


def gemma_scope_variants(
    site: str, layer: int, widths: Sequence[str] = ("16k",), size: str = "270m"
) -> list[str]:
    """Every Gemma Scope 2 every-layer id at ``layer`` with a width in ``widths``, by expected L0.

    Read from SAELens' own release YAML: ``layer_5_width_16k_l0_small`` (L0 10-20) and
    ``..._l0_big`` (60-150) for the ``-all`` releases of the model ``size``.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from sae_lens_t5gemma.model.sizes import get_size

    release = get_size(size).gemma_scope_releases[site]
    lookup = get_pretrained_saes_directory()[release]
    ids = [
        i
        for i in lookup.saes_map
        if i.startswith(f"layer_{layer}_") and any(f"_width_{w}_" in i for w in widths)
    ]
    if not ids:
        raise ValueError(f"{release} has no SAE at layer {layer} with a width in {list(widths)}.")
    return sorted(ids, key=lambda i: (lookup.expected_l0.get(i) or 0, i))
