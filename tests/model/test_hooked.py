"""HookedT5Gemma2 on a tiny random T5Gemma 2: parity and mechanics.

Runs under the ``reconstruct`` convention (encoder and decoder read the same row), where
the reference is simply ``hf_model(input_ids=tokens, decoder_input_ids=tokens)``; the
``prefix_lm`` default and the position contract are covered in ``test_conventions.py``.

Covers: the hook points equal the site table; activations at every site kind (both stacks)
equal a plain transformers forward with PyTorch hooks and TransformerBridge's at the same
names; logits and loss equal transformers' (mean and per token); early-exit runs give the
same activations as full runs and do not run the decoder / LM head / deeper layers; alias
names (bridge alternates, both HF layouts, friendly); the unknown-name error; modifications
flow on at every site kind; text input with padding; generate; load_t5gemma2 errors.
"""

import copy

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

from sae_lens_t5gemma.model import sites as sites
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2, load_t5gemma2

N_LAYERS = 2


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HookedT5Gemma2:
    return load_t5gemma2(tiny_model_dir, dtype=torch.float32, convention="reconstruct")


def recon_labels(tokens: torch.Tensor) -> torch.Tensor:
    """transformers-layout labels of the reconstruct convention: position t predicts token t+1."""
    return torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)


def plain_names() -> list[str]:
    """Every site reached by a PyTorch hook on a module (not the attention internals)."""
    return [s.hook_name for s in sites.all_sites(N_LAYERS) if s.kind.hf_io != "internal"]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    # 12 > the tiny sliding window (8), so sliding and full layers differ; no pad id (0).
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 512, (2, 12), generator=g)


def reference_acts(
    hf_model, tokens: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Activations at every site from a plain transformers forward with PyTorch hooks."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for s in sites.all_sites(N_LAYERS):
        if s.kind.hf_io == "internal":
            continue
        module = hf_model.get_submodule(s.hf_module)
        if s.kind.hf_io == "output":
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, n=s.hook_name: acts.__setitem__(n, o.detach().clone())
                )
            )
        else:
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, n=s.hook_name: acts.__setitem__(n, a[0].detach().clone())
                )
            )
    try:
        with torch.no_grad():
            out = hf_model(input_ids=tokens, decoder_input_ids=tokens, labels=recon_labels(tokens))
    finally:
        for h in handles:
            h.remove()
    for name, x in acts.items():
        if name.endswith("hook_z"):
            acts[name] = x.view(*x.shape[:-1], 4, 16)
    return acts, out.logits, out.loss


def test_hook_points_are_the_site_table(model):
    # The stand-in's 1-layer SigLIP adds the vision sites (tests/analysis/test_images.py covers them).
    vision = {s.hook_name for s in sites.vision_sites(1)}
    assert set(model.hook_dict) == {s.hook_name for s in sites.all_sites(N_LAYERS)} | vision
    decoder_only = [k for k in sites.SITE_KINDS if k.encoder_hook is None]
    assert [k.friendly for k in decoder_only] == ["cross_pattern", "z_self", "z_cross"]
    n_text = 2 * N_LAYERS * len(sites.SITE_KINDS) - N_LAYERS * len(decoder_only)
    assert len(model.hook_dict) == n_text + len(vision)
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 64 and model.cfg.d_vocab == 512
    assert model.cfg.device == torch.device("cpu") and model.cfg.tokenizer_prepends_bos
    assert model.W_E.shape == (512, 64)
    assert model.encoder_blocks[1].attn.hook_out is model.hook_dict["encoder_blocks.1.attn.hook_out"]


def test_every_site_equals_plain_transformers(model, tokens):
    ref, ref_logits, ref_loss = reference_acts(model.hf_model, tokens)
    with torch.no_grad():
        (logits, loss), cache = model.run_with_cache(tokens, return_type="both", names_filter=plain_names())
    assert set(cache.keys()) == set(ref)
    for name, x in ref.items():
        assert torch.equal(cache[name], x), name
    assert cache["decoder_blocks.0.self_attn.hook_z"].shape == (2, 12, 4, 16)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(loss, ref_loss)


