"""``diagnose``: which convention a decoder SAE was trained under, from its training-history L0.

Covers: a decoder SAE whose history L0 is planted at its L0 under one convention is matched
to that convention, for each candidate, with its bootstrap stability; the L0 and MSE of each row
equal a direct computation; every candidate is scored on the same positions, and the ids at
padded positions change nothing (issue 19, item 3); encoder SAEs are refused; the release path and the CLI run offline on the
stand-in and say SYNTHETIC.
"""

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_t5gemma.analysis.diagnose import CANDIDATES, diagnose
from sae_lens_t5gemma.cli.main import main
from sae_lens_t5gemma.model.hooked import load_t5gemma2

HOOK = "decoder_blocks.1.self_attn.hook_out"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_t5gemma2(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def batches(model):
    texts = [
        "The cat sat on the mat and looked at the door.",
        "A dog ran",
        "Rain fell on the old town all night.",
    ]
    return [model.to_tokens(texts)]


def _sae(history_l0: float | None) -> StandardSAE:
    meta = SAEMetadata(hook_name=HOOK)
    if history_l0 is not None:
        meta.training_history = {"loss": [0.1], "l0": [history_l0]}
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=256, apply_b_dec_to_input=False, metadata=meta))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 256, generator=g))
        sae.b_enc.copy_(torch.randn(256, generator=g) * 0.1 - 0.5)
        sae.W_dec.copy_(torch.randn(256, 64, generator=g) * 0.05)
    return sae


@pytest.mark.parametrize("planted", CANDIDATES)
def test_planted_convention_is_found(model, batches, planted):
    probe = diagnose(model, {"probe": _sae(None)}, batches)
    l0 = {r.convention: r.l0 for r in probe.rows}
    assert len(set(l0.values())) == 3  # the candidates give different activations
    found = diagnose(model, {"decoder/layer_1": _sae(l0[planted])}, batches)
    assert found.best() == {"decoder/layer_1": planted}
    verdict = found.verdict()
    assert verdict.startswith(
        f"estimate: best match {planted!r} for 1 of 1 decoder SAEs ({{{planted!r}: 1}}; model in float32); "
        "each SAE's best match stays best in a median "
    )
    assert "The SAEs' votes are not independent evidence" in verdict
    stable = found.stability["decoder/layer_1"]  # 3 documents: a noisy bootstrap, reported as such
    assert (
        0.0 < stable <= 1.0
        and f"median {stable:.0%} of 500 bootstrap resamples of the 3 documents" in verdict
    )
    assert model.convention == "prefix_lm"  # restored


def test_rows_equal_a_direct_computation(model, batches):
    sae = _sae(100.0)
    rows = {r.convention: r for r in diagnose(model, {"s": sae}, batches).rows}
    tokens = batches[0]
    with torch.no_grad():
        mask = (tokens != 0).long()  # right-padded rows: each is split at its own length
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[HOOK])
        keep = model.covered_mask(tokens, "decoder", mask) & ~torch.isin(tokens, torch.tensor([0, 1, 2]))
        x = cache[HOOK][keep]
        f = sae.encode(x)
        mse = float(((sae.decode(f) - x) ** 2).mean())
    row = rows["prefix_lm"]
    assert row.n_tokens == int(keep.sum())
    assert row.l0 == pytest.approx(float((f > 0).sum(-1).float().mean()))
    assert row.mse == pytest.approx(mse, rel=1e-5)


def test_encoder_saes_are_refused(model, batches):
    enc = _sae(10.0)
    enc.cfg.metadata.hook_name = "encoder_blocks.1.attn.hook_out"
    with pytest.raises(
        ValueError, match="SAE e reads encoder_blocks.1.attn.hook_out: diagnose compares decoder SAEs only"
    ):
        diagnose(model, {"e": enc}, batches)


def test_cli_diagnose_on_the_stand_in(hub_cache, capsys):
    assert main(["diagnose", "--stand-in", "--layers", "2", "--context-size", "32", "--n-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "decoder/layer_2    prefix_lm" in out and "decoder/layer_2    shifted_copy" in out
    assert "SYNTHETIC stand-in, meaningless: best match" in out


def test_candidates_share_positions_and_padding_changes_nothing(model, batches):
    sae = _sae(50.0)
    tokens = batches[0]
    mask = (tokens != 0).long()
    first = diagnose(model, {"s": sae}, [(tokens, mask)])
    assert len({r.n_tokens for r in first.rows}) == 1 and first.rows[0].n_tokens > 0
    other = tokens.masked_fill(mask == 0, 77)  # other ids at the padded positions only
    second = diagnose(model, {"s": sae}, [(other, mask)])
    for a, b in zip(first.rows, second.rows, strict=True):
        assert (a.convention, a.n_tokens, a.l0, a.mse) == (b.convention, b.n_tokens, b.l0, b.mse)
        assert a.l0_low <= a.l0 <= a.l0_high
