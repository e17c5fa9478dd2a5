"""Corpus statistics, feature effects and find_features (feature_stats, effects, search) on a tiny random T5Gemma 2.

Covers: the streamed top examples equal a brute-force top-k over every counted position
(encoder and decoder SAEs, prefix_lm and reconstruct), densities and histogram totals match
a direct count, special tokens and uncovered positions never count, a run interrupted and
resumed equals an uninterrupted one, the saved folder reloads, logit effects equal the
documented direct-path formula, ablation effects are zero for a feature that never fires
and positive KL for one that does, and find_features ranks a planted marker feature first.
"""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_t5gemma.analysis import activations as A
from sae_lens_t5gemma.analysis import corpus, search
from sae_lens_t5gemma.analysis import effects as E
from sae_lens_t5gemma.analysis import feature_stats as F
from sae_lens_t5gemma.analysis import stats_state as S
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic

TEXTS = synthetic.stand_in_texts()
CFG = S.StatsConfig(top_k=4, n_samples=6, left=3, right=2, context_size=24, batch_size=4, chunk_rows=8)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HookedT5Gemma2:
    from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration

    hf = T5Gemma2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    return HookedT5Gemma2(hf, AutoTokenizer.from_pretrained(tiny_model_dir))


def make_sae(hook: str, seed: int, d_sae: int = 24, d_in: int = 64) -> StandardSAE:
    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = hook
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.fill_(-0.05)
    return sae


ENC = "encoder_blocks.1.attn.hook_out"
DEC = "decoder_blocks.1.self_attn.hook_out"


def brute_force(model: HookedT5Gemma2, sae, rows: list[list[int]], cfg: S.StatsConfig):
    """Every counted activation of every feature, batched exactly as corpus_stats batches."""
    pad = model.tokenizer.pad_token_id
    records = []  # (feature, value, row, pos)
    n_tokens, fires = 0, torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    indexed = list(enumerate(rows))
    for c in range(0, len(indexed), cfg.chunk_rows):
        chunk = sorted(indexed[c : c + cfg.chunk_rows], key=lambda x: (len(x[1]), x[0]))
        for b in range(0, len(chunk), cfg.batch_size):
            part = chunk[b : b + cfg.batch_size]
            tokens, mask = corpus.pad_batch([r for _, r in part], pad, model.cfg.device)
            (acts,), (valid,), _ = A.feature_acts(model, [sae], tokens, mask)
            n_tokens += int(valid.sum())
            fires += (acts > 0).sum((0, 1))
            for i, (row, _) in enumerate(part):
                for t in range(tokens.shape[1]):
                    if valid[i, t]:
                        for f in (acts[i, t] > 0).nonzero().flatten().tolist():
                            records.append((f, float(acts[i, t, f]), row, t))
    return records, n_tokens, fires


@pytest.mark.parametrize(
    ("hook", "convention"), [(ENC, "prefix_lm"), (DEC, "prefix_lm"), (DEC, "reconstruct")]
)
def test_top_examples_and_density_equal_brute_force(model, hook, convention):
    model.convention = convention
    try:
        sae = make_sae(hook, seed=3)
        stats = F.corpus_stats(model, sae, texts=TEXTS, config=CFG, progress=False)
        key = stats.keys[0]
        rows = [corpus.tokenize_row(model.tokenizer, t, CFG.context_size) for t in TEXTS]
        records, n_tokens, fires = brute_force(model, sae, rows, CFG)
    finally:
        model.convention = "prefix_lm"
    assert stats.n_tokens(key) == n_tokens > 0
    torch.testing.assert_close(stats.density(key), fires.double() / n_tokens)
    edges, counts = stats.histogram(key, 0)
    assert int(counts.sum()) == int(fires[0])
    checked = 0
    for f in range(sae.cfg.d_sae):
        want = sorted((r for r in records if r[0] == f), key=lambda r: -r[1])[: CFG.top_k]
        got = stats.top_examples(key, f)
        assert [(e.row, e.position) for e in got] == [(r[2], r[3]) for r in want]
        assert [e.activation for e in got] == pytest.approx([r[1] for r in want], rel=1e-6)
        for e in got:
            assert e.acts[e.center] == pytest.approx(e.activation, rel=1e-6)
            assert e.token_ids[e.center] == rows[e.row][e.position]
            expected = "decoder continuation" if hook == DEC else "encoder input"
            if convention == "reconstruct":
                expected = "encoder input + decoder (reconstruct)"
            assert e.part == expected
        checked += len(got)
        # the reservoir holds only firing positions, min(n_samples, fires) of them
        sample = stats._examples(key, "sample", f)
        assert len(sample) == min(CFG.n_samples, int(fires[f]))
        assert all(s.activation > 0 for s in sample)
    assert checked > 20


