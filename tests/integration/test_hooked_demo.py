"""The demo's hook-and-steer section on the offline stand-in (real SAE.from_pretrained path).

Covers: it loads ``google/t5gemma-2-270m-270m`` (the stand-in in the fake hub cache) with
``load_t5gemma2`` and the ``t5gemma2-270m-attn_out`` SAE ``encoder/layer_5``, prints the
splice check, top features and steering, and writes a JSON whose top features equal a
direct ``top_features`` call and whose steered next-token distribution differs; in float32,
bfloat16 and float16 (the demo's ``--dtype``), with the SAE in float32.
"""

import json

import pytest
import torch
from sae_lens import SAE

import sae_lens_t5gemma  # noqa: F401 (registers the release)
from sae_lens_t5gemma.cli.demo import models_in, section_hook_and_steer
from sae_lens_t5gemma.model.hooked import load_t5gemma2
from sae_lens_t5gemma.model.steering import top_features
from sae_lens_t5gemma.stand_in import synthetic as synthetic


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_section_hook_and_steer(hub_cache, tmp_path, capsys, dtype):
    with synthetic.offline_hub(hub_cache), models_in(dtype):
        section_hook_and_steer(hub_cache, tmp_path)
        model = load_t5gemma2(synthetic.T5GEMMA2_MODEL)
        sae = SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id="encoder/layer_5")
    assert model.cfg.dtype == getattr(torch, dtype)
    printed = capsys.readouterr().out
    assert f"(SYNTHETIC, {dtype}), SAE encoder/layer_5 at encoder_blocks.5.attn.hook_out" in printed
    assert "(unchanged, as it should be)" in printed
    record = json.loads((tmp_path / "hook_and_steer.json").read_text())
    assert record["hook"] == "encoder_blocks.5.attn.hook_out" and record["label"] == "SYNTHETIC"
    assert record["dtype"] == dtype and sae.cfg.dtype == "float32"
    rows = top_features(model, sae, record["text"], k=8)
    assert [(r["position"], r["feature"]) for r in record["top_features"]] == [
        (r.position, r.feature) for r in rows
    ]
    torch.testing.assert_close(
        torch.tensor([r["activation"] for r in record["top_features"]]),
        torch.tensor([r.activation for r in rows]),
    )
    assert record["steered_feature"] == rows[0].feature
    assert record["next_token_after"] != record["next_token_before"]
