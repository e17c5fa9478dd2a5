"""The recipes in docs/recipes.md, run as they stand on the tiny offline stand-in.

nnsight: ``NNsight`` on the transformers model with explicit ``input_ids`` and
``decoder_input_ids`` under the ``prefix_lm`` split, with the module found from the SAE's
``metadata.hf_hook_name``, gives exactly ``HookedT5Gemma2``'s decoder activations (checked
inside the recipe), and a trailing ``.input``/``.output`` in that name picks the side. The
failures the recipe names (``LanguageModel(automodel=...)``, ``TransformersModel(task=
"text-generation")``) are checked too, so the page is updated when nnsight fixes them.
TransformerBridge: mindchain SAEs converted by this package attach to SAELens'
``SAETransformerBridge`` by their ``hook_name`` unchanged and give the same feature
activations as on ``HookedT5Gemma2`` under ``reconstruct``, the decoder input the bridge uses.
"""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def recipe(name: str) -> str:
    m = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", RECIPES.read_text(), re.S)
    assert m, f"no '{name}' recipe in {RECIPES}"
    return m.group(1)


def run_recipe(name: str, model_dir: Path) -> dict:
    namespace = {"MODEL": str(model_dir)}
    source, filename = recipe(name), f"{RECIPES}:{name}"
    # nnsight reads the body of a ``with trace`` block back from its source: register it.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102
    return namespace


def test_nnsight_recipe_matches_hooked_activations(hub_cache, tiny_model_dir):
    pytest.importorskip("nnsight")
    ns = run_recipe("nnsight", tiny_model_dir)
    model, tokens, p, acts = ns["model"], ns["tokens"], ns["p"], ns["acts"]
    assert acts.shape == (1, tokens.shape[1] - p + 1, model.cfg.d_model)
    assert ns["features"].shape == (1, tokens.shape[1] - p + 1, ns["sae"].cfg.d_sae)
    # The same helper reads module inputs: the o_proj input is hook_z, flattened.
    from nnsight import NNsight

    traced = NNsight(model.hf_model)
    with torch.no_grad(), traced.trace(input_ids=tokens, decoder_input_ids=tokens):  # reconstruct
        z = ns["nnsight_site"](traced.model, "encoder.text_model.layers.1.self_attn.o_proj.input").save()
        out = ns["nnsight_site"](traced.model, "encoder.text_model.layers.1.self_attn.o_proj.output").save()
    model.convention = "reconstruct"
    try:
        _, cache = model.run_with_cache(
            tokens, names_filter=["encoder_blocks.1.attn.hook_z", "encoder_blocks.1.attn.hook_out"]
        )
    finally:
        model.convention = "prefix_lm"
    assert torch.equal(z, cache["encoder_blocks.1.attn.hook_z"].flatten(-2))
    assert torch.equal(out, cache["encoder_blocks.1.attn.hook_out"])


def test_nnsight_failures_named_in_the_recipe(tiny_model_dir):
    pytest.importorskip("nnsight")
    from nnsight.modeling.transformers import TransformersModel

    with pytest.raises(
        ValueError, match=r"Unrecognized configuration class .*T5Gemma2Config.* AutoModelForCausalLM"
    ):
        TransformersModel(str(tiny_model_dir), task="text-generation")


def test_bridge_recipe_attaches_converted_saes_by_hook_name(hub_cache, tiny_model_dir):
    ns = run_recipe("bridge", tiny_model_dir)
    bridge, saes = ns["bridge"], ns["saes"]
    assert [s.cfg.metadata.hook_name for s in saes] == [
        "encoder_blocks.1.attn.hook_out",
        "decoder_blocks.1.self_attn.hook_out",
    ]
    assert bridge.acts_to_saes == {}  # run_with_cache_with_saes removed them again
    # The bridge's decoder read the tokens as they are: T5Gemma 2 has no decoder_start_token_id.
    assert getattr(bridge.original_model.config, "decoder_start_token_id", None) is None
    assert (ns["on_bridge"][ns["names"][1]] > 0).any()