def test_every_site_equals_transformer_bridge(model, tokens, tiny_model_dir):
    bridge_model = copy.deepcopy(model.hf_model)  # the bridge rewires the model it wraps
    bridge = TransformerBridge.boot_transformers(
        str(tiny_model_dir), hf_model=bridge_model, tokenizer=model.tokenizer
    )
    decoder_input = tokens  # the reconstruct convention: the decoder reads the row as is
    kinds = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_out", "resid_post")
    names = [s.hook_name for s in sites.all_sites(N_LAYERS, kinds)]
    with torch.no_grad():
        bridge_logits, bridge_cache = bridge.run_with_cache(
            tokens, decoder_input=decoder_input, names_filter=names
        )
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    for name in names:
        torch.testing.assert_close(cache[name], bridge_cache[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(logits, bridge_logits, rtol=0, atol=1e-5)


def test_logits_and_loss_equal_transformers(model, tokens):
    with torch.no_grad():
        ref = model.hf_model(input_ids=tokens, decoder_input_ids=tokens, labels=recon_labels(tokens))
        logits = model(tokens)
        loss = model(tokens, return_type="loss")
        per_token = model(tokens, return_type="loss", loss_per_token=True)
        both = model(tokens, return_type="both", loss_per_token=True)
    assert torch.equal(logits, ref.logits) and torch.equal(loss, ref.loss)
    assert per_token.shape == (2, 11)  # [batch, n - 1]: position t predicts token t + 1
    torch.testing.assert_close(per_token.mean(), ref.loss)
    hand = torch.nn.functional.cross_entropy(ref.logits[1, 4], tokens[1, 5])
    torch.testing.assert_close(per_token[1, 4], hand)
    assert torch.equal(both[0], ref.logits) and torch.equal(both[1], per_token)
    assert model(tokens, return_type=None) is None


def test_explicit_decoder_inputs_and_labels(model, tokens):
    dec = torch.full((2, 5), 7)
    dec[:, 0] = 2
    labels = torch.randint(3, 512, (2, 5))
    labels[0, 2] = -100
    with torch.no_grad():
        ref = model.hf_model(input_ids=tokens, decoder_input_ids=dec, labels=labels)
        logits, loss = model(tokens, return_type="both", decoder_input_ids=dec, labels=labels)
        per_token = model(
            tokens, return_type="loss", loss_per_token=True, decoder_input_ids=dec, labels=labels
        )
        only_labels = model(tokens, return_type="loss", labels=labels)
        ref_only_labels = model.hf_model(input_ids=tokens, labels=labels).loss
    assert torch.equal(logits, ref.logits) and torch.equal(loss, ref.loss)
    assert per_token[0, 2] == 0
    torch.testing.assert_close(per_token.sum() / 9, ref.loss)
    assert torch.equal(only_labels, ref_only_labels)
    with pytest.raises(ValueError, match="A loss needs labels"):
        model(tokens, return_type="loss", decoder_input_ids=dec)


def _calls(model) -> tuple[dict[str, int], list]:
    """Count how often each layer / the LM head is entered."""
    counts: dict[str, int] = {}
    paths = {
        "enc0": "model.encoder.text_model.layers.0",
        "enc1": "model.encoder.text_model.layers.1",
        "dec0": "model.decoder.layers.0",
        "dec1": "model.decoder.layers.1",
        "lm_head": "lm_head",
    }
    handles = [
        model.hf_model.get_submodule(p).register_forward_pre_hook(
            lambda m, a, k=k: counts.__setitem__(k, counts.get(k, 0) + 1)
        )
        for k, p in paths.items()
    ]
    return counts, handles


@pytest.mark.parametrize(
    "names, ran, skipped",
    [
        (["encoder_blocks.0.attn.hook_out"], {"enc0"}, {"enc1", "dec0", "dec1", "lm_head"}),
        (["encoder_blocks.0.hook_resid_mid"], {"enc0"}, {"enc1", "dec0", "lm_head"}),
        (["encoder_blocks.1.hook_resid_post"], {"enc0", "enc1"}, {"dec0", "lm_head"}),
        (["decoder_blocks.0.self_attn.hook_z"], {"enc0", "enc1", "dec0"}, {"dec1", "lm_head"}),
        (
            ["decoder_blocks.0.hook_resid_post", "encoder_blocks.0.hook_resid_pre"],
            {"enc1", "dec0"},
            {"dec1", "lm_head"},
        ),
        (["decoder_blocks.1.mlp.hook_out"], {"enc1", "dec1"}, {"lm_head"}),
    ],
)
def test_early_exit_matches_full_run_and_skips_work(model, tokens, names, ran, skipped):
    with torch.no_grad():
        _, full = model.run_with_cache(tokens, names_filter=names)
        counts, handles = _calls(model)
        try:
            deepest = max(sites.resolve(n).layer for n in names)
            out, early = model.run_with_cache(tokens, names_filter=names, stop_at_layer=deepest + 1)
        finally:
            for h in handles:
                h.remove()
    assert out is None
    for n in names:
        assert torch.equal(early[n], full[n]), n
    assert ran <= set(counts), counts
    assert not (skipped & set(counts)), counts


def test_stop_at_layer_bounds_decoder_but_not_encoder(model, tokens):
    names = [
        "encoder_blocks.1.hook_resid_post",
        "decoder_blocks.0.hook_resid_pre",
        "decoder_blocks.1.hook_resid_pre",
    ]
    with torch.no_grad():
        _, full = model.run_with_cache(tokens, names_filter=names)
        _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=1)
    # The decoder needs the whole encoder, so encoder layer 1 still fires; decoder layer 1 does not.
    assert set(cache.keys()) == {"encoder_blocks.1.hook_resid_post", "decoder_blocks.0.hook_resid_pre"}
    assert torch.equal(cache["decoder_blocks.0.hook_resid_pre"], full["decoder_blocks.0.hook_resid_pre"])


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("model.encoder.text_model.layers.1.self_attn.o_proj", "encoder_blocks.1.attn.hook_out"),
        ("model.encoder.layers.1.self_attn.o_proj", "encoder_blocks.1.attn.hook_out"),
        ("encoder_blocks.1.attn.o.hook_out", "encoder_blocks.1.attn.hook_out"),
        ("model.decoder.layers.0.self_attn.o_proj.input", "decoder_blocks.0.self_attn.hook_z"),
        ("decoder_blocks.0.self_attn.o.hook_in", "decoder_blocks.0.self_attn.hook_z"),
        ("model.decoder.layers.1", "decoder_blocks.1.hook_resid_post"),
        ("decoder.1.mlp_out", "decoder_blocks.1.mlp.hook_out"),
    ],
)
def test_aliases_resolve_everywhere(model, tokens, alias, canonical):
    assert model.canonical_name(alias) == canonical
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[alias], stop_at_layer=2)
        _, as_dict = model.run_with_cache(
            tokens, names_filter=alias, stop_at_layer=2, return_cache_object=False
        )
        clean = model(tokens)
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(alias, lambda x, hook: torch.zeros_like(x))])
        _, by_canonical = model.run_with_cache(tokens, names_filter=[canonical], stop_at_layer=2)
    assert torch.equal(cache[alias], by_canonical[canonical])
    assert torch.equal(as_dict[alias], as_dict[canonical])
    assert not torch.allclose(zeroed, clean)


