"""What docs/recipes.md says fails in nnsight still fails, so the page is updated when nnsight fixes it.

The recipes' code blocks themselves (nnsight on the transformers model under the ``prefix_lm``
split, SAEs on SAELens' ``SAETransformerBridge``) run with every other page's blocks in
``tests/integration/test_readme.py``, which also checks what they compute.
"""

from __future__ import annotations

import pytest


def test_nnsight_failures_named_in_the_recipe(tiny_model_dir):
    pytest.importorskip("nnsight")
    from nnsight.modeling.transformers import TransformersModel

    with pytest.raises(
        ValueError, match=r"Unrecognized configuration class .*T5Gemma2Config.* AutoModelForCausalLM"
    ):
        TransformersModel(str(tiny_model_dir), task="text-generation")
