"""Feature dashboards (dashboard.py), the Neuronpedia export (neuronpedia.py) and their commands.

Covers: the pages and index are written, self-contained (no http(s) URL, inline SVG), name
the feature, site, width, convention and SYNTHETIC; encoder pages carry ablation tables and
decoder pages logit tables; the Neuronpedia export validates against SAEDashboard's
batch layout (and the validator rejects broken batches with the field's path); the proposed
Neuronpedia ids; the ``dashboard`` and ``find-features`` commands; and a page rendered in
headless Chromium shows the feature number and its top tokens (screenshot saved to
``out/test_screenshots/``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sae_lens_t5gemma.analysis import feature_stats as F
from sae_lens_t5gemma.analysis import stats_state as S
from sae_lens_t5gemma.cli import main as cli
from sae_lens_t5gemma.dashboard import neuronpedia as N
from sae_lens_t5gemma.dashboard import pages as D
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic

TEXTS = synthetic.stand_in_texts()
CFG = S.StatsConfig(top_k=5, n_samples=8, left=6, right=3, context_size=32, batch_size=8, chunk_rows=16)
ENC = "encoder_blocks.1.attn.hook_out"
DEC = "decoder_blocks.1.self_attn.hook_out"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "out" / "test_screenshots"


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HookedT5Gemma2:
    from transformers import AutoTokenizer, T5Gemma2ForConditionalGeneration

    hf = T5Gemma2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    return HookedT5Gemma2(hf, AutoTokenizer.from_pretrained(tiny_model_dir))


def make_sae(hook: str, seed: int, d_sae: int = 32):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=64, d_sae=d_sae, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = "tiny"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.fill_(-0.08)
    return sae


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    """Dashboards for one encoder and one decoder SAE (first 3 features each)."""
    out = tmp_path_factory.mktemp("dash")
    saes = {"enc": make_sae(ENC, 1), "dec": make_sae(DEC, 4)}  # seed 4: feature 1 fires (11 of 379)
    stats = F.corpus_stats(
        model, saes, texts=TEXTS, out=out / "stats", config=CFG, synthetic=True, progress=False
    )
    pages = {}
    for key, sae in saes.items():
        pages[key] = D.write_dashboard(
            model, sae, stats, out / key, [0, 1, 2], key=key, texts=TEXTS, progress=False
        )
    return out, stats, saes, pages


def test_pages_are_written_self_contained_and_labelled(built):
    out, stats, saes, pages = built
    for key in ("enc", "dec"):
        folder = out / key
        assert sorted(p.name for p in folder.glob("*.html")) == [
            "feature_0.html", "feature_1.html", "feature_2.html", "index.html"
        ]  # fmt: skip
        page = (folder / "feature_1.html").read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from the network
        assert "<svg" in page and "Feature 1" in page and "SYNTHETIC" in page
        info = stats.info(key)
        assert info.hook_name in page and f"d_in {info.d_in}" in page and f"d_sae {info.d_sae}" in page
        assert "prefix_lm" in page
        top = stats.top_examples(key, 1)
        assert f"{top[0].activation:.4g}" in page
        index = pages[key].read_text()
        assert all(f'href="feature_{f}.html"' in index for f in (0, 1, 2))
    enc_page = (out / "enc" / "feature_1.html").read_text()
    dec_page = (out / "dec" / "feature_1.html").read_text()
    assert "Ablation effects" in enc_page and "Mean KL" in enc_page and "ENC</span>" in enc_page
    assert "Logit effects" in dec_page and "soft-cap" in dec_page and "DEC</span>" in dec_page
    assert "|dec&rarr;" in dec_page  # the prefix/continuation boundary is marked in decoder contexts


def test_neuronpedia_export_validates(built, model, tmp_path):
    out, stats, saes, _ = built
    paths = N.export_neuronpedia(
        model, saes["dec"], stats, tmp_path / "np_dec", key="dec", features_per_batch=10
    )
    fired = int((stats.density("dec") > 0).sum())
    assert len(paths) == -(-fired // 10)
    batches = [json.loads(p.read_text()) for p in paths]
    for i, b in enumerate(batches):
        N.validate_batch(b, f"batch-{i}")
    feat = batches[0]["features"][0]
    f = feat["feature_index"]
    assert feat["frac_nonzero"] == pytest.approx(float(stats.density("dec")[f]))
    assert sum(feat["freq_hist_data_bar_heights"]) == int(stats.tensors["dec"]["fire_count"][f])
    top = stats.top_examples("dec", f)
    assert feat["activations"][0]["tokens"] == top[0].tokens
    assert (
        feat["activations"][0]["tokens"][feat["activations"][0]["qualifying_token_index"]]
        == top[0].tokens[top[0].center]
    )
    assert (feat["activations"][0]["bin_min"], feat["activations"][0]["bin_contains"]) == (-1, -1)
    assert len(feat["pos_str"]) == len(feat["neg_str"]) == 10
    assert (batches[0]["model_id"], batches[0]["layer"], batches[0]["sae_set"]) == (
        N.neuronpedia_model_id(stats.meta["model"]),
        1,
        "t5g2-dec-attn-out-32",
    )
    extras = json.loads((tmp_path / "np_dec" / "t5gemma2.json").read_text())
    assert extras["synthetic"] is True and extras["stack"] == "decoder"
    assert extras["segments"][str(f)][0] == top[0].segments
    skipped = json.loads((tmp_path / "np_dec" / "skipped_indexes.json").read_text())["skipped_indexes"]
    assert len(skipped) + fired == saes["dec"].cfg.d_sae
    # encoder site with ablation tables
    paths = N.export_neuronpedia(model, saes["enc"], stats, tmp_path / "np_enc", key="enc", features=[0, 1],
                                 ablation=True, texts=TEXTS)  # fmt: skip
    enc = json.loads(paths[0].read_text())
    N.validate_batch(enc)
    assert [x["feature_index"] for x in enc["features"]] == [0, 1]
    assert enc["sae_set"].startswith("t5g2-enc-attn-out-")


def test_validator_names_the_broken_field(built, model, tmp_path):
    _, stats, saes, _ = built
    densest = int(stats.density("dec").argmax())
    (path,) = N.export_neuronpedia(model, saes["dec"], stats, tmp_path, key="dec", features=[densest])
    batch = json.loads(path.read_text())
    del batch["features"][0]["activations"][0]["values"]
    with pytest.raises(
        ValueError, match=r"batch.features\[0\].activations\[0\]: missing fields \['values'\]"
    ):
        N.validate_batch(batch)
    batch = json.loads(path.read_text())
    batch["features"][0]["frac_nonzero"] = "0.5"
    with pytest.raises(ValueError, match=r"batch.features\[0\].frac_nonzero: expected"):
        N.validate_batch(batch)


def test_neuronpedia_ids():
    ids = N.mindchain_neuronpedia_ids()
    assert len(ids) == 36
    assert ids["encoder/layer_5"] == "t5gemma-2-270m-270m/5-mindchain-enc-attn-out-4k"
    assert ids["decoder/layer_17"] == "t5gemma-2-270m-270m/17-mindchain-dec-attn-out-4k"


def test_dashboard_and_find_features_commands(model, tiny_model_dir, tmp_path, capsys):
    sae = make_sae(DEC, 3)
    sae.save_model(tmp_path / "sae")
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    argv = ["dashboard", str(tmp_path / "sae"), "--dataset", str(data), "--model", str(tiny_model_dir),
            "--features", "2", "5", "--out", str(tmp_path / "d"), "--context-size", "32", "--top-k", "4"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "d").glob("*.html")) == [
        "feature_2.html",
        "feature_5.html",
        "index.html",
    ]
    assert json.loads((tmp_path / "d" / "stats" / "stats.json").read_text())["rows_done"] == len(TEXTS)
    N.validate_batch(json.loads((tmp_path / "d" / "neuronpedia" / "batch-0.json").read_text()))
    assert cli.main(argv) == 2  # statistics already there
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    assert cli.main([*argv, "--resume"]) == 0
    capsys.readouterr()
    (tmp_path / "with.txt").write_text("\n".join(TEXTS[:4]))
    (tmp_path / "without.txt").write_text("\n".join(TEXTS[4:8]))
    code = cli.main(["find-features", str(tmp_path / "sae"), "--with", str(tmp_path / "with.txt"), "--without",
                     str(tmp_path / "without.txt"), "--model", str(tiny_model_dir), "-k", "3"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "ranked by mean peak activation" in text and len(text.strip().splitlines()) == 5
    assert cli.main(["find-features", str(tmp_path / "sae"), "--with", "nope.txt", "--without", "x"]) == 2
    assert "Texts file nope.txt does not exist." in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_page_renders_in_headless_chromium(built, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "chromium is not installed and could not be: run `make browser` (apt-get install chromium)"
        )
    out, stats, _, _ = built
    page = out / "dec" / "feature_1.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout  # fmt: skip
    text = re.sub(r"<[^>]+>", "", dom)
    import html

    text = html.unescape(text)
    assert "Feature 1" in text
    assert re.search(r'id="feature-number">1<', dom)
    top = stats.top_examples("dec", 1)[0]
    assert top.tokens[top.center] in text  # the strongest example's token, as rendered
    assert "".join(D.tokrepr(t) for t in top.tokens[top.center - 1 : top.center + 1]) in text.replace(
        "|dec→", ""
    )
    assert "SYNTHETIC" in text and "decoder_blocks.1.self_attn.hook_out" in text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "decoder_feature_1.png"
    subprocess.run([browser, *flags, "--window-size=1400,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_model_gives_the_same_dashboards(built, tiny_model_dir, tmp_path, dtype):
    """The same float32 SAEs on a bfloat16/float16 model: densities within rounding of float32's,
    pages and the export say the dtype they ran in."""
    from sae_lens_t5gemma.model.hooked import load_t5gemma2

    _, stats32, saes, _ = built
    low = load_t5gemma2(tiny_model_dir, dtype=dtype)
    stats = F.corpus_stats(low, saes, texts=TEXTS, out=tmp_path / "stats", config=CFG, synthetic=True,
                           progress=False)  # fmt: skip
    assert stats.meta["dtype"] == dtype and stats.meta["sae_dtype"] == {"enc": "float32", "dec": "float32"}
    for key in ("enc", "dec"):
        assert stats.n_tokens(key) == stats32.n_tokens(key)
        # A feature's density moves only where rounding crosses its threshold: a few positions.
        assert (stats.density(key) - stats32.density(key)).abs().max() < 0.05, key
    index = D.write_dashboard(low, saes["enc"], stats, tmp_path / "enc", [0, 1], key="enc", texts=TEXTS,
                              progress=False)  # fmt: skip
    assert (
        f"({dtype})" in index.read_text()
        and f"model {dtype}" in (tmp_path / "enc" / "feature_0.html").read_text()
    )
    N.export_neuronpedia(low, saes["dec"], stats, tmp_path / "np", key="dec", features=[0])
    assert json.loads((tmp_path / "np" / "t5gemma2.json").read_text())["model_dtype"] == dtype
