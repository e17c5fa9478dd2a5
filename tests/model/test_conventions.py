"""The encoder-decoder conventions and the position contract, on the tiny random T5Gemma 2.

Covers: ``prefix_lm`` (the default) equals transformers fed ``input_ids=tokens[:, :p]``,
``decoder_input_ids=[BOS] + tokens[:, p:]`` (loss, logits, encoder and decoder activations,
zeros where a stack computes nothing, ``loss_per_token`` layout); ``reconstruct`` puts the
decoder state that read token t at position t, so SAELens' token masks hit exactly the
positions that read BOS/EOS/PAD; ``covered_mask``; random and fixed splits and their errors;
the merged-attention split (z_self + z_cross == hook_z, patterns); the MLP and post-norm
sites; strict keywords; the covered-position eval against a direct computation.
"""

import pytest
import torch
from conftest import identity_sae
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_t5gemma.analysis.evaluation import evaluate_sae
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2, load_t5gemma2

N, P = 12, 5
BOS, EOS, PAD = 2, 1, 0


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HookedT5Gemma2:
    return load_t5gemma2(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    t = torch.randint(3, 512, (2, N), generator=g)
    t[:, 0] = BOS
    return t


@pytest.fixture()
def split(model):
    model.prefix_len = P
    yield P
    model.prefix_len = None
    model.convention = "prefix_lm"


def _hf_capture(model, paths: dict[str, str], **inputs) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    handles = [
        model.hf_model.get_submodule(p).register_forward_hook(lambda m, a, o, k=k: got.__setitem__(k, o))
        for k, p in paths.items()
    ]
    try:
        with torch.no_grad():
            got["logits"] = model.hf_model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return got


def test_prefix_lm_equals_transformers_on_prefix_and_continuation(model, tokens, split):
    assert model.convention == "prefix_lm"
    bos = torch.full((2, 1), BOS)
    with torch.no_grad():
        ref_loss = model.hf_model(
            input_ids=tokens[:, :P],
            decoder_input_ids=torch.cat([bos, tokens[:, P:-1]], 1),
            labels=tokens[:, P:].contiguous(),
        ).loss
        loss = model(tokens, return_type="loss")
        logits, per_token = model(tokens, return_type="both", loss_per_token=True)
    assert torch.equal(loss, ref_loss)

    enc, dec = "encoder_blocks.1.attn.hook_out", "decoder_blocks.1.self_attn.hook_out"
    ref = _hf_capture(
        model,
        {
            "enc": "model.encoder.text_model.layers.1.self_attn.o_proj",
            "dec": "model.decoder.layers.1.self_attn.o_proj",
        },
        input_ids=tokens[:, :P],
        decoder_input_ids=torch.cat([bos, tokens[:, P:]], 1),
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[enc, dec])
    assert cache[enc].shape == cache[dec].shape == (2, N, 64)
    assert torch.equal(cache[enc][:, :P], ref["enc"]) and not cache[enc][:, P:].any()
    assert torch.equal(cache[dec][:, P - 1 :], ref["dec"]) and not cache[dec][:, : P - 1].any()
    # Logits [batch, n, vocab]: position t predicts token t + 1; the BOS state sits at p - 1.
    assert logits.shape == (2, N, 512)
    assert torch.equal(logits[:, P - 1 :], ref["logits"]) and not logits[:, : P - 1].any()
    # loss_per_token [batch, n - 1]: position t is the loss of predicting token t + 1.
    assert per_token.shape == (2, N - 1) and not per_token[:, : P - 1].any()
    hand = torch.nn.functional.cross_entropy(ref["logits"][1, 2], tokens[1, P + 2])
    torch.testing.assert_close(per_token[1, P + 1], hand)
    torch.testing.assert_close(per_token[:, P - 1 :].mean(), loss)


def test_default_split_is_half_and_random_split_is_recorded(model, tokens):
    assert model.split_point(N) == N // 2
    model.prefix_len = "random"
    try:
        seen = set()
        for _ in range(6):
            with torch.no_grad():
                model(tokens, return_type=None)
            seen.add(model.last_prefix_len)
            mask = model.covered_mask(tokens, "encoder")
            assert int(mask[0].sum()) == model.last_prefix_len
        assert len(seen) > 1 and all(1 <= p <= N - 1 for p in seen)
    finally:
        model.prefix_len = None
    with pytest.raises(ValueError, match=r"prefix_len=20 is longer than the token batch \(12 positions\)"):
        model.prefix_len = 20
        model(tokens)
    model.prefix_len = None
    with pytest.raises(
        ValueError, match=r"prefix_len must be a positive int, None \(n // 2\) or 'random', not 0"
    ):
        model.prefix_len = 0
    with pytest.raises(ValueError, match="Unknown convention 'copy'"):
        model.convention = "copy"


def test_covered_mask(model, tokens, split):
    enc, dec = model.covered_mask(tokens, "encoder"), model.covered_mask(tokens, "decoder")
    assert enc[0].tolist() == [True] * P + [False] * (N - P)
    assert dec[0].tolist() == [False] * P + [True] * (N - P)
    model.convention = "reconstruct"
    assert model.covered_mask(tokens, "decoder").all()


@pytest.mark.parametrize("convention", ["reconstruct", "prefix_lm"])
def test_decoder_position_t_reads_token_t(model, split, convention):
    """A packed batch with BOS, EOS and PAD inside: SAELens' token mask hits exactly the decoder
    positions whose state read a special token (resid_pre of layer 0 is the embedding read)."""
    from sae_lens.util import get_special_token_ids

    model.convention = convention
    tokens = torch.tensor([[BOS, 11, 12, 13, EOS, BOS, 14, 15, 16, 17, PAD, PAD]])
    name = "decoder_blocks.0.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[name])
        embedded = model.hf_model.get_decoder().embed_tokens(tokens)
    special = torch.isin(tokens, torch.tensor(list(get_special_token_ids(model.tokenizer))))
    assert special[0].nonzero().flatten().tolist() == [0, 4, 5, 10, 11]
    covered = model.covered_mask(tokens, "decoder")
    torch.testing.assert_close(cache[name][covered], embedded[covered], rtol=0, atol=0)
    if convention == "prefix_lm":
        bos_state = model.hf_model.get_decoder().embed_tokens(torch.tensor([[BOS]]))
        torch.testing.assert_close(cache[name][:, P - 1], bos_state[:, 0], rtol=0, atol=0)


def test_merged_attention_split(model, tokens, split):
    names = [
        "decoder_blocks.1.self_attn.hook_z",
        "decoder_blocks.1.self_attn.hook_z_self",
        "decoder_blocks.1.self_attn.hook_z_cross",
        "decoder_blocks.1.self_attn.hook_pattern",
        "decoder_blocks.1.self_attn.hook_cross_pattern",
    ]
    with torch.no_grad():
        _, plain = model.run_with_cache(tokens, names_filter=names[:1])
        _, cache = model.run_with_cache(tokens, names_filter=names)
    z, z_self, z_cross, pat, cross = (cache[n] for n in names)
    torch.testing.assert_close(z_self + z_cross, plain[names[0]], rtol=0, atol=1e-5)
    assert z_self.shape == z_cross.shape == (2, N, 4, 16)
    assert pat.shape == cross.shape == (2, 4, N, N)  # [batch, head, query, key] in batch positions
    total = pat.sum(-1) + cross.sum(-1)
    torch.testing.assert_close(total[:, :, P - 1 :], torch.ones(2, 4, N - P + 1), rtol=0, atol=1e-5)
    assert not cross[..., P:].any()  # the encoder read only the prefix
    assert not pat[:, :, P - 1 :, : P - 1].any()  # decoder keys start at the BOS state
    # An edit of the cross part flows on: ablating it changes the decoder output.
    with torch.no_grad():
        clean = model(tokens)
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(names[2], lambda x, hook: torch.zeros_like(x))])
    assert (clean - ablated)[:, P - 1 :].abs().max() > 1e-4


