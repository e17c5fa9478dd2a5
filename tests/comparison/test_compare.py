"""compare.py and the Gemma 3 / Gemma Scope 2 side, offline on the synthetic stand-ins.

Covers: the Gemma Scope 2 fake hub cache (layout from SAELens' own YAML, loaded through
SAELens' real ``gemma_3`` loader, tensor shapes read from the local cache offline); Gemma 3
through TransformerLens (config equal to TransformerLens' own for the real dimensions,
logits and hook_z equal to transformers'); ``compare``'s report, CSV, JSON and PNGs, with
every row naming its site; the transfer rows (encoder and decoder, post-norm mlp_out sites,
feature correlations, controls), no row mixing tasks, matched-variant choice, findings and
SYNTHETIC labels; a perfect SAE scoring 1; metrics and the matched Gemma 3 ΔCE equal to a
direct computation; the CLI and its errors.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import identity_sae
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

import sae_lens_t5gemma  # noqa: F401  (registers the mindchain release)
from sae_lens_t5gemma._compat import read_gemma_scope_shapes_from_cache
from sae_lens_t5gemma.analysis import corpus
from sae_lens_t5gemma.cli.main import main
from sae_lens_t5gemma.comparison import harness as H
from sae_lens_t5gemma.comparison import pairs as P
from sae_lens_t5gemma.comparison import report as R
from sae_lens_t5gemma.comparison import suite as C
from sae_lens_t5gemma.comparison import transfer as T
from sae_lens_t5gemma.loading import gemma_scope as gemma_scope
from sae_lens_t5gemma.model import sites as sites
from sae_lens_t5gemma.stand_in import synthetic as synthetic

LAYER = 1
T5 = synthetic.T5GEMMA2_MODEL
GS_RES = f"gemma-scope-2-270m-pt-res-all:layer_{LAYER}_width_16k_l0_small"
GS_ATT = f"gemma-scope-2-270m-pt-att-all:layer_{LAYER}_width_16k_l0_small"
GS_MLP = f"gemma-scope-2-270m-pt-mlp-all:layer_{LAYER}_width_16k_l0_small"
MC_ENC = f"t5gemma2-270m-attn_out:encoder/layer_{LAYER}"
MC_DEC = f"t5gemma2-270m-attn_out:decoder/layer_{LAYER}"
CTX, BATCH, N_BATCHES = 32, 4, 2


@pytest.fixture(scope="module")
def gemma_hub(hub_cache: Path) -> Path:
    """The session hub cache plus the Gemma 3 and Gemma Scope 2 stand-ins."""
    synthetic.write_gemma3_stand_in_hub(hub_cache)
    read_gemma_scope_shapes_from_cache()  # Gemma Scope 2 SAEs load offline (SAE.from_pretrained below)
    return hub_cache


def _perfect_sae(folder: Path, hook_name: str, d_in: int = 64) -> Path:
    """A SAELens folder whose SAE reconstructs exactly: relu(x) - relu(-x) = x."""
    sae = identity_sae(hook_name, d_in, model_name=T5, context_size=CTX)
    sae.save_model(folder)
    return folder


@pytest.fixture(scope="module")
def perfect(gemma_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("perfect")
    return {
        "resid_post": _perfect_sae(root / "resid", f"encoder_blocks.{LAYER}.hook_resid_post"),
        "attn_z": _perfect_sae(root / "z", f"encoder_blocks.{LAYER}.attn.hook_z"),
    }


@pytest.fixture(scope="module")
def report(gemma_hub: Path, perfect: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> R.Report:
    pairs = C.standard_pairs([LAYER], local_saes=[perfect["resid_post"], perfect["attn_z"]])
    out = tmp_path_factory.mktemp("compare")
    return C.compare(
        pairs,
        out_dir=out,
        context_size=CTX,
        batch_size=BATCH,
        n_batches=N_BATCHES,
        banner="SYNTHETIC",
        synthetic=True,
        min_fires=1,
        progress=False,
    )


# ----------------------------------------------------------------------- Gemma Scope 2 stand-in


def test_stand_in_layout_is_the_one_saelens_asks_for(gemma_hub: Path) -> None:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    snapshot = next((gemma_hub / "models--google--gemma-scope-2-270m-pt" / "snapshots").iterdir())
    written = {str(p.parent.relative_to(snapshot)) for p in snapshot.rglob("params.safetensors")}
    directory = get_pretrained_saes_directory()
    expected = {
        path
        for release in synthetic.GEMMA_SCOPE_RELEASES.values()
        for sae_id, path in directory[release].saes_map.items()
        if "_width_16k_" in sae_id
    }
    assert written == expected
    assert len(written) == 3 * 18 * 2
    config = json.loads((snapshot / "attn_out_all/layer_7_width_16k_l0_big/config.json").read_text())
    assert config == {
        "width": 128,
        "model_name": "google/gemma-3-270m-pt",
        "architecture": "jump_relu",
        "l0": directory["gemma-scope-2-270m-pt-att-all"].expected_l0["layer_7_width_16k_l0_big"],
        "affine_connection": False,
        "hf_hook_point_in": "model.layers.7.self_attn.o_proj.input",
        "hf_hook_point_out": "model.layers.7.self_attn.o_proj.input",
        "type": "sae",
    }


@pytest.mark.parametrize(
    ("spec", "hook", "hf_hook"),
    [
        (GS_ATT, f"blocks.{LAYER}.attn.hook_z", f"model.layers.{LAYER}.self_attn.o_proj.input"),
        (GS_RES, f"blocks.{LAYER}.hook_resid_post", f"model.layers.{LAYER}.output"),
        (GS_MLP, f"blocks.{LAYER}.hook_mlp_out", f"model.layers.{LAYER}.post_feedforward_layernorm.output"),
    ],
)
def test_gemma_scope_loads_through_saelens_own_loader(
    gemma_hub: Path, spec: str, hook: str, hf_hook: str
) -> None:
    from sae_lens import SAE

    release, sae_id = spec.split(":")
    sae = SAE.from_pretrained(release=release, sae_id=sae_id)
    assert type(sae).__name__ == "JumpReLUSAE"
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (64, 128)
    assert sae.cfg.metadata.hook_name == hook
    assert sae.cfg.metadata.hf_hook_name == hf_hook
    assert sae.cfg.metadata.model_name == "google/gemma-3-270m"  # the loader maps "-270m-pt"
    assert sae.cfg.reshape_activations == "none"
    folder = synthetic.gemma_scope_ids(
        next(k for k, v in synthetic.GEMMA_SCOPE_RELEASES.items() if v == release)
    )[sae_id][0]
    raw = load_file(hf_hub_download(synthetic.GEMMA_SCOPE_REPO, f"{folder}/params.safetensors"))
    for ours, theirs in (
        ("W_enc", "w_enc"),
        ("W_dec", "w_dec"),
        ("b_enc", "b_enc"),
        ("threshold", "threshold"),
    ):
        torch.testing.assert_close(getattr(sae, ours).detach(), raw[theirs], rtol=0, atol=0)


def test_tensor_shapes_come_from_the_local_cache_offline(gemma_hub: Path) -> None:
    from sae_lens.loading import pretrained_sae_loaders as loaders

    read_gemma_scope_shapes_from_cache()  # installed where a Gemma Scope 2 SAE loads, not on import
    shapes = loaders.get_safetensors_tensor_shapes(
        synthetic.GEMMA_SCOPE_REPO, "attn_out_all/layer_0_width_16k_l0_small/params.safetensors"
    )
    assert shapes == {
        "w_enc": [64, 128],
        "w_dec": [128, 64],
        "b_enc": [128],
        "b_dec": [64],
        "threshold": [128],
    }
    missing = "attn_out_all/layer_0_width_262k_l0_small/params.safetensors"
    with pytest.raises(
        FileNotFoundError, match=r"layer_0_width_262k_l0_small/params\.safetensors is not in the"
    ):
        loaders.get_safetensors_tensor_shapes(synthetic.GEMMA_SCOPE_REPO, missing)
    read_gemma_scope_shapes_from_cache()  # idempotent: still one wrapper
    assert loaders.get_safetensors_tensor_shapes.__wrapped__.__module__ == loaders.__name__


# ---------------------------------------------------------------------- Gemma 3 through TL


def test_gemma3_tl_config_equals_transformer_lens_own_for_real_dims() -> None:
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config
    from transformers import Gemma3TextConfig

    real = Gemma3TextConfig(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
        max_position_embeddings=32768, query_pre_attn_scalar=256,
    )  # fmt: skip
    ours = gemma_scope.gemma3_tl_config(real).to_dict()
    theirs = get_pretrained_model_config("google/gemma-3-270m", device="cpu").to_dict()
    assert ours == theirs
    with pytest.raises(ValueError, match="expected a Gemma 3 text config"):
        gemma_scope.gemma3_tl_config(synthetic.t5gemma2_config())


def test_gemma3_through_transformer_lens_equals_transformers(gemma_hub: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sae_lens_t5gemma.model.hooked import load_t5gemma2

    tl = gemma_scope.load_gemma3()
    hf = AutoModelForCausalLM.from_pretrained(synthetic.GEMMA3_MODEL).eval()
    assert (tl.cfg.d_model, tl.cfg.n_layers, tl.cfg.d_head, tl.cfg.window_size) == (64, 18, 16, 8)
    tokens = tl.to_tokens(synthetic.stand_in_texts()[:3])
    got: dict[str, torch.Tensor] = {}
    handle = hf.model.layers[LAYER].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: got.update(z=a[0])
    )
    with torch.no_grad():
        hf_out = hf(tokens, output_hidden_states=True)
        logits, cache = tl.run_with_cache(tokens)
    handle.remove()
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-4, rtol=1e-4)
    z = cache[f"blocks.{LAYER}.attn.hook_z"]
    assert z.shape == (*tokens.shape, 4, 16)
    # SAELens flattens hook_z head-major, which is exactly transformers' o_proj input.
    torch.testing.assert_close(z.flatten(-2), got["z"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"blocks.{LAYER}.hook_resid_post"], hf_out.hidden_states[LAYER + 1])

    # The T5Gemma 2 side of a transfer: its hook_z has the same [batch, pos, heads, d_head] layout.
    t5 = load_t5gemma2(T5, dtype=torch.float32, convention="reconstruct")  # the encoder reads the whole row
    enc_layer = t5.hf_model.model.encoder.text_model.layers[LAYER]
    handle = enc_layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.update(z5=a[0]))
    _, cache5 = t5.run_with_cache(tokens, names_filter=[f"encoder_blocks.{LAYER}.attn.hook_z"])
    t5.hf_model.get_encoder()(input_ids=tokens)
    handle.remove()
    z5 = cache5[f"encoder_blocks.{LAYER}.attn.hook_z"]
    assert z5.shape == z.shape
    torch.testing.assert_close(z5.flatten(-2), got["z5"])
    # The stand-in Gemma 3 carries the stand-in T5Gemma 2 encoder's weights.
    torch.testing.assert_close(
        hf.model.layers[3].mlp.up_proj.weight,
        t5.hf_model.model.encoder.text_model.layers[3].mlp.up_proj.weight,
    )


# ----------------------------------------------------------------------------- compare


def test_report_writes_every_file(report: R.Report) -> None:
    names = {p.name for p in report.files.values()}
    assert names == {
        "report.md", "results.csv", "results.json", "transfer.csv", "feature_transfer.csv",
        "l0_sweep.png", "ce_loss_score_by_layer.png", "encoder_vs_decoder.png", "transfer_by_layer.png",
        "transfer_encoder_vs_decoder.png", "norm_ratio_by_layer.png",
    }  # fmt: skip
    for path in report.files.values():
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(report.files["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    data = json.loads(report.files["json"].read_text())
    assert len(csv_rows) == len(data["rows"]) == len(report.rows) == 20
    for row, csv_row, json_row in zip(report.rows, csv_rows, data["rows"], strict=True):
        assert csv_row["hook_name"] == json_row["hook_name"] == row.hook_name
        assert float(csv_row["explained_variance"]) == pytest.approx(row.explained_variance, rel=1e-12)
    assert data["setup"]["same_tokens_for_all_models"] is True
    assert set(data["setup"]["sequences"].values()) == {BATCH * N_BATCHES}
    assert data["setup"]["rows"] == "one document per row, right-padded, padding masked"
    assert data["setup"]["documents"][T5] == {"documents": 25, "kept": 25, "too_short": 0, "truncated": 10}
    with open(report.files["transfer_csv"]) as f:
        assert len(list(csv.DictReader(f))) == 10
    with open(report.files["feature_transfer_csv"]) as f:
        carried = list(csv.DictReader(f))
    assert len(carried) == sum(len(ft.best) + len(ft.worst) for ft in report.features) == 10 * 2 * 10
    assert len(data["feature_transfer"]) == 10


def _variants(release: str) -> list[str]:
    return [f"{release}:layer_{LAYER}_width_16k_l0_{v}" for v in ("small", "big")]


def test_expected_rows_each_naming_its_site(report: R.Report, perfect: dict[str, Path]) -> None:
    got = {(r.sae, r.model, r.role, r.stack, r.hook_name, r.site) for r in report.rows}
    g3 = synthetic.GEMMA3_MODEL
    want = {
        (MC_ENC, T5, "native", "encoder", f"encoder_blocks.{LAYER}.attn.hook_out", "attn_out"),
        (MC_DEC, T5, "native", "decoder", f"decoder_blocks.{LAYER}.self_attn.hook_out", "attn_out"),
        (str(perfect["resid_post"]), T5, "native", "encoder", f"encoder_blocks.{LAYER}.hook_resid_post", "resid_post"),
        (str(perfect["attn_z"]), T5, "native", "encoder", f"encoder_blocks.{LAYER}.attn.hook_z", "attn_z"),
    }  # fmt: skip
    for att in _variants("gemma-scope-2-270m-pt-att-all"):
        want |= {
            (att, g3, "native", "decoder-only", f"blocks.{LAYER}.attn.hook_z", "attn_z"),
            (att, T5, "transfer", "encoder", f"encoder_blocks.{LAYER}.attn.hook_z", "attn_z"),
        }  # the decoder's attention is merged: no decoder transfer
    for res in _variants("gemma-scope-2-270m-pt-res-all"):
        want |= {(res, g3, "native", "decoder-only", f"blocks.{LAYER}.hook_resid_post", "resid_post")}
        want |= {
            (res, T5, "transfer", s, f"{s}_blocks.{LAYER}.hook_resid_post", "resid_post")
            for s in ("encoder", "decoder")
        }
    for mlp in _variants("gemma-scope-2-270m-pt-mlp-all"):
        want |= {(mlp, g3, "native", "decoder-only", f"blocks.{LAYER}.hook_mlp_out", "mlp_out_normed")}
        want |= {(mlp, T5, "transfer", s, f"{s}_blocks.{LAYER}.hook_mlp_out_normed", "mlp_out_normed") for s in ("encoder", "decoder")}  # fmt: skip
    assert got == want
    md = report.markdown
    for r in report.rows:
        assert r.layer == LAYER
        merged = r.family == "T5Gemma 2" and r.stack == "decoder" and r.site in ("attn_z", "attn_out")
        note = f" [{sites.MERGED_ATTENTION_NOTE}]" if merged else ""
        assert r.site_words == R.SITE_WORDS[r.site] + note
        assert (r.d_in, r.d_sae) == (64, 256 if r.sae_source == "mindchain" else 128)
        assert f"`{r.hook_name}`" in md and r.site_words in md
        assert r.n_tokens > 0 and r.eval_s > 0
    # The stand-in's small-L0 variant is sparser than its big one, as the real ones are.
    small, big = (report.find(v, synthetic.GEMMA3_MODEL) for v in _variants("gemma-scope-2-270m-pt-res-all"))
    assert small.l0 < big.l0
    assert "o_proj input" in R.SITE_WORDS["attn_z"] and "o_proj output" in R.SITE_WORDS["attn_out"]
    assert R.HONEST_SITES_NOTE in md and R.CE_KL_CAVEAT not in md  # prefix_lm: no copy-task caveat
    assert "## Tasks" in md and "T5Gemma 2 prefix_lm (p = n // 2)" in md
    assert md.index("> **SYNTHETIC**") < md.index("## Findings") < md.index("## Setup")


def test_transfer_rows_match_tasks_positions_and_feature_reads(report: R.Report) -> None:
    assert len(report.transfer) == len(report.features) == 10
    for t, ft in zip(report.transfer, report.features, strict=True):
        home = report.find(t.sae, synthetic.GEMMA3_MODEL, "native")
        there = next(r for r in report.rows if r.sae == t.sae and r.hook_name == t.target_hook)
        assert (t.target_hook, t.home_hook, t.target_stack) == (ft.target_hook, home.hook_name, there.stack)
        # No row mixes tasks: both ΔCE columns were scored on one matched task.
        assert t.same_task and t.task_target == H.matched_task(t.target_stack, CTX // 2, CTX)
        assert t.ce_increase_target == there.ce_increase and t.ce_increase_home is not None
        # EV on the target comes from the same positions as the covered-position eval of the row.
        assert t.n_tokens == ft.n_tokens == there.n_tokens
        assert t.ev_target == pytest.approx(there.explained_variance, rel=1e-4, abs=1e-5)
        assert t.l0_target == pytest.approx(there.l0, rel=1e-5)
        assert (t.ev_home, t.norm_ratio, t.corr_median) == (ft.ev_home, ft.norm_ratio, ft.corr_median)
        assert t.ev_kept == T.ev_kept(t.ev_target, t.ev_home)
        assert 0.0 < t.norm_ratio < 10.0 and -1.0 <= t.corr_median <= 1.0
        if t.target_stack == "encoder":
            # The stand-in's Gemma 3 holds the T5Gemma 2 encoder's weights: causally, they agree.
            assert t.corr_median_causal == pytest.approx(1.0, abs=1e-4)
            assert t.ev_causal == pytest.approx(t.ev_home, abs=1e-4)
        else:
            assert t.ev_causal is None and t.corr_median_causal is None
        assert f"{MC_ENC if t.target_stack == 'encoder' else MC_DEC} (attn_out, different site" in t.natives
    md = report.markdown
    assert "## Feature-level transfer and controls" in md and "### Best and worst carried features" in md
    assert "(differ)" not in md  # every transfer row on one task
    transfer_table = md[md.index("## Transfer:") : md.index("Tasks:\n")]
    for line in transfer_table.splitlines():
        if line.startswith("| gemma-scope"):
            assert line.rstrip(" |").rsplit("| ", 1)[-1] in ("T1", "T2")  # one task per row


def test_findings_are_generated_from_the_numbers_and_marked_synthetic(report: R.Report) -> None:
    assert report.findings and all(f.startswith(R.SYNTHETIC_PREFIX) for f in report.findings)
    enc_res = [t for t in report.transfer if t.site == "resid_post" and t.target_stack == "encoder"]
    median = sorted(t.corr_median for t in enc_res)
    want = (median[0] + median[1]) / 2
    line = next(f for f in report.findings if "resid_post SAEs on T5Gemma 2's encoder" in f)
    assert f"median feature correlation with Gemma 3 {want:.2f}" in line
    causal = next(f for f in report.findings if "Run causally" in f)
    assert "to 1.00" in causal
    assert any(f"at most {max(r.n_tokens for r in report.rows):,} tokens" in f for f in report.findings)
    for f in report.findings:
        assert f"- {f}" in report.markdown


def _pink_fraction(path: Path) -> float:
    """Share of pixels in the SYNTHETIC watermark's colour (light red on white)."""
    from matplotlib.image import imread

    img = imread(path)[..., :3]
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return float(((r > 0.95) & (g > 0.7) & (g < 0.93) & (abs(g - b) < 0.05)).mean())


