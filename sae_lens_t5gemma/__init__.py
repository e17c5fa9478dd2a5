"""T5Gemma 2 for SAELens.

``import sae_lens_t5gemma`` registers the ``t5gemma2-270m-attn_out`` release (the 36
mindchain SAEs) with SAELens, so ``SAE.from_pretrained(release="t5gemma2-270m-attn_out",
sae_id="encoder/layer_5")`` works next to Gemma Scope 2's releases.

The main API is importable from here (``from sae_lens_t5gemma import load_t5gemma2,
HookedT5Gemma2``). Those names are loaded on first use, so they add nothing to the import
beyond the registration. ``compare`` is the name of a submodule, so the comparison function
stays ``sae_lens_t5gemma.comparison.suite.compare``.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access, PEP 562).
_EXPORTS: dict[str, str] = {
    "HookedT5Gemma2": "sae_lens_t5gemma.model.hooked",
    "load_t5gemma2": "sae_lens_t5gemma.model.hooked",
    "top_features": "sae_lens_t5gemma.model.steering",
    "TrainConfig": "sae_lens_t5gemma.training",
    "train": "sae_lens_t5gemma.training",
    "register_release": "sae_lens_t5gemma.training",
    "standard_pairs": "sae_lens_t5gemma.comparison.suite",
    "evaluate_sae": "sae_lens_t5gemma.analysis.evaluation",
    "training_history": "sae_lens_t5gemma.loading.mindchain_history",
    "register": "sae_lens_t5gemma.loading.registration",
    "register_release_yaml": "sae_lens_t5gemma.loading.registration",
}

__all__ = [
    "__version__",
    "HookedT5Gemma2",
    "load_t5gemma2",
    "top_features",
    "TrainConfig",
    "train",
    "register_release",
    "standard_pairs",
    "evaluate_sae",
    "training_history",
    "register",
    "register_release_yaml",
]

if TYPE_CHECKING:
    from sae_lens_t5gemma.analysis.evaluation import evaluate_sae
    from sae_lens_t5gemma.comparison.suite import standard_pairs
    from sae_lens_t5gemma.loading.mindchain_history import training_history
    from sae_lens_t5gemma.loading.registration import register, register_release_yaml
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2, load_t5gemma2
    from sae_lens_t5gemma.model.steering import top_features
    from sae_lens_t5gemma.training import TrainConfig, register_release, train


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sae_lens_t5gemma' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


# SAELens has no plugin mechanism: registration happens on import (idempotent). The one
# exception is the command line's entry module, which imports this package without it so
# that ``--help`` and ``list`` answer at once; its commands register before they run.
if not getattr(sys.modules.get("sae_lens_t5gemma_cli"), "DEFER_REGISTRATION", False):
    import_module("sae_lens_t5gemma.loading.registration").register()
