"""SAE splicing, feature steering and top features on HookedT5Gemma2 (tiny random model).

Covers: splicing with the error term leaves logits and generation unchanged; without it,
the model equals a hand-written replacement hook; the SAE's own hook points are cached;
the ``saes`` context restores the previous state; alias hook names; the d_in mismatch
error; the steering change equals ``(f' - f) @ W_dec`` computed by hand (scale, set, add,
ablate) and equals the same change made with a transformers hook; scale 1.0 is exactly a
no-op; strong steering changes ``generate()`` on encoder and decoder sites; top_features
rows equal a hand computation (decoder rows show the token the decoder read).
"""

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens.hook_points import HookPoint

from sae_lens_t5gemma.model.hooked import HookedT5Gemma2, load_t5gemma2
from sae_lens_t5gemma.model.steering import FeatureEdit, steering_delta, top_features

ENC = "encoder_blocks.1.attn.hook_out"
DEC = "decoder_blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HookedT5Gemma2:
    return load_t5gemma2(
        tiny_model_dir, dtype=torch.float32, convention="reconstruct"
    )  # references read the whole row


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(5))


def make_sae(hook: str, d_in: int = 64, d_sae: int = 128, seed: int = 0) -> StandardSAE:
    cfg = StandardSAEConfig(
        d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, metadata=SAEMetadata(hook_name=hook)
    )
    torch.manual_seed(seed)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.b_enc.uniform_(0.0, 0.05)  # keep plenty of features on, even for small activations
        sae.b_dec.normal_(0, 0.01)
    return sae


def test_splice_with_error_term_is_exact(model, tokens):
    sae = make_sae(ENC)
    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
        gen_clean = model.generate(tokens, max_new_tokens=5)
        with model.saes([sae, make_sae(DEC, seed=1)], use_error_term=True):
            gen_spliced = model.generate(tokens, max_new_tokens=5)
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen_spliced, gen_clean)


def test_splice_without_error_term_replaces_activation(model, tokens):
    sae = make_sae(DEC)
    with torch.no_grad():
        spliced = model.run_with_saes(tokens, saes=sae)
        by_hand = model.run_with_hooks(tokens, fwd_hooks=[(DEC, lambda x, hook: sae.decode(sae.encode(x)))])
        clean = model(tokens)
    assert torch.equal(spliced, by_hand)
    assert not torch.allclose(spliced, clean, atol=1e-3)


def test_cache_with_saes_holds_feature_acts(model, tokens):
    sae = make_sae(ENC)
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=[ENC], stop_at_layer=2)
        _, cache = model.run_with_cache_with_saes(
            tokens,
            saes=[sae],
            use_error_term=True,
            names_filter=[f"{ENC}.hook_sae_acts_post"],
            stop_at_layer=2,
        )
    acts = cache[f"{ENC}.hook_sae_acts_post"]
    assert acts.shape == (2, 10, 128)
    torch.testing.assert_close(acts, sae.encode(clean[ENC]))
    assert (acts > 0).float().mean() > 0.2


def test_saes_context_restores_state_and_aliases(model, tokens):
    first = make_sae("model.encoder.layers.1.self_attn.o_proj", seed=2)  # legacy HF path as hook_name
    second = make_sae(ENC, seed=3)
    original = model.mod_dict[ENC]
    model.add_sae(first)
    try:
        assert set(model.acts_to_saes) == {ENC} and model.acts_to_saes[ENC] is first
        with model.saes([second]):
            assert model.acts_to_saes[ENC] is second
        assert model.acts_to_saes[ENC] is first
        assert f"{ENC}.hook_sae_acts_post" in model.hook_dict
    finally:
        model.reset_saes("model.encoder.text_model.layers.1.self_attn.o_proj")
    assert model.acts_to_saes == {} and model.mod_dict[ENC] is original
    assert isinstance(model.hook_dict[ENC], HookPoint) and f"{ENC}.hook_sae_acts_post" not in model.hook_dict
    with pytest.raises(
        ValueError, match=r"No SAE is attached at encoder_blocks.0.attn.hook_out; attached: \[\]"
    ):
        model.reset_saes("encoder_blocks.0.attn.hook_out")


def test_d_in_mismatch_is_a_clear_error(model, tokens):
    with pytest.raises(
        ValueError,
        match=r"^SAE d_in=32 does not fit hook decoder_blocks.0.self_attn.hook_z \(from "
        r"'model.decoder.layers.0.self_attn.o_proj.input'\), whose activations are 64 wide.$",
    ):
        model.add_sae(make_sae("model.decoder.layers.0.self_attn.o_proj.input", d_in=32))
    with pytest.raises(ValueError, match=r"SAE d_in=640 does not fit hook encoder_blocks.1.attn.hook_out"):
        model.steer(make_sae(ENC, d_in=640), 0, scale=2.0).__enter__()
    with pytest.raises(ValueError, match="Unknown T5Gemma 2 hook name 'blocks.1.hook_resid_post'"):
        model.add_sae(make_sae("blocks.1.hook_resid_post"))