def test_matched_variants_pick_the_nearest_l0_of_the_same_site(report: R.Report, perfect) -> None:
    matches = R.matched_variants(report.rows)
    # Issue 19, item 8: the mindchain SAE reads the o_proj output; no Gemma Scope 2 SAE here does,
    # so it is matched with none (it was matched with attn_z, resid_post and mlp_out_normed).
    assert [m for m in matches if m["sae"] == MC_ENC] == []
    local = {m["sae"]: m for m in matches if m["sae"] in {str(p) for p in perfect.values()}}
    assert {(m["site"], m["gemma_scope_site"]) for m in local.values()} == {
        ("resid_post", "resid_post"), ("attn_z", "attn_z")
    }  # fmt: skip
    assert all(m["site"] == m["gemma_scope_site"] for m in matches)
    for m in local.values():
        candidates = [r for r in report.rows if r.family == "Gemma 3" and r.site == m["gemma_scope_site"]]
        nearest = min(candidates, key=lambda r: abs(math.log(r.l0 / m["l0"])))
        assert m["gemma_scope_sae"] == nearest.sae and m["candidates"] == 2
    assert "## Matched sparsity" in report.markdown


def test_perfect_sae_scores_one(report: R.Report, perfect: dict[str, Path]) -> None:
    for key in ("resid_post", "attn_z"):
        r = report.find(str(perfect[key]))
        assert (r.sae_source, r.role) == ("local", "native")
        assert r.explained_variance == pytest.approx(1.0, abs=1e-6)
        assert r.cossim == pytest.approx(1.0, abs=1e-5)
        assert r.mse == pytest.approx(0.0, abs=1e-9)
        assert abs(r.ce_increase) < 1e-5
        assert r.ce_loss_score == pytest.approx(1.0, abs=1e-3)
        assert r.kl_div_score == pytest.approx(1.0, abs=1e-3)
        assert abs(r.ce_loss_with_ablation - r.ce_loss_without_sae) > 1e-5  # the ablation is felt


