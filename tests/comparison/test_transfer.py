"""transfer.py and the controlled comparison's building blocks, offline on tiny stand-ins.

Covers: the streaming feature correlation against a direct ``torch.corrcoef``; ``ev_kept``'s
ratio (unclipped) and its undefined region; the causal-encoder control (on the stand-in, whose Gemma 3
holds the T5Gemma 2 encoder's weights, a causal encoder equals Gemma 3); ``feature_transfer``'s
EV, L0, norm ratio, norm-matched control and correlations against a hand computation;
one-document-per-row batches (no cross-document attention: changing a later document leaves
an earlier one's encoder activations bit-equal, while packing leaks) and their errors;
``transfer_hook`` for post-norm sites and the decoder.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from sae_lens_t5gemma.analysis import corpus
from sae_lens_t5gemma.comparison import pairs as P
from sae_lens_t5gemma.comparison.transfer import (
    MIN_HOME_EV,
    FeatureCorrelation,
    TransferStatistics,
    causal_encoder,
    clears_null,
    ev_kept,
    feature_transfer,
)
from sae_lens_t5gemma.model import sites as sites
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic


@pytest.fixture(scope="module")
def pair() -> tuple[HookedT5Gemma2, object]:
    """A tiny T5Gemma 2 and a TransformerLens Gemma 3 holding its encoder's weights."""
    from sae_lens_t5gemma.loading.gemma_scope import load_gemma3

    folder = tempfile.mkdtemp()
    tok = synthetic.build_tokenizer(folder)
    t5 = synthetic.build_t5gemma2(seed=3, num_hidden_layers=3)
    g3 = load_gemma3(
        "google/gemma-3-270m", hf_model=synthetic.gemma3_from_t5gemma2_encoder(t5), tokenizer=tok
    )
    return HookedT5Gemma2(t5, tok), g3


