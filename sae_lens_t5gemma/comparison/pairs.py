"""What a comparison evaluates: (model, SAE) pairs, and where a Gemma 3 SAE reads on T5Gemma 2.

A :class:`Pair` names an SAE (``RELEASE:SAE_ID`` or a SAELens folder), optionally the model to
run it on and the hook to apply it at (a transfer; the hook reading the same activation is
:func:`sae_lens_t5gemma.model.sites.transfer_hook`);
:func:`gemma_scope_variants` lists Gemma Scope 2's every-layer SAEs at a layer, by expected L0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sae_lens_t5gemma.loading.registration import PACKAGE_RELEASE

MINDCHAIN_RELEASE = PACKAGE_RELEASE
DEFAULT_GEMMA_SCOPE_VARIANT = (
    "all"  # every variant of the width: the L0 sweep, matched per layer in the report
)


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