def _direct(acts: torch.Tensor, keep: torch.Tensor, sae) -> dict[str, float]:
    x = acts.flatten(-2) if acts.ndim == 4 else acts
    x = x[keep]
    feats = sae.encode(x)
    recon = sae.decode(feats)
    resid = (x - recon).pow(2).sum(-1)
    total = x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum()
    return {
        "explained_variance": float(1 - resid.mean() / total),
        "mse": float(resid.mean()),
        "l0": float((feats != 0).sum(-1).float().mean()),
        "dead_frac": float(((feats != 0).sum(0) == 0).float().mean()),
    }


@torch.no_grad()
def test_metrics_equal_a_direct_computation(report: R.Report) -> None:
    from sae_lens import SAE

    from sae_lens_t5gemma.model.hooked import load_t5gemma2

    g3 = gemma_scope.load_gemma3()
    t5 = load_t5gemma2(
        T5, dtype=torch.float32
    )  # prefix_lm, as compare's default: the encoder reads tokens[:, :p]
    p = CTX // 2
    tokens, _ = corpus.document_batches(g3.tokenizer, synthetic.stand_in_texts(), CTX, min_tokens=p + 1)
    tokens = tokens[: BATCH * N_BATCHES]
    keep = ~torch.isin(tokens, torch.tensor([0, 1, 2]))  # pad, eos, bos
    assert not bool(keep.all())  # short documents are padded
    encoder_part = torch.arange(CTX) < p
    for spec, model, hook, where in (
        (GS_RES, g3, f"blocks.{LAYER}.hook_resid_post", keep),
        (GS_ATT, g3, f"blocks.{LAYER}.attn.hook_z", keep),
        (GS_ATT, t5, f"encoder_blocks.{LAYER}.attn.hook_z", keep & encoder_part),
    ):
        release, sae_id = spec.split(":")
        sae = SAE.from_pretrained(release=release, sae_id=sae_id)
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        want = _direct(cache[hook], where, sae)
        row = next(r for r in report.rows if r.sae == spec and r.hook_name == hook)
        assert row.n_tokens == int(where.sum())
        for name, value in want.items():
            assert getattr(row, name) == pytest.approx(value, rel=1e-4, abs=1e-6), (spec, hook, name)
    # Gemma 3 is scored on the same task as T5Gemma 2: next-token CE on the continuation targets
    # tokens[:, p:] (non-special), having read the prefix.
    loss = g3(tokens, return_type="loss", loss_per_token=True)
    scored = keep[:, 1:] & (torch.arange(1, CTX) >= p)
    row = report.find(GS_RES, synthetic.GEMMA3_MODEL)
    assert row.ce_loss_without_sae == pytest.approx(float(loss[scored].mean()), rel=1e-5)
    assert (
        row.task
        == f"next-token prediction, scored on the prefix_lm continuation (targets at positions >= {p})"
    )
    # T5Gemma 2's: the decoder reads [BOS] + tokens[:, p:], scored on tokens[:, p:].
    t5_loss = t5(tokens, return_type="loss", loss_per_token=True)
    row = report.find("t5gemma2-270m-attn_out:encoder/layer_1", T5)
    assert row.ce_loss_without_sae == pytest.approx(float(t5_loss[scored].mean()), rel=1e-5)
    assert row.task.startswith("T5Gemma 2 prefix_lm (p = n // 2)")
    # The transfer's matched Gemma 3 ΔCE: the SAE spliced at prefix positions only, scored on
    # the continuation, as T5Gemma 2's encoder transfer is.
    release, sae_id = GS_RES.split(":")
    sae = SAE.from_pretrained(release=release, sae_id=sae_id)
    hook = f"blocks.{LAYER}.hook_resid_post"
    splice_at = (keep & encoder_part).unsqueeze(-1)

    def splice(act: torch.Tensor, hook) -> torch.Tensor:
        return torch.where(splice_at, sae.decode(sae.encode(act)), act)

    spliced = g3.run_with_hooks(tokens, fwd_hooks=[(hook, splice)], return_type="loss", loss_per_token=True)
    t = next(t for t in report.transfer if t.sae == GS_RES and t.target_stack == "encoder")
    want = float(spliced[scored].mean() - loss[scored].mean())
    assert t.ce_increase_home == pytest.approx(want, rel=1e-4, abs=1e-6)