def test_unknown_hook_name_lists_close_matches(model, tokens):
    with pytest.raises(ValueError) as err:
        model.run_with_cache(tokens, names_filter=["encoder_blocks.1.atn.hook_out"])
    assert str(err.value).startswith(
        "Unknown T5Gemma 2 hook name 'encoder_blocks.1.atn.hook_out' (the model has 2 layers per stack). "
        "Close matches: ['encoder_blocks.1.attn.hook_out'"
    )
    with pytest.raises(
        ValueError, match=r"Unknown T5Gemma 2 hook name 'encoder_blocks.7.attn.hook_out' \(the model has 2"
    ):
        model.run_with_hooks(tokens, fwd_hooks=[("encoder_blocks.7.attn.hook_out", lambda x, hook: x)])
    with pytest.raises(ValueError) as err:
        model.run_with_cache(tokens, names_filter="encoder_blocks.1.hook_attn_out")
    assert str(err.value) == (
        "'encoder_blocks.1.hook_attn_out' is ambiguous: in TransformerBridge it is the output of the RMSNorm "
        "after the o_proj. Say which you mean: that post-norm output is 'encoder_blocks.1.hook_attn_out_normed'; "
        "the o_proj output itself (before that norm) is 'encoder_blocks.1.attn.hook_out'."
    )