def test_mlp_and_post_norm_sites_equal_the_modules(model, tokens, split):
    layer = "model.decoder.layers.1"
    got: dict[str, torch.Tensor] = {}
    hooks = [
        model.hf_model.get_submodule(f"{layer}.mlp.down_proj").register_forward_pre_hook(
            lambda m, a: got.__setitem__("post", a[0])
        ),
        model.hf_model.get_submodule(f"{layer}.post_feedforward_layernorm").register_forward_hook(
            lambda m, a, o: got.__setitem__("normed", o)
        ),
    ]
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(
                tokens, names_filter=["decoder.1.mlp_post", "decoder_blocks.1.hook_mlp_out_normed"]
            )
    finally:
        for h in hooks:
            h.remove()
    assert cache["decoder_blocks.1.mlp.hook_post"].shape == (2, N, 128)  # d_mlp wide
    assert torch.equal(cache["decoder_blocks.1.mlp.hook_post"][:, P - 1 :], got["post"])
    assert torch.equal(cache["decoder_blocks.1.hook_mlp_out_normed"][:, P - 1 :], got["normed"])


def test_unknown_keywords_raise(model, tokens):
    with pytest.raises(
        TypeError, match=r"HookedT5Gemma2.forward\(\) got unexpected keyword\(s\) \['bogus_keyword'\]"
    ):
        model(tokens, bogus_keyword=123)
    with pytest.raises(
        TypeError, match=r"HookedT5Gemma2.generate\(\) got unexpected keyword\(s\) \['num_beam'\]"
    ):
        model.generate(tokens, num_beam=2)
    with pytest.raises(TypeError, match="'hf_kwargs'"):
        model.run_with_cache(tokens, output_attentions=True)