# -------------------------------------------------------------------------- pairs, CLI


def test_pair_specs_and_standard_pairs() -> None:
    assert P.Pair.parse("gemma-scope-2-270m-pt-res-all:layer_1_width_16k_l0_small") == P.Pair(GS_RES)
    assert P.Pair.parse(f"sae={GS_RES}, model={T5}, hook=encoder_blocks.1.hook_resid_post") == P.Pair(
        GS_RES, T5, "encoder_blocks.1.hook_resid_post"
    )
    with pytest.raises(ValueError, match="expected 'sae=...,model=...,hook=...', got 'layer=3'"):
        P.Pair.parse(f"sae={GS_RES},layer=3")
    with pytest.raises(ValueError, match="names no SAE"):
        P.Pair.parse(f"model={T5}")
    pairs = C.standard_pairs(
        [4],
        decoder=False,
        gemma_scope_sites=("attn_out", "mlp_out"),
        gemma_scope_variant="width_16k_l0_small",
    )
    att, mlp = (
        "gemma-scope-2-270m-pt-att-all:layer_4_width_16k_l0_small",
        "gemma-scope-2-270m-pt-mlp-all:layer_4_width_16k_l0_small",
    )
    assert pairs == [
        P.Pair("t5gemma2-270m-attn_out:encoder/layer_4", T5),
        P.Pair(att),
        P.Pair(att, T5, "encoder_blocks.4.attn.hook_z"),  # no decoder transfer: merged attention
        P.Pair(mlp),
        P.Pair(mlp, T5, "encoder_blocks.4.hook_mlp_out_normed"),
        P.Pair(mlp, T5, "decoder_blocks.4.hook_mlp_out_normed"),
    ]
    everything = C.standard_pairs([4], mindchain=False, gemma_scope_sites=("resid_post",), transfer=False)
    assert [p.sae for p in everything] == [
        "gemma-scope-2-270m-pt-res-all:layer_4_width_16k_l0_small",
        "gemma-scope-2-270m-pt-res-all:layer_4_width_16k_l0_big",
    ]
    with pytest.raises(ValueError, match="Unknown Gemma Scope 2 site 'resid'"):
        C.standard_pairs([4], gemma_scope_sites=("resid",))
    assert sites.transfer_hook("blocks.7.attn.hook_z") == "encoder_blocks.7.attn.hook_z"
    assert sites.transfer_hook("blocks.7.hook_resid_post") == "encoder_blocks.7.hook_resid_post"
    # post-norm in Gemma 3: T5Gemma 2's post-norm site, not its MLP output
    assert sites.transfer_hook("blocks.7.hook_mlp_out") == "encoder_blocks.7.hook_mlp_out_normed"
    assert sites.transfer_hook("blocks.7.hook_resid_mid.x") is None


