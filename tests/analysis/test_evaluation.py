"""The covered-position eval (analysis/evaluation.py): its formulas against hand computations.

Covers: ``ReconStats`` on three hand-made rows (explained variance, MSE, cosine, L0, L1, L2
ratio, dead and dense fractions, each worked out below) and its streaming (two adds equal one);
the downstream scores (CE-loss score, CE increase, KL score) from hand-made sums; the KL term
against torch's ``kl_div``; and ``evaluate_sae`` with an exact (identity) SAE on a tiny random
T5Gemma 2: EV 1, MSE 0, CE increase 0, KL 0, and a token count equal to the covered, non-special
positions counted directly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import identity_sae

from sae_lens_t5gemma.analysis import evaluation as E
from sae_lens_t5gemma.analysis.corpus import pad_batch, pad_id, tokenize_row
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
RECON = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
FEATS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.5, 0.0]])
# By hand: mean x = (2/3, 2/3); sum ||x - mean||^2 = 5/9 + 5/9 + 2/9 = 4/3; SSE = 0 + 1 + 0 = 1.
HAND = {
    "n_tokens": 3,
    "explained_variance": 1 - 1 / (4 / 3),  # 0.25
    "mse": 1 / 3,
    "cossim": (1 + 0 + 1) / 3,  # the zero reconstruction has cosine 0
    "l0": (1 + 0 + 2) / 3,
    "l1": (1 + 0 + 2.5) / 3,
    "l2_ratio": (1 + 0 + 1) / 3,
    "dead_frac": 1 / 3,  # feature 2 never fires
    "dense_frac": 1 / 3,  # feature 0 fires on 2/3 > 0.5 of the tokens; feature 1 on 1/3
}


def test_recon_stats_match_the_hand_computation():
    stats = E.ReconStats()
    stats.add(X, RECON, FEATS)
    got = stats.summary(d_sae=3, dense_threshold=0.5)
    assert got.keys() == HAND.keys()
    for name, want in HAND.items():
        assert got[name] == pytest.approx(want, abs=1e-6), name


def test_recon_stats_stream_rows_in_any_split():
    one = E.ReconStats()
    one.add(X, RECON, FEATS)
    parts = E.ReconStats()
    parts.add(X[:1], RECON[:1], FEATS[:1])
    parts.add(X[:0], RECON[:0], FEATS[:0])  # an empty batch adds nothing
    parts.add(X[1:], RECON[1:], FEATS[1:])
    a, b = one.summary(3, 0.5), parts.summary(3, 0.5)
    assert a == pytest.approx(b, abs=1e-6)


def test_recon_stats_with_no_rows_are_refused():
    with pytest.raises(
        ValueError, match=r"^No covered, non-special token in the batches: nothing to evaluate\.$"
    ):
        E.ReconStats().summary(d_sae=3)


def test_constant_activations_have_no_explained_variance():
    stats = E.ReconStats()
    x = torch.ones(4, 2)
    stats.add(x, x, torch.ones(4, 1))
    assert math.isnan(stats.summary(1)["explained_variance"])


def test_downstream_scores_match_the_hand_computation():
    # Per prediction: CE clean 1.0, with the SAE 1.5, ablated 3.0; KL with the SAE 0.1, ablated 0.5.
    got = E._downstream(dict(n=4, clean=4.0, sae=6.0, abl=12.0, kl_sae=0.4, kl_abl=2.0))
    want = dict(
        n_predictions=4,
        ce_loss_without_sae=1.0,
        ce_loss_with_sae=1.5,
        ce_loss_with_ablation=3.0,
        ce_loss_score=(3.0 - 1.5) / (3.0 - 1.0),  # 0.75
        ce_increase=0.5,
        kl_div_with_sae=0.1,
        kl_div_with_ablation=0.5,
        kl_div_score=(0.5 - 0.1) / 0.5,  # 0.8
    )
    assert got == pytest.approx(want, abs=1e-12)
    same = E._downstream(dict(n=1, clean=2.0, sae=2.0, abl=2.0, kl_sae=0.0, kl_abl=0.0))
    assert math.isnan(same["ce_loss_score"]) and math.isnan(same["kl_div_score"])
    with pytest.raises(ValueError, match="No continuation target"):
        E._downstream(dict(n=0, clean=0.0, sae=0.0, abl=0.0, kl_sae=0.0, kl_abl=0.0))


def test_kl_is_torch_kl_div_per_position():
    g = torch.Generator().manual_seed(0)
    clean, other = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    want = F.kl_div(other.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(E._kl(clean, other), want)
    assert torch.allclose(E._kl(clean, clean), torch.zeros(5), atol=1e-6)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HookedT5Gemma2:
    from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration

    hf = T5Gemma2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    return HookedT5Gemma2(hf, AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.mark.parametrize("hook", ["encoder_blocks.1.hook_resid_post", "decoder_blocks.1.hook_resid_post"])
def test_an_exact_sae_scores_perfectly_over_the_covered_positions(model, hook):
    rows = [tokenize_row(model.tokenizer, t, 24) for t in synthetic.stand_in_texts()[:6]]
    tokens, mask = pad_batch(rows, pad_id(model.tokenizer))
    batches = list(zip(tokens.split(3), mask.split(3), strict=True))
    d_model = model.cfg.d_model
    out = E.evaluate_sae(model, identity_sae(hook, d_model), batches)
    assert out["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert out["mse"] == pytest.approx(0.0, abs=1e-8)
    assert out["cossim"] == pytest.approx(1.0, abs=1e-5)
    assert out["ce_increase"] == pytest.approx(0.0, abs=1e-4)
    assert out["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert out["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    # Every coordinate of a residual is nonzero: each token fires d_model of the 2 * d_model features.
    assert out["l0"] == pytest.approx(d_model, abs=1e-6) and out["dead_frac"] == pytest.approx(0.0)
    # The tokens counted are exactly the covered, real, non-special positions of the stack.
    special = torch.tensor(E.special_token_ids(model.tokenizer))
    stack = hook.split("_")[0]
    counted = 0
    for t, m in batches:
        with model.held_split(t, m):
            counted += int((model.covered_mask(t, stack, m) & m.bool() & ~torch.isin(t, special)).sum())
    assert out["n_tokens"] == counted > 0