def _sae(hook: str, seed: int) -> StandardSAE:
    cfg = StandardSAEConfig(
        d_in=64, d_sae=96, apply_b_dec_to_input=False, metadata=SAEMetadata(hook_name=hook)
    )
    sae = StandardSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 96, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(96, 64, generator=g) * 0.1)
        sae.b_enc.copy_(torch.randn(96, generator=g) * 0.05)
    return sae


@pytest.mark.parametrize("hook", ["encoder_blocks.1.attn.hook_out", "decoder_blocks.0.hook_resid_post"])
def test_covered_position_eval_equals_direct_computation(model, tokens, split, hook):
    sae = _sae(hook, 3)
    stack = hook.split("_")[0]
    metrics = evaluate_sae(model, sae, [tokens])
    with torch.no_grad():
        (clean_logits, clean_loss), cache = model.run_with_cache(
            tokens, names_filter=[hook], return_type="both", loss_per_token=True
        )
        keep = model.covered_mask(tokens, stack) & (tokens != BOS)
        x = cache[hook][keep]
        f = sae.encode(x)
        r = sae.decode(f)
        recon = cache[hook].clone()
        recon[keep] = r
        sae_loss = model.run_with_hooks(
            tokens, fwd_hooks=[(hook, lambda a, hook: recon)], return_type="loss", loss_per_token=True
        )
        abl = torch.where(keep[..., None], 0.0, cache[hook])
        abl_loss = model.run_with_hooks(
            tokens, fwd_hooks=[(hook, lambda a, hook: abl)], return_type="loss", loss_per_token=True
        )
    assert metrics["n_tokens"] == int(keep.sum()) == (P - 1 if stack == "encoder" else N - P) * 2
    ev = 1 - ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert metrics["explained_variance"] == pytest.approx(float(ev), rel=1e-4)
    assert metrics["mse"] == pytest.approx(float(((x - r) ** 2).sum(-1).mean()), rel=1e-5)
    assert metrics["l0"] == pytest.approx(float((f > 0).sum(-1).float().mean()), rel=1e-6)
    scored = torch.zeros(2, N - 1, dtype=torch.bool)
    scored[:, P - 1 :] = True  # predictions of tokens[:, p:], the continuation
    assert metrics["n_predictions"] == int(scored.sum())
    ce, ce_sae, ce_abl = (float(v[scored].mean()) for v in (clean_loss, sae_loss, abl_loss))
    assert metrics["ce_loss_without_sae"] == pytest.approx(ce, rel=1e-5)
    assert metrics["ce_loss_with_sae"] == pytest.approx(ce_sae, rel=1e-5)
    assert metrics["ce_loss_score"] == pytest.approx((ce_abl - ce_sae) / (ce_abl - ce), rel=1e-4)
    assert metrics["ce_increase"] == pytest.approx(ce_sae - ce, abs=1e-5)