def test_cli_compare_transfer_pair(
    gemma_hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"sae={GS_RES},model={T5},hook=encoder_blocks.{LAYER}.hook_resid_post"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(synthetic.stand_in_texts()[:12]) + "\n\n")
    rc = main(["compare", "--pair", spec, "--dataset", str(texts), "--context-size", "16", "--n-batches", "1",
               "--convention", "reconstruct", "--out", str(tmp_path / "out")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    # The home evaluation (Gemma 3) is added before the transfer row.
    assert [(r["model"], r["role"]) for r in data["rows"]] == [
        (synthetic.GEMMA3_MODEL, "native"),
        (T5, "transfer"),
    ]
    assert data["setup"]["n_texts"] == 12 and data["setup"]["context_size"] == 16
    assert "transfer T5Gemma 2 encoder" in out and "report.md" in out
    # reconstruct is a copy task Gemma 3 cannot do: the transfer row keeps the tasks apart.
    (t,) = data["transfer"]
    assert t["task_target"].startswith("T5Gemma 2 reconstruct") and t["ce_increase_home"] is None
    assert t["task_home"] == "next-token prediction, every target"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "T1 vs T2 (differ)" in md and "| n/a | T1 vs T2 (differ) |" in md
    # Full rows only under reconstruct (the encoder would read padding): 12 documents, some too short.
    docs = data["setup"]["documents"][T5]
    assert docs["kept"] + docs["too_short"] == 12 and docs["kept"] >= 4
    # Real (non-synthetic) runs carry no SYNTHETIC label, stand-in runs do.
    assert not any(f.startswith(R.SYNTHETIC_PREFIX) for f in data["findings"])
    assert _pink_fraction(tmp_path / "out" / "transfer_by_layer.png") < 0.002


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "error: nothing to compare: give --layers, --pair or --local-sae"),
        (["--pair", "no-such-release:x"], "error: unknown SAE release 'no-such-release'"),
        (
            ["--pair", f"{MC_ENC}x"],
            "error: SAE id 'encoder/layer_1x' is not in release 't5gemma2-270m-attn_out'",
        ),
        (
            ["--pair", "sae=/no/such/folder"],
            "error: SAE '/no/such/folder': expected RELEASE:SAE_ID or an existing",
        ),
        (
            ["--layers", "1", "--dataset", "/no/such/texts.txt"],
            "error: Texts file /no/such/texts.txt does not exist.",
        ),
        (
            ["--stand-in", "--size", "1b", "--layers", "3", "12"],
            "error: --layers 3 12: the 1b stand-in has 8 layers per stack (0-7); the real model has more.",
        ),
    ],
)
def test_cli_compare_errors(gemma_hub: Path, argv: list[str], message: str, capsys, tmp_path: Path) -> None:
    assert main(["compare", *argv, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "report.md").exists()


def test_compare_refuses_a_site_the_sae_does_not_fit(gemma_hub: Path, tmp_path: Path) -> None:
    narrow = _perfect_sae(tmp_path / "narrow", f"encoder_blocks.{LAYER}.hook_resid_post", d_in=32)
    with pytest.raises(
        ValueError, match=r"\(d_in=32\) does not fit encoder_blocks.1.hook_resid_post on .* 64 wide"
    ):
        C.compare([str(narrow)], out_dir=tmp_path / "out", context_size=CTX, n_batches=1, progress=False)
    with pytest.raises(ValueError, match="Unknown T5Gemma 2 hook name 'encoder_blocks.1.hook_resid_postt'"):
        C.compare([P.Pair(GS_RES, T5, f"encoder_blocks.{LAYER}.hook_resid_postt")], out_dir=tmp_path / "out",
                  context_size=CTX, n_batches=1, progress=False)  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"To apply it at the same activation of T5Gemma 2, give hook=encoder_blocks\.1\.hook_resid_post\.",
    ):
        C.compare(
            [P.Pair(GS_RES, T5)], out_dir=tmp_path / "out", context_size=CTX, n_batches=1, progress=False
        )
    assert not (tmp_path / "out" / "report.md").exists()