def _hf_with_hook(model, tokens, path, fn, pre=False):
    module = model.hf_model.get_submodule(path)
    h = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        with torch.no_grad():
            return model.hf_model(input_ids=tokens, decoder_input_ids=tokens).logits
    finally:
        h.remove()


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_modifications_flow_on_at_every_kind(model, tokens, stack):
    delta = torch.randn(64, generator=torch.Generator().manual_seed(3))
    layers = "model.encoder.text_model.layers.1" if stack == "encoder" else "model.decoder.layers.1"
    add = lambda x, hook: x + delta.to(x.dtype)  # noqa: E731
    # Reference: the same change made with PyTorch hooks on the transformers modules.
    refs = {
        "resid_pre": (layers, lambda m, a: (a[0] + delta, *a[1:]), True),
        "attn_out": (f"{layers}.self_attn.o_proj", lambda m, a, o: o + delta, False),
        # resid_mid = residual + post-attn-norm output, so adding there adds to resid_mid.
        "resid_mid": (f"{layers}.post_self_attn_layernorm", lambda m, a, o: o + delta, False),
        "mlp_out": (f"{layers}.mlp", lambda m, a, o: o + delta, False),
        "resid_post": (layers, lambda m, a, o: o + delta, False),
        "attn_out_normed": (f"{layers}.post_self_attn_layernorm", lambda m, a, o: o + delta, False),
        "mlp_in": (f"{layers}.mlp", lambda m, a: (a[0] + delta,), True),
        "mlp_out_normed": (f"{layers}.post_feedforward_layernorm", lambda m, a, o: o + delta, False),
    }
    for kind, (path, fn, pre) in refs.items():
        name = sites.site(stack, 1, kind).hook_name
        with torch.no_grad():
            ours = model.run_with_hooks(tokens, fwd_hooks=[(name, add)])
        torch.testing.assert_close(
            ours, _hf_with_hook(model, tokens, path, fn, pre), rtol=1e-5, atol=1e-5, msg=kind
        )
    zdelta = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.run_with_hooks(
            tokens, fwd_hooks=[(sites.site(stack, 1, "attn_z").hook_name, lambda x, hook: x + zdelta)]
        )
    ref = _hf_with_hook(
        model, tokens, f"{layers}.self_attn.o_proj", lambda m, a: (a[0] + zdelta.flatten(),), pre=True
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_resid_mid_change_reaches_residual_and_mlp(model, tokens):
    """Adding d at resid_mid must shift resid_post by d plus the MLP's response, as in transformers."""
    delta = torch.full((64,), 0.5)
    name = "encoder_blocks.0.hook_resid_mid"
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(name, lambda x, hook: x + delta)]):
            _, cache = model.run_with_cache(
                tokens, names_filter=["encoder_blocks.0.hook_resid_post"], stop_at_layer=1
            )
        layer = model.hf_model.get_submodule("model.encoder.text_model.layers.0")
        _, clean = model.run_with_cache(tokens, names_filter=[name], stop_at_layer=1)
        mid = clean[name] + delta
        expected = mid + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(mid)))
    torch.testing.assert_close(cache["encoder_blocks.0.hook_resid_post"], expected, rtol=1e-5, atol=1e-6)