def test_steering_reports_the_change_that_reaches_the_residual(model, tokens, split):
    hook = "encoder_blocks.1.attn.hook_out"
    sae = _sae(hook, 5)
    feats = [1, 2, 3]
    layer = model.hf_model.get_submodule("model.encoder.text_model.layers.1")
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=2)
        with model.steer(sae, feats, add=2.0) as report:
            model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=2)
        x = clean[hook][:, :P]
        delta = 2.0 * sae.W_dec[feats].sum(0)
        reached = layer.post_self_attn_layernorm(x + delta) - layer.post_self_attn_layernorm(x)
    assert report.path == "post_self_attn_layernorm(o_proj output)"
    site, res = report.site[0], report.residual[0]
    assert site.shape == (2, N) and not site[:, P:].any()  # positions the encoder did not compute
    torch.testing.assert_close(site[:, :P], delta.norm().expand(2, P), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[:, :P], reached.norm(dim=-1), rtol=1e-4, atol=1e-6)
    summary = report.summary()
    assert summary["positions"] == 2 * P and summary["runs"] == 1
    assert summary["residual_over_site"] == pytest.approx(
        float(res[:, :P].mean() / site[:, :P].mean()), rel=1e-5
    )
    # At the residual stream itself nothing stands in between: the ratio is exactly 1.
    resid = "encoder_blocks.1.hook_resid_post"
    with torch.no_grad(), model.steer(_sae(resid, 6), feats, add=2.0) as report:
        model.run_with_cache(tokens, names_filter=[resid], stop_at_layer=2)
    assert report.summary()["residual_over_site"] == pytest.approx(1.0)


def test_top_features_under_prefix_lm(model, split):
    from sae_lens_t5gemma.model.steering import top_features

    text = "The cat sat on the mat and then the dog came."
    tokens = model.to_tokens(text)
    n = tokens.shape[1]
    dec = top_features(model, _sae("decoder_blocks.1.hook_resid_post", 8), text, k=2, per_token=True)
    assert sorted({r.position for r in dec}) == list(range(P, n))  # the continuation only
    enc_sae = _sae("encoder_blocks.1.hook_resid_post", 8)
    enc = top_features(model, enc_sae, text, k=2, per_token=True)
    assert sorted({r.position for r in enc}) == list(range(P))  # the one rule: the convention's prefix
    with model.fed(prefix_len=n):  # said explicitly: the encoder reads the whole text
        whole = top_features(model, enc_sae, text, k=2, per_token=True)
    assert sorted({r.position for r in whole}) == list(range(n))
    assert model.prefix_len == P  # restored