def _jumprelu(d_in: int = 64, d_sae: int = 48, seed: int = 0):
    """A Gemma Scope-style JumpReLU SAE (SAELens' class) with random weights, hooked on Gemma 3."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(
        JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))
    )
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.copy_(torch.rand(d_sae, generator=g) * 2.0)
    return sae


def _tokens(n_rows: int = 4, n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 500, (n_rows, n), generator=g)
    tokens[:, 0] = 2
    return tokens


# ---------------------------------------------------------------------------- correlation


def test_streaming_correlation_equals_corrcoef() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(300, 6, generator=g))
    b = 0.7 * a + 0.3 * torch.relu(torch.randn(300, 6, generator=g))
    b[:, 4] = 0.0  # silent on the target: counts as 0
    a[:, 5] = 0.0  # never fires at home: not scored
    corr = FeatureCorrelation(6)
    for i in range(0, 300, 64):  # uneven chunks
        corr.add(a[i : i + 64], b[i : i + 64])
    r = corr.correlations(min_fires=1)
    for k in range(4):
        expected = torch.corrcoef(torch.stack([a[:, k], b[:, k]]))[0, 1]
        assert r[k].item() == pytest.approx(expected.item(), abs=1e-6)
    assert r[4].item() == 0.0
    assert math.isnan(r[5].item())
    assert corr.fires_a.tolist()[:5] == [int((a[:, k] > 0).sum()) for k in range(5)]


def test_min_fires_leaves_rare_features_unscored() -> None:
    a = torch.zeros(10, 2)
    a[0, 0] = 1.0  # fires once
    a[:5, 1] = torch.arange(1.0, 6.0)
    corr = FeatureCorrelation(2)
    corr.add(a, a)
    r = corr.correlations(min_fires=2)
    assert math.isnan(r[0].item())
    assert r[1].item() == pytest.approx(1.0, abs=1e-12)


def test_ev_kept_is_unclipped_and_undefined_below_the_floor() -> None:
    # Issue 19, item 7: 0.572 against 0.560 read as 1.0 when clipped.
    assert ev_kept(0.4, 0.8) == pytest.approx(0.5)
    assert ev_kept(0.572, 0.560) == pytest.approx(1.0214, abs=1e-4)
    assert ev_kept(-0.3, 0.8) == pytest.approx(-0.375)
    assert ev_kept(0.05, MIN_HOME_EV - 1e-9) is None
    assert ev_kept(0.5, float("nan")) is None


# ------------------------------------------------------------------------- causal control


def test_causal_encoder_equals_gemma3_when_weights_are_shared(pair) -> None:
    model, g3 = pair
    tokens = _tokens()
    with model.fed("reconstruct"):
        with causal_encoder(model):
            _, causal = model.run_with_cache(
                tokens, names_filter=lambda n: n.startswith("encoder_blocks.2"), return_type=None
            )
        _, bidir = model.run_with_cache(
            tokens, names_filter=["encoder_blocks.2.hook_resid_post"], return_type=None
        )
    _, ref = g3.run_with_cache(tokens, names_filter=["blocks.2.hook_resid_post", "blocks.2.attn.hook_z"])
    x = ref["blocks.2.hook_resid_post"]
    assert (causal["encoder_blocks.2.hook_resid_post"] - x).abs().max().item() < 1e-5 * x.abs().max().item()
    z = ref["blocks.2.attn.hook_z"]
    assert (causal["encoder_blocks.2.attn.hook_z"] - z).abs().max().item() < 1e-5
    # Without the control the bidirectional encoder differs at every position but the last.
    diff = (bidir["encoder_blocks.2.hook_resid_post"] - x).norm(dim=-1)
    assert bool((diff[:, :-1] > 1e-3).all())
    # The hook is gone afterwards.
    assert not model.hf_model.model.encoder.text_model._forward_pre_hooks


# --------------------------------------------------------------------------- feature_transfer


@torch.no_grad()
def test_feature_transfer_equals_a_hand_computation(pair) -> None:
    model, g3 = pair
    sae = _jumprelu()
    tokens = _tokens(n_rows=6, n=16, seed=1)
    tokens[0, 12] = 0  # a PAD inside the encoder prefix: left out on both sides
    batches = list(tokens.split(3))
    ft = feature_transfer(g3, model, sae, batches, "encoder_blocks.1.hook_resid_post", min_fires=1, top_k=3)

    p = 8  # prefix_lm, n // 2
    keep = torch.zeros_like(tokens, dtype=torch.bool)
    keep[:, :p] = True
    keep &= ~torch.isin(tokens, torch.tensor([0, 1, 2, 3]))
    _, ref = g3.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
    xh = ref["blocks.1.hook_resid_post"][keep]
    with model.fed("reconstruct"):  # the encoder on the prefix alone
        _, t5 = model.run_with_cache(
            tokens[:, :p], names_filter=["encoder_blocks.1.hook_resid_post"], return_type=None
        )
    xt = t5["encoder_blocks.1.hook_resid_post"][keep[:, :p]]
    assert ft.n_tokens == int(keep.sum()) == xh.shape[0]

    def ev(x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        f = sae.encode(x)
        r = sae.decode(f)
        return (
            float(1 - ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
            float((f > 0).float().sum(-1).mean()),
            f,
        )

    ev_h, l0_h, fh = ev(xh)
    ev_t, l0_t, ft_ = ev(xt)
    assert ft.ev_home == pytest.approx(ev_h, abs=1e-4)
    assert ft.ev_target == pytest.approx(ev_t, abs=1e-4)
    assert ft.l0_home == pytest.approx(l0_h, rel=1e-6)
    assert ft.l0_target == pytest.approx(l0_t, rel=1e-6)
    # Norm-matched control: scale T5Gemma 2's activation to Gemma 3's mean norm, by hand.
    scale = xh.norm(dim=-1).mean() / xt.norm(dim=-1).mean()
    assert ft.norm_ratio == pytest.approx(float(1 / scale), rel=1e-5)
    ev_m, l0_m, _ = ev(xt * scale)
    assert ft.ev_norm_matched == pytest.approx(ev_m, abs=1e-4)
    assert ft.l0_norm_matched == pytest.approx(l0_m, rel=1e-6)
    # Correlations: scored features, against corrcoef.
    scored = [k for k in range(sae.cfg.d_sae) if (fh[:, k] > 0).any()]
    expected = []
    for k in scored:
        if fh[:, k].std() == 0:
            continue
        c = 0.0 if ft_[:, k].std() == 0 else float(torch.corrcoef(torch.stack([fh[:, k], ft_[:, k]]))[0, 1])
        expected.append(c)
    expected_t = torch.tensor(expected)
    assert ft.n_features_scored == len(expected)
    assert ft.corr_median == pytest.approx(float(expected_t.median()), abs=1e-5)
    assert ft.corr_frac_above_0_5 == pytest.approx(float((expected_t > 0.5).double().mean()), abs=1e-12)
    # Best and worst: chosen on the even document groups, reported on the odd ones.
    assert [c.corr_selection for c in ft.best] == sorted((c.corr_selection for c in ft.best), reverse=True)
    assert [c.corr_selection for c in ft.worst] == sorted(c.corr_selection for c in ft.worst)
    assert ft.corr_median_ci[0] <= ft.corr_median <= ft.corr_median_ci[1]
    # The causal control equals Gemma 3 here (shared weights): correlation 1, same EV.
    assert ft.corr_median_causal == pytest.approx(1.0, abs=1e-4)
    assert ft.ev_causal == pytest.approx(ft.ev_home, abs=1e-4)


def test_feature_transfer_onto_the_decoder_compares_the_continuation(pair) -> None:
    model, g3 = pair
    sae = _jumprelu(seed=2)
    tokens = _tokens(n_rows=4, n=16, seed=2)
    ft = feature_transfer(g3, model, sae, [tokens], "decoder_blocks.1.hook_resid_post", min_fires=1)
    assert ft.target_stack == "decoder"
    assert ft.n_tokens == 4 * 8  # positions 8..15 of every row, no special token there
    assert ft.ev_causal is None and ft.corr_median_causal is None  # encoder-only control
    assert "continuation t >= p" in ft.positions


# ----------------------------------------------------------------------------- documents


def test_one_document_per_row_has_no_cross_document_attention(pair) -> None:
    model, _ = pair
    tok = model.tokenizer
    docs = [
        "The quick brown fox jumps over the lazy dog near the quiet river bank.",
        "An encoder reads the whole sentence at once, while a decoder writes one token at a time.",
    ]
    changed = [docs[0], "Sparse autoencoders break a model's activations into features that people can read."]
    hook = "encoder_blocks.2.hook_resid_post"

    def first_doc_acts(texts: list[str], pack: bool) -> torch.Tensor:
        if pack:
            rows = corpus.token_batches(tok, texts, 40)[:1]
        else:
            rows, counts = corpus.document_batches(tok, texts, 24, min_tokens=13)
            assert counts == {"documents": 2, "kept": 2, "too_short": 0, "truncated": 2}
        with model.fed("reconstruct"):  # the encoder reads the whole row
            _, cache = model.run_with_cache(rows, names_filter=[hook], return_type=None)
        return cache[hook][0]

    assert torch.equal(first_doc_acts(docs, pack=False), first_doc_acts(changed, pack=False))
    # Packed, the bidirectional encoder reads the later document: the same check then fails.
    first_len = len(tok(docs[0], add_special_tokens=False)["input_ids"]) + 1
    packed, packed_changed = first_doc_acts(docs, pack=True), first_doc_acts(changed, pack=True)
    assert (packed[:first_len] - packed_changed[:first_len]).abs().max().item() > 1e-3


def test_document_batches_pad_at_the_end_and_refuse_short_corpora(pair) -> None:
    tok = pair[0].tokenizer
    rows, counts = corpus.document_batches(
        tok, ["a b c", "one two three four five six seven eight"], 12, min_tokens=4
    )
    ids = [2, *tok("a b c", add_special_tokens=False)["input_ids"]]
    assert rows[0, : len(ids)].tolist() == ids
    assert rows[0, len(ids) :].tolist() == [tok.pad_token_id] * (12 - len(ids))
    assert counts["kept"] == 2
    with pytest.raises(ValueError, match=r"No document has at least 200 tokens .* lengths are \d+-\d+"):
        corpus.document_batches(tok, ["short text"], 256, min_tokens=200)


def test_transfer_hooks_for_post_norm_sites_and_the_decoder() -> None:
    assert sites.transfer_hook("blocks.4.hook_mlp_out") == "encoder_blocks.4.hook_mlp_out_normed"
    assert sites.transfer_hook("blocks.4.hook_mlp_out", "decoder") == "decoder_blocks.4.hook_mlp_out_normed"
    assert sites.transfer_hook("blocks.4.hook_resid_post", "decoder") == "decoder_blocks.4.hook_resid_post"
    assert sites.transfer_hook("blocks.4.attn.hook_z") == "encoder_blocks.4.attn.hook_z"
    assert sites.transfer_hook("blocks.4.attn.hook_z", "decoder") is None  # merged self+cross attention
    assert sites.transfer_hook("blocks.4.hook_attn_out", "encoder") == "encoder_blocks.4.hook_attn_out_normed"
    assert P.gemma_scope_variants("resid_post", 5) == [
        "layer_5_width_16k_l0_small",
        "layer_5_width_16k_l0_big",
    ]


def _sparse(g: torch.Generator, docs: int, n: int, d: int, density: float) -> torch.Tensor:
    return torch.rand(docs, n, d, generator=g) * (torch.rand(docs, n, d, generator=g) < density)


def test_independent_features_do_not_clear_the_null() -> None:
    """Issue 19, item 5: at the stand-in's sizes (360 tokens, 16k features, min_fires 5) fully
    independent sparse activations gave "best carried" r of 0.91, 0.69, ... when selected and
    reported on the same tokens. Against the permutation null, with selection and report on
    different documents, they show as chance."""
    g = torch.Generator().manual_seed(0)
    docs, n, d = 30, 12, 16384
    home, target = _sparse(g, docs, n, d, 0.02), _sparse(g, docs, n, d, 0.02)
    mask = torch.ones(docs, n, dtype=torch.bool)
    stats = TransferStatistics(d, groups=10, n_null=3)
    for b in range(0, docs, 5):  # batches of 5 documents, as compare feeds them
        stats.add(home[b : b + 5], target[b : b + 5], mask[b : b + 5])
    out = stats.summary(min_fires=5)
    assert not clears_null(out["median"], out["median_ci"], out["null_median"])
    assert not clears_null(out["frac_above_0_5"], out["frac_above_0_5_ci"], out["null_frac_above_0_5"])
    sel, held = out["selection"], out["held_out"]
    both = ~torch.isnan(sel) & ~torch.isnan(held)
    top = torch.argsort(torch.where(both, sel, torch.full_like(sel, -2.0)), descending=True)[:10]
    assert float(sel[top].min()) > 0.35  # chance highs where they were selected (half the tokens)...
    assert abs(float(held[top].median())) < 0.3  # ...and nothing on the held-out documents


def test_carried_features_clear_the_null_and_split_halves_equal_corrcoef() -> None:
    g = torch.Generator().manual_seed(1)
    docs, n, d = 20, 10, 64
    home = _sparse(g, docs, n, d, 0.3)
    target = home + 0.05 * torch.rand(docs, n, d, generator=g) * (home > 0)
    mask = torch.rand(docs, n, generator=g) > 0.2
    stats = TransferStatistics(d, groups=4, n_null=2)
    for b in range(0, docs, 4):
        stats.add(home[b : b + 4], target[b : b + 4], mask[b : b + 4])
    out = stats.summary(min_fires=5)
    assert out["median"] > 0.95 and clears_null(out["median"], out["median_ci"], out["null_median"])
    odd = [i for i in range(docs) if i % 4 in (1, 3)]  # the odd groups: documents 1, 3, 5, ... mod 4
    a = torch.cat([home[i][mask[i]] for i in odd])
    b = torch.cat([target[i][mask[i]] for i in odd])
    for k in range(5):
        if (a[:, k] > 0).sum() >= 5:
            want = float(torch.corrcoef(torch.stack([a[:, k], b[:, k]]))[0, 1])
            assert float(out["held_out"][k]) == pytest.approx(want, abs=1e-6)


def test_home_rope_arm_gives_the_encoder_gemma3s_rope(pair) -> None:
    """Issue 19, item 6: the fourth arm of the causal control. ``home_rope`` gives T5Gemma 2's
    encoder Gemma 3's RoPE: a T5Gemma 2 whose global layers scale RoPE linearly by 8 (as the real
    270M does), run with the stand-in Gemma 3's RoPE (unscaled), equals the same weights built
    unscaled (float32, 1e-5), and the scaled model comes back bit for bit after. On the stand-in
    pair the two RoPE are the same, so the arm reports that it changes nothing."""
    import copy

    from transformers import T5Gemma2ForConditionalGeneration

    from sae_lens_t5gemma.comparison.transfer import home_rope, home_rope_parameters

    t5, g3 = pair
    rope = home_rope_parameters(g3)
    assert rope == {"full_attention": (1e6, 1.0), "sliding_attention": (1e4, 1.0)}
    with home_rope(t5, rope) as changed:
        assert not changed

    def built(rope_full: dict) -> HookedT5Gemma2:
        cfg = copy.deepcopy(t5.hf_model.config)
        text = cfg.encoder.text_config
        text.layer_types = ["full_attention", *text.layer_types[1:]]  # a global layer first
        text.rope_parameters["full_attention"] = rope_full
        hf = T5Gemma2ForConditionalGeneration(cfg).eval()
        hf.load_state_dict(t5.hf_model.state_dict())
        return HookedT5Gemma2(hf, t5.tokenizer)

    unscaled = built({"rope_type": "default", "rope_theta": 1e6})
    scaled = built({"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6})
    tokens, hook = _tokens(n=24), "encoder_blocks.1.hook_resid_post"

    def read(m: HookedT5Gemma2) -> torch.Tensor:
        with torch.no_grad():
            return m.run_with_cache(tokens, names_filter=[hook], return_type=None)[1].cache_dict[hook]

    plain, before = read(unscaled), read(scaled)
    assert (before - plain).norm() / plain.norm() > 1e-3  # the scaling matters at these positions
    with home_rope(scaled, rope) as changed:
        assert changed
        torch.testing.assert_close(read(scaled), plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(read(scaled), before)