def test_special_and_uncovered_positions_never_count(model):
    sae = make_sae(DEC, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every feature fires everywhere it is evaluated
    stats = F.corpus_stats(model, sae, texts=TEXTS[:6], config=CFG, progress=False)
    key = stats.keys[0]
    # decoder under prefix_lm: only continuation tokens that are not special count
    pad = model.tokenizer.pad_token_id
    expected = 0
    for c in range(0, 6, CFG.chunk_rows):
        chunk = sorted(
            TEXTS[:6][c : c + CFG.chunk_rows], key=lambda t: len(corpus.tokenize_row(model.tokenizer, t, 24))
        )
        for b in range(0, len(chunk), CFG.batch_size):
            rows = [corpus.tokenize_row(model.tokenizer, t, 24) for t in chunk[b : b + CFG.batch_size]]
            n = max(len(r) for r in rows)
            p = n // 2
            expected += sum(max(0, len(r) - p) for r in rows)
    assert stats.n_tokens(key) == expected
    assert float(stats.density(key).min()) == 1.0
    for e in stats.top_examples(key, 0):
        assert e.part == "decoder continuation"
        assert e.tokens[e.center] not in ("<bos>", "<eos>", "<pad>")
    del pad


def test_resume_equals_one_pass_and_folder_reloads(model, tmp_path):
    saes = {"enc": make_sae(ENC, seed=5), "dec": make_sae(DEC, seed=6)}
    full = F.corpus_stats(model, saes, texts=TEXTS, out=tmp_path / "full", config=CFG, progress=False)
    F.corpus_stats(model, saes, texts=TEXTS, out=tmp_path / "part", config=CFG, max_rows=16, progress=False)
    meta = json.loads((tmp_path / "part" / "stats.json").read_text())
    assert (meta["rows_done"], meta["complete"]) == (16, False)
    with pytest.raises(FileExistsError, match="resume=True"):
        F.corpus_stats(model, saes, texts=TEXTS, out=tmp_path / "part", config=CFG, progress=False)
    resumed = F.corpus_stats(
        model, saes, texts=TEXTS, out=tmp_path / "part", config=CFG, resume=True, progress=False
    )
    loaded = F.FeatureStats.load(tmp_path / "part")
    assert loaded.meta["rows_done"] == len(TEXTS) and loaded.meta["complete"]
    for key in ("enc", "dec"):
        for name, value in full.tensors[key].items():
            torch.testing.assert_close(resumed.tensors[key][name], value, msg=f"{key}.{name}")
            torch.testing.assert_close(loaded.tensors[key][name], value, msg=f"{key}.{name}")
    assert loaded.top_examples("dec", 2)[0].tokens == full.top_examples("dec", 2)[0].tokens
    with pytest.raises(ValueError, match="its config is"):
        F.corpus_stats(model, saes, texts=TEXTS, out=tmp_path / "part", resume=True, progress=False,
                       config=S.StatsConfig(top_k=5))  # fmt: skip


def test_corpus_from_jsonl_and_txt(model, tmp_path):
    sae = make_sae(ENC, seed=2)
    (tmp_path / "c.txt").write_text("\n".join(TEXTS[:5]) + "\n\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]))
    a = F.corpus_stats(model, sae, tmp_path / "c.txt", config=CFG, progress=False)
    b = F.corpus_stats(model, sae, str(tmp_path / "c.jsonl"), config=CFG, progress=False)
    assert a.meta["rows_done"] == b.meta["rows_done"] == 5
    torch.testing.assert_close(
        a.tensors["encoder.1.attn_out"]["top_val"], b.tensors["encoder.1.attn_out"]["top_val"]
    )
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="expected a JSON object with a 'text' field"):
        F.corpus_stats(model, sae, tmp_path / "bad.jsonl", config=CFG, progress=False)
    with pytest.raises(ValueError, match="StatsConfig.top_k must be a positive integer"):
        S.StatsConfig(top_k=0)


def test_logit_effects_follow_the_direct_path(model):
    sae = make_sae("decoder_blocks.1.self_attn.hook_out", seed=4)
    effect = E.logit_effects(model, sae, 7, k=5)
    layer = model.hf_model.model.decoder.layers[1]
    gain = (1 + layer.post_self_attn_layernorm.weight) * (1 + model.hf_model.model.decoder.norm.weight)
    want = (sae.W_dec[7] * gain) @ model.W_U
    top = want.topk(5)
    assert [r.token_id for r in effect.top] == top.indices.tolist()
    assert [r.value for r in effect.top] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert [r.token_id for r in effect.bottom] == (-want).topk(5).indices.tolist()
    assert "soft-cap" in effect.approximation and "1/rms" in effect.approximation
    # resid_post: no post-norm in the path
    sae2 = make_sae("decoder_blocks.1.hook_resid_post", seed=4)
    w, text = E.logit_effect_vectors(model, sae2)
    torch.testing.assert_close(w, (sae2.W_dec * (1 + model.hf_model.model.decoder.norm.weight)).detach())
    with pytest.raises(ValueError, match="encoder site"):
        E.logit_effects(model, make_sae(ENC, seed=1), 0)


def test_ablation_effects(model):
    sae = make_sae(ENC, seed=8)
    stats = F.corpus_stats(model, sae, texts=TEXTS, config=CFG, progress=False)
    key = stats.keys[0]
    f = int(stats.density(key).argmax())
    ex = stats.top_examples(key, f)
    rows = E.rows_by_index(model, None, [e.row for e in ex], CFG.context_size, texts=TEXTS)
    eff = E.ablation_effects(model, sae, f, ex, rows, k=3)
    assert eff.kind == "ablation" and eff.n_predictions > 0 and eff.mean_kl > 0
    assert eff.top[0].value > 0 > eff.bottom[0].value
    assert model.prefix_len is None  # restored
    with torch.no_grad():
        sae.W_dec[f] = 0  # a feature that writes nothing changes nothing
    eff0 = E.ablation_effects(model, sae, f, ex, rows, k=3)
    assert eff0.mean_kl == pytest.approx(0.0, abs=1e-7)


def planted_sae(model: HookedT5Gemma2, marker: int, d_sae: int = 16, feature: int = 11) -> StandardSAE:
    """An SAE at encoder layer 0's input whose ``feature`` fires only on the ``marker`` token.

    The residual stream entering layer 0 depends on the token alone, so the feature's encoder
    direction is the marker's activation and its bias sits just above every other token's score.
    """
    hook = "encoder_blocks.0.hook_resid_pre"
    sae = make_sae(hook, seed=9, d_sae=d_sae)
    vocab = torch.arange(model.cfg.d_vocab)[None]
    model.convention = "reconstruct"
    try:
        _, cache = model.run_with_cache(vocab, names_filter=[hook], return_type=None)
    finally:
        model.convention = "prefix_lm"
    x = cache[hook][0]
    direction = x[marker] / x[marker].norm()
    scores = x @ direction
    others = torch.cat([scores[:marker], scores[marker + 1 :]]).max()
    with torch.no_grad():
        sae.W_enc[:, feature] = direction
        sae.b_enc[feature] = -(others + scores[marker]) / 2
    return sae


def test_find_features_ranks_a_planted_marker_feature_first(model):
    used = {i for t in TEXTS for i in model.tokenizer(t, add_special_tokens=False)["input_ids"]}
    # a marker: the last vocabulary token that the corpus never uses
    marker_id = max(set(range(10, model.cfg.d_vocab)) - used)
    sae = planted_sae(model, marker_id)
    with_marker = [t + model.tokenizer.decode([marker_id]) + " again" for t in TEXTS[:8]]
    # The one rule for a prompt: under prefix_lm the encoder reads each text's first half, so a
    # marker at the end is not read; said explicitly, the encoder reads the whole text.
    by_rule = {r.feature: r for r in search.find_features(model, sae, with_marker, TEXTS[8:16], k=16)}
    assert by_rule[11].frac_with == 0.0 and by_rule[11].score == 0.0
    rows = search.find_features(model, sae, with_marker, TEXTS[8:16], k=5, encoder_reads_whole_text=True)
    assert rows[0].feature == 11
    assert rows[0].frac_with == 1.0 and rows[0].frac_without == 0.0
    assert rows[0].mean_without == 0.0 and rows[0].score > 0
    with pytest.raises(ValueError, match="No texts given"):
        search.find_features(model, sae, [], TEXTS[:2])