def test_one_rule_for_a_prompt_and_a_cache_that_says_what_is_real(model, split):
    """Issue 19, item 7: ``run_with_cache`` and ``top_features`` read a prompt by the same rule
    (the model's convention), and ``cache[encoder_hook][:, -1]`` under ``prefix_lm`` cannot be
    read without a visible warning; with the encoder reading the whole prompt it is the last
    token's state, and no warning is given."""
    import warnings

    from sae_lens_t5gemma.model.cache import UncoveredPositionsWarning
    from sae_lens_t5gemma.model.steering import top_features

    text = "The cat sat on the mat and then the dog came."
    enc, dec = "encoder_blocks.1.hook_resid_post", "decoder_blocks.1.hook_resid_post"
    n = model.to_tokens(text).shape[1]
    _, cache = model.run_with_cache(text, names_filter=[enc, dec])
    with pytest.warns(
        UncoveredPositionsWarning,
        match=r"cache\[.encoder_blocks.1.hook_resid_post.\]: under prefix_lm \(p = 5\) the encoder reads part",
    ):
        last = cache[enc][:, -1]
    assert (last == 0).all()
    assert cache.covered_mask(enc)[0].tolist() == [t < P for t in range(n)]
    assert cache.covered_mask(dec)[0].tolist() == [t >= P for t in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache[enc]  # once per key
        with model.fed(prefix_len=n):
            _, whole = model.run_with_cache(text, names_filter=[enc])
        assert whole.covered_mask(enc).all() and (whole[enc][:, -1] != 0).any()
        sae = _sae(enc, 8)
        rows = top_features(model, sae, text, k=3)  # the package reads caches with the mask: no warning
    feats = sae.encode(cache.cache_dict[enc][0]) * cache.covered_mask(enc)[0, :, None]
    d_sae = sae.cfg.d_sae
    assert [(r.position, r.feature) for r in rows] == [
        divmod(int(i), d_sae) for i in feats.flatten().topk(3).indices
    ]


def test_fed_runs_a_block_under_another_feeding_and_restores(model, tokens, split):
    with model.fed("reconstruct", prefix_len=None) as m:
        assert (m.convention, m.prefix_len) == ("reconstruct", None)
        assert model.covered_mask(tokens, "encoder").all()
    assert (model.convention, model.prefix_len) == ("prefix_lm", P)
    with pytest.raises(RuntimeError, match="boom"), model.fed(prefix_len=N):
        assert model.covered_mask(tokens, "encoder").all()  # the encoder reads the whole row
        raise RuntimeError("boom")
    assert (model.convention, model.prefix_len) == ("prefix_lm", P)
    with pytest.raises(ValueError, match="Unknown convention 'copy'"), model.fed("copy"):
        pass
    assert model.convention == "prefix_lm"


@pytest.mark.parametrize("hook", ["encoder_blocks.1.attn.hook_out", "decoder_blocks.1.self_attn.hook_out"])
def test_random_split_is_held_for_every_forward_of_a_batch(tiny_model_dir, tokens, hook):
    """Issue 19, item 1: one split per batch for its masks and its clean, spliced and ablated
    forwards. An exact identity SAE (relu(x) - relu(-x)) then changes nothing: CE increase 0,
    CE score 1, l2 ratio 1. Before, each forward drew its own split (CE increase 2.62 nats)."""
    model = load_t5gemma2(tiny_model_dir, dtype=torch.float32, prefix_len="random")
    sae = identity_sae(hook, model.cfg.d_model, model_name="stand-in")
    splits = []
    real = model.run_with_hooks

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        splits.append(model.last_prefix_len)
        return out

    model.run_with_hooks = spy
    m = evaluate_sae(model, sae, [tokens, tokens.flip(0), tokens])  # a fresh model: no earlier forward
    assert len(splits) == 6 and splits[0::2] == splits[1::2]  # spliced and ablated share each split
    assert m["ce_increase"] == 0.0 and m["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["l2_ratio"] == pytest.approx(1.0, abs=1e-6) and m["explained_variance"] == pytest.approx(1.0)
    assert model.prefix_len == "random"  # the model's own setting comes back


def test_text_batches_pad_right_whatever_the_tokenizer_says(tiny_model_dir):
    """Issue 19, item 2 (the padding side): a tokenizer that pads left (transformers 5's
    GemmaTokenizer does) still gets right-padded rows, and the ids at padded positions change
    nothing the model reports at real positions."""
    model = load_t5gemma2(tiny_model_dir, dtype=torch.float32)
    model.tokenizer.padding_side = "left"
    texts = ["The cat sat on the mat because it was warm and quiet.", "A dog."]
    tokens, mask = model._tokenize(texts)
    assert mask[1].tolist() == sorted(mask[1].tolist(), reverse=True)  # 1s first: padded on the right
    assert tokens[1, 0].item() == BOS and (tokens[1][mask[1] == 0] == PAD).all()
    assert torch.equal(model.to_tokens(texts), tokens)
    with torch.no_grad():
        logits, loss = model(texts, return_type="both", loss_per_token=True)
        other = tokens.masked_fill(mask == 0, 77)  # other ids at the padded positions only
        logits2, loss2 = model(other, attention_mask=mask, return_type="both", loss_per_token=True)
    real = mask.bool()
    assert torch.equal(loss, loss2)
    torch.testing.assert_close(logits[real], logits2[real], rtol=0, atol=0)


def test_saelens_definitions_ablate_every_position(model, tokens, split):
    """Issue 19, item 9: ``definitions="saelens"`` zeroes the site at every position for the
    ablation (SAELens' run_evals), checked against a direct computation; reconstruction metrics
    and the CE with the SAE are the same as under the default."""
    hook = "encoder_blocks.1.attn.hook_out"
    meta = SAEMetadata(model_name="stand-in", hook_name=hook, prepend_bos=True)
    torch.manual_seed(3)
    sae = StandardSAE(
        StandardSAEConfig(d_in=model.cfg.d_model, d_sae=128, apply_b_dec_to_input=False, metadata=meta)
    )
    ours = evaluate_sae(model, sae, [tokens])
    theirs = evaluate_sae(model, sae, [tokens], definitions="saelens")
    for key in ("explained_variance", "l0", "ce_loss_without_sae", "ce_loss_with_sae", "n_predictions"):
        assert theirs[key] == pytest.approx(ours[key], rel=1e-6), key
    with torch.no_grad():
        _, loss = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))],
                                       return_type="both", loss_per_token=True)  # fmt: skip
    pred = model.covered_mask(tokens, "decoder")[:, 1:] & (tokens != BOS)[:, :-1]
    assert theirs["ce_loss_with_ablation"] == pytest.approx(float(loss[pred].mean()), rel=1e-5)
    assert theirs["ce_loss_with_ablation"] != pytest.approx(ours["ce_loss_with_ablation"], rel=1e-3)
    with pytest.raises(ValueError, match="definitions must be 'covered' or 'saelens', not 'gemma'"):
        evaluate_sae(model, sae, [tokens], definitions="gemma")


