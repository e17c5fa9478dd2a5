"""T5Gemma 2 for SAELens.

``import sae_lens_t5gemma`` registers the ``t5gemma2-270m-attn_out`` release (the 36
mindchain SAEs) with SAELens, so ``SAE.from_pretrained(release="t5gemma2-270m-attn_out",
sae_id="encoder/layer_5")`` works next to Gemma Scope 2's releases.
"""

__version__ = "0.1.0"

from sae_lens_t5gemma.registration import register, register_release_yaml  # noqa: E402

# SAELens has no plugin mechanism: registration happens on import (idempotent).
register()

__all__ = ["__version__", "register", "register_release_yaml"]