@pytest.mark.parametrize(
    "kwargs, edit",
    [
        (dict(scale=5.0), lambda f: f * 5.0),
        (dict(value=0.3), lambda f: torch.full_like(f, 0.3)),
        (dict(add=0.7), lambda f: f + 0.7),
        (dict(ablate=True), lambda f: torch.zeros_like(f)),
    ],
)
def test_steering_delta_matches_hand_computation(model, tokens, kwargs, edit):
    sae = make_sae(ENC)
    feats = [3, 17, 40]
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=[ENC], stop_at_layer=2)
        x = clean[ENC]
        f = x @ sae.W_enc + sae.b_enc
        f = torch.relu(f)
        expected = x + (edit(f[..., feats]) - f[..., feats]) @ sae.W_dec[feats]
        with model.steer(sae, feats, **kwargs):
            _, steered = model.run_with_cache(tokens, names_filter=[ENC], stop_at_layer=2)
            logits = model(tokens)
        o_proj = model.hf_model.get_submodule("model.encoder.text_model.layers.1.self_attn.o_proj")
        h = o_proj.register_forward_hook(lambda m, a, o: expected)
        try:
            ref_logits = model.hf_model(input_ids=tokens, decoder_input_ids=tokens).logits
        finally:
            h.remove()
    torch.testing.assert_close(steered[ENC], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered[ENC], x)


def test_scale_one_is_exactly_a_no_op(model, tokens):
    sae = make_sae(DEC)
    with torch.no_grad():
        clean, gen_clean = model(tokens), model.generate(tokens, max_new_tokens=5)
        with model.steer(sae, [0, 1, 2], scale=1.0):
            steered, gen_steered = model(tokens), model.generate(tokens, max_new_tokens=5)
    assert torch.equal(steered, clean) and torch.equal(gen_steered, gen_clean)
    x = torch.randn(2, 3, 64)
    assert torch.equal(steering_delta(sae, x, FeatureEdit.make([5], scale=1.0)), torch.zeros_like(x))


@pytest.mark.parametrize("hook", [ENC, DEC])
def test_strong_steering_changes_generation(model, tokens, hook):
    sae = make_sae(hook)
    with torch.no_grad():
        gen_clean = model.generate(tokens, max_new_tokens=6)
        with model.steer(sae, [7], add=100.0):
            gen_steered = model.generate(tokens, max_new_tokens=6)
    assert gen_steered.shape == gen_clean.shape
    assert not torch.equal(gen_steered, gen_clean)
    assert model.hook_dict[hook].fwd_hooks == []  # the context removed its hook


def test_steering_and_splicing_do_not_mix(model):
    sae = make_sae(ENC)
    with (
        model.saes([sae]),
        pytest.raises(ValueError, match="An SAE is spliced in at encoder_blocks.1.attn.hook_out"),
        model.steer(sae, 0, scale=2.0),
    ):
        pass
    with model.steer(sae, 0, scale=2.0), pytest.raises(ValueError, match="has hooks attached"):
        model.add_sae(sae)


def test_feature_edit_validation():
    with pytest.raises(
        ValueError, match=r"Give exactly one of scale=, value=, add= or ablate=True \(got none\)"
    ):
        FeatureEdit.make([1])
    with pytest.raises(ValueError, match=r"\(got \['scale', 'add'\]\)"):
        FeatureEdit.make([1], scale=2.0, add=1.0)
    sae = make_sae(ENC)
    with pytest.raises(ValueError, match=r"Feature index \[128\] out of range: the SAE has 128 features."):
        steering_delta(sae, torch.zeros(1, 2, 64), FeatureEdit.make([128], scale=2.0))


@pytest.mark.parametrize("hook", [ENC, DEC])
def test_top_features_rows(model, hook):
    sae = make_sae(hook)
    text = "The cat sat on the mat."
    rows = top_features(model, sae, text, k=5)
    tokens = model.to_tokens(text)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        feats = sae.encode(cache[hook][0])
    vals, idx = feats.flatten().topk(5)
    assert [(r.position, r.feature) for r in rows] == [divmod(i, 128) for i in idx.tolist()]
    torch.testing.assert_close(torch.tensor([r.activation for r in rows]), vals)
    strs = model.to_str_tokens(tokens[0])
    for r in rows:
        # The position contract: position t of either stack has just read token t.
        assert r.token == strs[r.position]
    per_token = top_features(model, sae, text, k=2, per_token=True)
    assert len(per_token) == 2 * tokens.shape[1]
    assert [r.position for r in per_token[:4]] == [0, 0, 1, 1]