def test_text_input_pads_and_masks(model):
    texts = ["The cat sat on the mat.", "A dog"]
    tokens = model.to_tokens(texts)
    assert tokens[0, 0] == 2 and tokens[1, 0] == 2 and tokens[1, -1] == 0
    mask = (tokens != 0).long()
    labels = recon_labels(tokens.masked_fill(mask == 0, -100))
    with torch.no_grad():
        ref = model.hf_model(
            input_ids=tokens,
            attention_mask=mask,
            decoder_input_ids=tokens,
            decoder_attention_mask=mask,
            labels=labels,
        )
        logits, loss = model(texts, return_type="both")
    # Both stacks get the mask: equal to transformers given the same masks, everywhere.
    assert torch.equal(logits, ref.logits) and torch.equal(loss, ref.loss)
    assert model.to_tokens("The cat", prepend_bos=False)[0, 0] != 2
    assert model.to_string(model.to_tokens("The cat")[0]) == "<bos>The cat"
    assert "".join(model.to_str_tokens("The cat")) == "<bos>The cat"


def test_generate_matches_transformers_and_sees_hooks(model, tokens):
    with torch.no_grad():
        ref = model.hf_model.generate(input_ids=tokens, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(tokens, max_new_tokens=6)
    assert torch.equal(out, ref)
    seen = []
    with model.hooks(
        fwd_hooks=[("decoder_blocks.1.hook_resid_post", lambda x, hook: seen.append(x.shape[1]))]
    ):
        model.generate(tokens, max_new_tokens=3)
    assert seen == [1, 1, 1]  # first step reads BOS; then one new position per step (KV cache)
    text = model.generate("The cat", max_new_tokens=4)
    assert isinstance(text, str)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="wraps a transformers T5Gemma2ForConditionalGeneration, not Linear"):
        HookedT5Gemma2(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="Model folder .*missing does not exist"):
        load_t5gemma2(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="Could not load T5Gemma 2 model 'nobody/no-such-model'"):
        load_t5gemma2("nobody/no-such-model")


def test_backward_hooks_cache_gradients(model, tokens):
    name = "encoder_blocks.1.attn.hook_out"
    loss, cache = model.run_with_cache(tokens, names_filter=[name], return_type="loss", incl_bwd=True)
    grad = cache[f"{name}_grad"]
    assert grad.shape == (2, 12, 64) and grad.abs().sum() > 0
    # d loss / d attn_out by hand: the same forward with the o_proj output as a leaf.
    leaf = {}

    def make_leaf(m, a, o):
        leaf["x"] = o.detach().requires_grad_(True)
        return leaf["x"]

    h = model.hf_model.get_submodule(
        "model.encoder.text_model.layers.1.self_attn.o_proj"
    ).register_forward_hook(make_leaf)
    try:
        model.hf_model(
            input_ids=tokens, decoder_input_ids=tokens, labels=recon_labels(tokens)
        ).loss.backward()
    finally:
        h.remove()
        model.hf_model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grad, leaf["x"].grad)


def test_wrap_and_move_updates_cfg(model):
    from sae_lens_t5gemma.stand_in import synthetic as synthetic

    wrapped = HookedT5Gemma2(synthetic.build_t5gemma2(seed=3), model.tokenizer, model_name="tiny")
    assert wrapped.cfg.model_name == "tiny" and wrapped.cfg.dtype == torch.float32
    wrapped.to(torch.bfloat16)
    assert wrapped.cfg.dtype == torch.bfloat16 and wrapped.W_E.dtype == torch.bfloat16
    with torch.no_grad():
        _, cache = wrapped.run_with_cache(
            torch.tensor([[2, 5, 6]]), names_filter=["decoder_blocks.1.mlp.hook_out"]
        )
    assert cache["decoder_blocks.1.mlp.hook_out"].dtype == torch.bfloat16
