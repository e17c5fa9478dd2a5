"""The demo's hook-and-steer section on the offline stand-in (real SAE.from_pretrained path).

Covers: it loads ``google/t5gemma-2-270m-270m`` (the stand-in in the fake hub cache) with
``load_t5gemma2`` and the ``t5gemma2-270m-attn_out`` SAE ``encoder/layer_5``, prints the
splice check, top features and steering, and writes a JSON whose top features equal a
direct ``top_features`` call and whose steered next-token distribution differs.
"""

import json

import torch
from sae_lens import SAE

import sae_lens_t5gemma  # noqa: F401 (registers the release)
from sae_lens_t5gemma import synthetic
from sae_lens_t5gemma.demo import section_hook_and_steer
from sae_lens_t5gemma.hooked import load_t5gemma2
from sae_lens_t5gemma.steering import top_features


def test_section_hook_and_steer(hub_cache, tmp_path, capsys):
    with synthetic.offline_hub(hub_cache):
        section_hook_and_steer(hub_cache, tmp_path)
        model = load_t5gemma2(synthetic.T5GEMMA2_MODEL, dtype=torch.float32)
        sae = SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id="encoder/layer_5")
    printed = capsys.readouterr().out
    assert "(SYNTHETIC), SAE encoder/layer_5 at encoder_blocks.5.attn.hook_out" in printed
    assert "(unchanged, as it should be)" in printed
    record = json.loads((tmp_path / "hook_and_steer.json").read_text())
    assert record["hook"] == "encoder_blocks.5.attn.hook_out" and record["label"] == "SYNTHETIC"
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
