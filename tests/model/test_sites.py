"""The site table (``model/sites.py``) and what is derived from it.

Covers: a hook name with the other stack's attention part (``decoder_blocks.5.attn...``,
``encoder_blocks.5.self_attn...``) is refused naming the right one, through ``sites.resolve`` and
``HookedT5Gemma2.canonical_name``; one site width (``sites.site_width``) for the model, SAE
splicing and the comparison, per stack, on a stand-in whose encoder and decoder have different
head counts; the Gemma 3 / TransformerLens names; ``import sae_lens_t5gemma.model.hooked`` loads
neither ``model.steering`` nor transformers' attention patch (both come when first used).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import identity_sae
from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration

from sae_lens_t5gemma.comparison import harness, models
from sae_lens_t5gemma.model import sites
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
from sae_lens_t5gemma.model.sae_fit import check_sae_fits
from sae_lens_t5gemma.stand_in import synthetic

ENC_HEADS, DEC_HEADS, D_HEAD = 2, 4, 16  # the tiny stand-in has 4 heads of 16 in both stacks


@pytest.mark.parametrize(
    ("wrong", "right"),
    [
        ("decoder_blocks.5.attn.hook_out", "decoder_blocks.5.self_attn.hook_out"),
        ("decoder_blocks.1.attn.hook_z", "decoder_blocks.1.self_attn.hook_z"),
        ("encoder_blocks.5.self_attn.hook_out", "encoder_blocks.5.attn.hook_out"),
        ("encoder_blocks.0.self_attn.hook_pattern", "encoder_blocks.0.attn.hook_pattern"),
    ],
)
def test_wrong_stack_part_names_the_right_hook(wrong: str, right: str) -> None:
    with pytest.raises(ValueError, match=rf"Did you mean '{right}'\?") as err:
        sites.resolve(wrong, n_layers=18)
    assert sites.resolve(right, n_layers=18).hook_name == right
    assert "attention is" in str(err.value)


def test_wrong_stack_part_on_the_model(tiny_model_dir) -> None:
    model = HookedT5Gemma2(
        T5Gemma2ForConditionalGeneration.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    with pytest.raises(ValueError, match=r"Did you mean 'decoder_blocks\.1\.self_attn\.hook_out'\?"):
        model.canonical_name("decoder_blocks.1.attn.hook_out")
    # A site the other stack does not have at all gets the close-match list, not a wrong offer.
    with pytest.raises(ValueError, match="Close matches") as err:
        model.canonical_name("encoder_blocks.1.self_attn.hook_z_cross")
    assert "Did you mean" not in str(err.value)


@pytest.fixture(scope="module")
def two_head_counts(tiny_model_dir) -> HookedT5Gemma2:
    """The tiny stand-in with 2 encoder heads and 4 decoder heads (T5Gemma 2 allows it)."""
    config = synthetic.t5gemma2_config()
    config.encoder.text_config.num_attention_heads = ENC_HEADS
    config.encoder.text_config.num_key_value_heads = 1
    torch.manual_seed(0)
    hf_model = T5Gemma2ForConditionalGeneration(config).eval()
    return HookedT5Gemma2(hf_model, AutoTokenizer.from_pretrained(tiny_model_dir), convention="reconstruct")


@pytest.mark.parametrize(
    ("hook", "width"),
    [
        ("encoder_blocks.1.attn.hook_z", ENC_HEADS * D_HEAD),
        ("decoder_blocks.1.self_attn.hook_z", DEC_HEADS * D_HEAD),
        ("decoder_blocks.1.self_attn.hook_z_cross", DEC_HEADS * D_HEAD),
        ("decoder_blocks.0.self_attn.hook_z_self", DEC_HEADS * D_HEAD),
        ("encoder.0.attn_out", 64),
        ("decoder_blocks.1.mlp.hook_post", 128),
    ],
)
def test_one_site_width_for_model_splicing_and_comparison(two_head_counts, hook, width) -> None:
    model = two_head_counts
    assert sites.site_width(model, hook) == width
    # The comparison reads the same function (no second rule with the decoder's head count).
    assert harness.site_width is sites.site_width
    assert not hasattr(models, "site_width")
    # The activation really is that wide, and an SAE of that width splices there.
    name = model.canonical_name(hook)
    _, cache = model.run_with_cache(torch.randint(3, 500, (1, 6)), names_filter=[name])
    assert cache[name].flatten(2).shape[-1] == width
    assert check_sae_fits(model, identity_sae(name, width)) == name
    with pytest.raises(ValueError, match=f"{width} wide"):
        check_sae_fits(model, identity_sae(name, width + 1))


def test_attention_patterns_have_no_width(two_head_counts) -> None:
    with pytest.raises(ValueError, match="attention probabilities"):
        sites.site_width(two_head_counts, "decoder_blocks.0.self_attn.hook_cross_pattern")


def test_transformer_lens_names_for_gemma3() -> None:
    assert sites.tl_site_key("blocks.3.attn.hook_z") == "attn_z"
    with pytest.raises(ValueError, match="blocks.<layer>"):
        sites.tl_site_key("blocks.3.hook_q")
    for gs_site, suffix in sites.GEMMA_SCOPE_HOOKS.items():
        target = sites.transfer_hook(f"blocks.2.{suffix}")
        assert target is not None and sites.resolve(target).layer == 2, gs_site
    assert sites.transfer_hook("blocks.2.attn.hook_z", "decoder") is None  # merged self+cross attention


def test_importing_the_hooked_model_loads_no_steering_and_patches_nothing() -> None:
    code = (
        "import sys, transformers\n"
        "import sae_lens_t5gemma.model.hooked\n"
        "from sae_lens_t5gemma.model.routing import SPLIT_ATTENTION\n"
        "assert 'sae_lens_t5gemma.model.steering' not in sys.modules, 'steering imported'\n"
        "assert SPLIT_ATTENTION not in transformers.AttentionInterface._global_mapping, 'patched on import'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