def test_hook_z_width_differs_from_d_model_as_on_the_real_model(tmp_path: Path) -> None:
    """Heads x head_dim != d_model (4 x 32 = 128 vs 64), as 4 x 256 = 1024 vs 640 on the real pair."""
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "hub"
    t5 = synthetic.build_t5gemma2(num_hidden_layers=2, head_dim=32)
    for repo, model in ((T5, t5), (synthetic.GEMMA3_MODEL, synthetic.gemma3_from_t5gemma2_encoder(t5))):
        folder = tmp_path / repo.replace("/", "--")
        model.save_pretrained(folder)
        synthetic.build_tokenizer(folder)
        synthetic.write_hub_folder(cache, repo, folder)
    synthetic.write_mindchain_repo(cache, n_layers=2, d_in=64, d_sae=32)
    synthetic.write_gemma_scope_repo(cache, n_layers=2, d_in={"attn_out": 128}, d_sae=32, sites=("attn_out",))
    with synthetic.offline_hub(cache):
        # query_pre_attn_scalar (16) != head_dim (32): TransformerLens must scale by 16**-0.5 too.
        tl = gemma_scope.load_gemma3()
        hf = AutoModelForCausalLM.from_pretrained(synthetic.GEMMA3_MODEL).eval()
        tokens = tl.to_tokens(synthetic.stand_in_texts()[:2])
        with torch.no_grad():
            torch.testing.assert_close(tl(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
        pairs = C.standard_pairs([1], decoder=False, gemma_scope_sites=("attn_out",))
        rep = C.compare(pairs, out_dir=tmp_path / "out", context_size=CTX, n_batches=1, progress=False)
    widths = {(r.sae.split(":")[0], r.model, r.site): r.d_in for r in rep.rows}
    assert widths == {
        ("t5gemma2-270m-attn_out", T5, "attn_out"): 64,
        ("gemma-scope-2-270m-pt-att-all", synthetic.GEMMA3_MODEL, "attn_z"): 128,
        ("gemma-scope-2-270m-pt-att-all", T5, "attn_z"): 128,
    }
    assert "| 128 | 32 |" in rep.markdown and "| 64 | 32 |" in rep.markdown


def test_every_plot_of_a_stand_in_run_carries_the_synthetic_label(report: R.Report) -> None:
    for key, path in report.files.items():
        if path.suffix == ".png":
            assert _pink_fraction(path) > 0.01, key  # the diagonal SYNTHETIC watermark


def test_cli_compare_size_4b_pairs_the_4b_models_and_releases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """compare --size 4b on the shrunken 4B stand-ins (real structure: RoPE x8 on global layers)."""
    out = tmp_path / "out"
    rc = main(["compare", "--stand-in", "--size", "4b", "--layers", "1", "--gemma-scope-sites", "resid_post",
               "--gemma-scope-variant", "width_16k_l0_small", "--n-batches", "1", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    spec = "gemma-scope-2-4b-pt-res-all:layer_1_width_16k_l0_small"
    assert [(r["sae"], r["model"], r["role"], r["stack"]) for r in data["rows"]] == [
        (spec, "google/gemma-3-4b-pt", "native", "decoder-only"),
        (spec, "google/t5gemma-2-4b-4b", "transfer", "encoder"),
        (spec, "google/t5gemma-2-4b-4b", "transfer", "decoder"),
    ]  # no mindchain rows: those SAEs exist for 270M only
    assert data["title"] == "SAE comparison: T5Gemma 2 4b-4b and Gemma 3 4B"
    enc = next(t for t in data["transfer"] if t["target_stack"] == "encoder")
    # At 4B both models scale RoPE by 8 and the stand-in's Gemma 3 holds the encoder's weights:
    # the causal control recovers Gemma 3 exactly.
    assert enc["corr_median_causal"] == pytest.approx(1.0, abs=1e-4)
    assert all(f.startswith(R.SYNTHETIC_PREFIX) for f in data["findings"])