def test_single_stack_cache_helpers_say_what_to_use(model, tokens):
    """Issue 19, Deliver 7 (in part): TransformerLens' helpers failed deep inside (KeyError,
    AttributeError); they now raise one clear error naming the per-stack alternative."""
    _, cache = model.run_with_cache(tokens, names_filter=["encoder_blocks.0.hook_resid_post"])
    for call in (cache.accumulated_resid, cache.decompose_resid, cache.stack_head_results):
        with pytest.raises(
            NotImplementedError, match=r"is not supported for T5Gemma 2: .* encoder and a decoder"
        ):
            call()
    with pytest.raises(
        KeyError, match=r"cache\['encoder_blocks.5.hook_resid_post'\] or cache\['decoder_blocks.5"
    ):
        cache["resid_post", 5]
    assert cache["encoder_blocks.0.hook_resid_post"].shape[:2] == tokens.shape


@pytest.mark.parametrize("prefix_len", [None, "random"])
def test_padded_rows_are_split_each_at_its_own_length(tiny_model_dir, tokens, prefix_len):
    """Issue 19, item 2 (the split): a padded row is split at its own length (``L // 2``, or the
    batch's random draw scaled to the row), the decoder gets its attention mask, and every row
    reads as it reads alone: activations at covered positions and the loss per token equal the
    one-row run (float32, 1e-5), whatever ids sit at the padded positions. Before, a 7-token row
    in a 12-wide batch was split at 6 (n // 2 of the padded width) and kept one continuation token."""
    model = load_t5gemma2(tiny_model_dir, dtype=torch.float32, prefix_len=prefix_len)
    hooks = [
        "encoder_blocks.1.hook_resid_post",
        "decoder_blocks.1.hook_resid_post",
        "decoder_blocks.0.self_attn.hook_pattern",
    ]
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0
    padded = tokens.masked_fill(mask == 0, PAD)
    with model.held_split(padded, mask) as held:
        splits = model.splits(padded, mask)
        loss, cache = model.run_with_cache(padded, attention_mask=mask, names_filter=hooks,
                                           return_type="loss", loss_per_token=True)  # fmt: skip
        other, _ = model.run_with_cache(padded.masked_fill(mask == 0, 77), attention_mask=mask,
                                        names_filter=hooks, return_type="loss", loss_per_token=True)  # fmt: skip
        enc, dec = model.covered_mask(padded, "encoder", mask), model.covered_mask(padded, "decoder", mask)
    if prefix_len is None:
        assert splits.tolist() == [6, 3]
    else:
        assert held.tolist() == splits.tolist() and 1 <= splits[1] < 7
    assert enc.sum(1).tolist() == splits.tolist()
    assert (dec & mask.bool()).sum(1).tolist() == [N - int(splits[0]), 7 - int(splits[1])]
    assert torch.equal(loss, other)
    for row, length in ((0, N), (1, 7)):
        with model.fed(prefix_len=int(splits[row])):
            alone, solo = model.run_with_cache(tokens[row : row + 1, :length], names_filter=hooks,
                                               return_type="loss", loss_per_token=True)  # fmt: skip
        torch.testing.assert_close(loss[row, : length - 1], alone[0], rtol=1e-5, atol=1e-6)
        for h in hooks[:2]:
            stack = h.split("_")[0]
            keep = (enc if stack == "encoder" else dec)[row, :length]
            torch.testing.assert_close(cache[h][row, :length][keep], solo[h][0][keep], rtol=1e-5, atol=1e-5)
            p, pos = int(splits[row]), torch.arange(length)
            outside = pos >= p if stack == "encoder" else pos < p - 1  # the decoder's BOS state sits at p - 1
            assert (cache[h][row, :length][outside] == 0).all() and not (
                cache[h][row, :length][~outside] == 0
            ).all()
        torch.testing.assert_close(cache[hooks[2]][row, :, p:length, p - 1 : length],
                                   solo[hooks[2]][0, :, p:, p - 1 :], rtol=1e-5, atol=1e-6)  # fmt: skip


def test_evaluate_sae_reads_padded_rows_through_their_mask(tiny_model_dir, tokens):
    """Issue 19, item 2 (evaluate_sae): ``(tokens, attention_mask)`` batches. Padding is read by
    no stack and scored nowhere, so the ids at padded positions change nothing (exact), and the
    short row is scored as it is alone (its own split)."""
    model = load_t5gemma2(tiny_model_dir, dtype=torch.float32)
    hook = "encoder_blocks.1.attn.hook_out"
    meta = SAEMetadata(model_name="stand-in", hook_name=hook, prepend_bos=True)
    torch.manual_seed(3)
    sae = StandardSAE(
        StandardSAEConfig(d_in=model.cfg.d_model, d_sae=64, apply_b_dec_to_input=False, metadata=meta)
    )
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0
    padded = tokens.masked_fill(mask == 0, PAD)
    got = evaluate_sae(model, sae, [(padded, mask)])
    other = evaluate_sae(model, sae, [(padded.masked_fill(mask == 0, 77), mask)])
    assert got == other
    alone = [evaluate_sae(model, sae, [tokens[:1]]), evaluate_sae(model, sae, [tokens[1:, :7]])]
    assert got["n_tokens"] == sum(a["n_tokens"] for a in alone) == (N // 2 - 1) + (7 // 2 - 1)
    assert got["n_predictions"] == sum(a["n_predictions"] for a in alone) == (N - N // 2) + (7 - 7 // 2)
    ce = sum(a["ce_loss_with_sae"] * a["n_predictions"] for a in alone) / got["n_predictions"]
    assert got["ce_loss_with_sae"] == pytest.approx(ce, rel=1e-5)


def test_exclude_special_tokens_follows_each_rows_own_split(tiny_model_dir, tokens):
    """The special-token bypass is laid out row by row when rows are split each at its own
    length: a padded batch with the SAE spliced reads, row by row, as each row alone (1e-5),
    and at the row's special token the SAE is bypassed."""
    model = load_t5gemma2(tiny_model_dir, dtype=torch.float32)
    hook = "decoder_blocks.1.hook_resid_post"
    meta = SAEMetadata(model_name="stand-in", hook_name=hook, prepend_bos=True)
    torch.manual_seed(5)
    sae = StandardSAE(
        StandardSAEConfig(d_in=model.cfg.d_model, d_sae=64, apply_b_dec_to_input=False, metadata=meta)
    )
    toks = tokens.clone()
    toks[1, 5] = EOS  # a special token in the short row's continuation (its split is 3)
    mask = torch.ones_like(toks)
    mask[1, 7:] = 0
    padded = toks.masked_fill(mask == 0, PAD)
    out = f"{hook}.hook_sae_output"
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(
            padded, saes=[sae], attention_mask=mask, exclude_special_tokens=True
        )
        splits = model.last_splits
        assert splits.tolist() == [6, 3]
        for row, length in ((0, N), (1, 7)):
            with model.fed(prefix_len=int(splits[row])):
                _, alone = model.run_with_cache_with_saes(
                    toks[row : row + 1, :length], saes=[sae], exclude_special_tokens=True
                )
            p = int(splits[row])
            torch.testing.assert_close(
                cache.cache_dict[out][row, p:length], alone.cache_dict[out][0, p:], rtol=1e-5, atol=1e-5
            )
        bypassed = cache.cache_dict[out][1, 5]
        torch.testing.assert_close(bypassed, cache.cache_dict[f"{hook}.hook_sae_input"][1, 5])
