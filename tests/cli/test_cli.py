"""CLI ``list``, ``inspect`` and ``convert`` through ``cli.main([...])``: output, numbers
and return codes (0, and 2 with one ``error:`` line for bad input), plus the weight
statistics behind ``inspect`` on an SAE with known dead latents. Also the fast entry: the
console module ``sae_lens_t5gemma_cli`` answers ``--help``, ``list`` and argument errors
without importing torch or SAELens, ``list`` from the YAML equals the registered listing,
and every other command registers the release before it runs. (Speed itself is measured in
``benchmarks/bench_cli.py``, not here.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_t5gemma.cli import main as cli
from sae_lens_t5gemma.loading.inspection import sae_stats
from sae_lens_t5gemma.stand_in import synthetic as synthetic

RELEASE = "t5gemma2-270m-attn_out"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_list(capsys):
    rc, out, err = _run(capsys, "list")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == (
        "t5gemma2-270m-attn_out  (repo mindchain/t5gemma2-sae-all-layers, model google/t5gemma-2-270m-270m, "
        "loader mindchain_t5gemma2, 36 SAEs)"
    )
    assert lines[1].split() == ["id", "path", "hook_name", "hf_hook_name"]
    rows = [ln.split() for ln in lines[2:38]]
    assert rows[5] == [
        "encoder/layer_5",
        "encoder/sae_encoder_05.pt",
        "encoder_blocks.5.attn.hook_out",
        "model.encoder.text_model.layers.5.self_attn.o_proj",
    ]
    assert rows[35] == [
        "decoder/layer_17",
        "decoder/sae_decoder_17.pt",
        "decoder_blocks.17.self_attn.hook_out",
        "model.decoder.layers.17.self_attn.o_proj",
    ]
    assert "SAELens' other releases" not in out


def test_list_all(capsys):
    rc, out, _ = _run(capsys, "list", "--all")
    assert rc == 0
    m = re.search(r"SAELens' other releases \((\d+)\):", out)
    assert m and int(m.group(1)) > 100
    assert re.search(
        r"^  gemma-scope-2-270m-pt-att  repo google/gemma-scope-2-270m-pt  model google/gemma-3-270m  loader gemma_3  \d+ SAEs$",
        out,
        re.M,
    )


def test_inspect_release(hub_cache, capsys):
    rc, out, err = _run(capsys, "inspect", RELEASE, "encoder/layer_5")
    assert rc == 0, err
    assert out.startswith("SAE t5gemma2-270m-attn_out / encoder/layer_5: StandardSAE\nconfig:\n")
    assert '"hook_name": "encoder_blocks.5.attn.hook_out"' in out
    assert '"apply_b_dec_to_input": false' in out
    assert '"training_history": {\n' in out and '"l0": "3 values, last 1367.0"' in out
    ck = synthetic.mindchain_checkpoint("encoder", 5, 64, 256, seed=0)
    w = ck["W_enc"]
    row = next(ln for ln in out.splitlines() if ln.strip().startswith("W_enc"))
    expected = [w.mean().item(), w.std().item(), w.min().item(), w.max().item(), w.norm().item()]
    assert row.split()[1:] == ["[64,", "256]", "float32", *[f"{v:.4g}" for v in expected]]
    dec_norm = ck["W_dec"].norm(dim=1)
    assert f"W_dec_row_norm: mean {dec_norm.mean().item():.4g}, min {dec_norm.min().item():.4g}" in out
    assert "zero decoder rows: 0 / 256" in out
    assert "can never fire (zero encoder column, b_enc <= 0): 0 / 256" in out


def test_inspect_path_pt_and_folder(hub_cache, capsys, tmp_path):
    snap = next((hub_cache / "models--mindchain--t5gemma2-sae-all-layers" / "snapshots").iterdir())
    pt = snap / "decoder" / "sae_decoder_02.pt"
    rc, out, _ = _run(capsys, "inspect", "--path", str(pt))
    assert rc == 0 and f"SAE {pt}: StandardSAE" in out
    assert '"hook_name": "decoder_blocks.2.self_attn.hook_out"' in out
    # A SAELens folder, as `convert` writes it.
    src = tmp_path / "src" / "decoder"
    src.mkdir(parents=True)
    shutil.copyfile(pt, src / pt.name)
    rc, _, err = _run(capsys, "convert", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress")
    assert rc == 0, err
    rc, out2, _ = _run(capsys, "inspect", "--path", str(tmp_path / "out" / "decoder" / "layer_2"))
    assert rc == 0
    # Same weights, same statistics table.
    assert out2.split("tensors:")[1] == out.split("tensors:")[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            (RELEASE, "encoder/layer_18"),
            "error: SAE id 'encoder/layer_18' is not in release 't5gemma2-270m-attn_out'. Valid ids (36): encoder/layer_0, encoder/layer_1,",
        ),
        (
            ("t5gemma2-270m-attn", "encoder/layer_1"),
            "error: unknown SAE release 't5gemma2-270m-attn'; close matches: ['t5gemma2-270m-attn_out'",
        ),
        ((), "error: give either RELEASE and SAE_ID, or --path FOLDER_OR_PT"),
        ((RELEASE,), "error: give either RELEASE and SAE_ID, or --path FOLDER_OR_PT"),
        (
            ("--path", "/nonexistent/folder"),
            "error: /nonexistent/folder: neither a mindchain .pt file nor a SAELens folder with cfg.json",
        ),
    ],
)
def test_inspect_bad_input(capsys, argv, message):
    rc, out, err = _run(capsys, "inspect", *argv)
    assert rc == 2 and out == ""
    assert err.startswith(message), err
    assert err.count("\n") == 1
    if "Valid ids" in message:
        assert "decoder/layer_17" in err


def test_inspect_bad_checkpoint(capsys, tmp_path):
    ck = synthetic.mindchain_checkpoint("encoder", 0, 8, 16)
    ck["b_dec"][0] = float("nan")
    path = tmp_path / "sae_encoder_00.pt"
    torch.save(ck, path)
    rc, _, err = _run(capsys, "inspect", "--path", str(path))
    assert rc == 2 and err == f"error: {path}: b_dec has 1 NaN and 0 Inf values (of 8)\n"


def test_convert(hub_cache, capsys, tmp_path):
    src = hub_cache / "models--mindchain--t5gemma2-sae-all-layers"
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "convert", str(src), str(out), "--repo-id", "me/t5g-saes")
    assert rc == 0
    assert stdout == f"wrote {out / 'pretrained_saes.yaml'}\n"
    assert "convert: 100%" in err and "36/36" in err  # the progress bar
    assert "repo_id: me/t5g-saes" in (out / "pretrained_saes.yaml").read_text()
    assert len(list(out.rglob("sae_weights.safetensors"))) == 36
    rc, _, err = _run(capsys, "convert", str(src), str(out), "--no-progress")
    assert rc == 2 and err.startswith(
        f"error: {out}: output folder is not empty (4 entries: .sae_lens_t5gemma_convert.json, decoder, encoder, "
        "pretrained_saes.yaml); pass force=True (--force) to replace an earlier convert output in it"
    )
    rc, _, err = _run(capsys, "convert", str(src), str(out), "--force", "--no-progress")
    assert rc == 0 and err == ""
    rc, _, err = _run(capsys, "convert", str(tmp_path / "missing"), str(tmp_path / "o2"))
    assert rc == 2 and err == f"error: {tmp_path / 'missing'}: no such snapshot folder\n"


def test_stats_count_dead_latents():
    cfg = StandardSAEConfig(d_in=4, d_sae=6, apply_b_dec_to_input=False)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.arange(24, dtype=torch.float32).reshape(4, 6) + 1)
        sae.b_enc.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0, -3.0, 1.0]))
        sae.W_dec.copy_(torch.ones(6, 4))
        sae.W_enc[:, 1] = 0  # zero column, b_enc < 0: can never fire
        sae.W_enc[:, 2] = 0  # zero column, b_enc = 0: can never fire
        sae.W_enc[:, 3] = 0  # zero column, b_enc > 0: always fires (constant)
        sae.W_dec[4] = 0
    st = sae_stats(sae)["latents"]
    assert st["zero_encoder_columns"] == 3
    assert st["never_fire"] == 2
    assert st["zero_decoder_rows"] == 1
    assert st["b_enc_negative_fraction"] == pytest.approx(2 / 6)
    assert st["W_dec_row_norm"] == {"mean": pytest.approx(5 * 2 / 6), "min": 0.0, "max": 2.0}


_ENTRY = """
import sys
import sae_lens_t5gemma_cli
try:
    rc = sae_lens_t5gemma_cli.main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("torch", "sae_lens", "transformer_lens", "transformers") if m in sys.modules)
print("HEAVY", heavy, "RC", rc, file=sys.stderr)
"""


def _entry(*argv: str) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": root, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", _ENTRY, *argv], capture_output=True, text=True, env=env, timeout=120, cwd=root
    )


@pytest.mark.parametrize(
    ("argv", "rc", "out_start", "err_has"),
    [
        (["--help"], 0, "usage: sae-lens-t5gemma [-h]", ""),
        (["list"], 0, "t5gemma2-270m-attn_out  (repo mindchain/t5gemma2-sae-all-layers", ""),
        (["train", "--d-sae", "x"], 2, "", "argument --d-sae: invalid int value: 'x'"),
        (["nope"], 2, "", "argument command: invalid choice: 'nope'"),
    ],
)
def test_entry_answers_without_heavy_imports(argv, rc, out_start, err_has):
    p = _entry(*argv)
    assert p.stdout.startswith(out_start) and err_has in p.stderr
    assert p.stderr.rstrip().endswith(f"HEAVY [] RC {rc}"), p.stderr


def test_list_from_yaml_equals_registered_listing(capsys):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from sae_lens_t5gemma.loading.registration import PACKAGE_RELEASE, hook_names

    rc, out, _ = _run(capsys, "list")
    lines = out.splitlines()
    lookup = get_pretrained_saes_directory()[PACKAGE_RELEASE]
    assert rc == 0 and lines[0].startswith(f"{PACKAGE_RELEASE}  (repo {lookup.repo_id}, model {lookup.model}")
    # Row by row what the registered release says (ids, paths, hook names), without the YAML's help.
    expected = [[i, p, *hook_names(PACKAGE_RELEASE, i)] for i, p in lookup.saes_map.items()]
    assert [ln.split() for ln in lines[2:-1]] == expected and len(expected) == 36
    # The decoder sites are merged attention, and list says so.
    assert lines[-1] == (
        "  note: decoder self_attn is merged self+cross attention: one softmax over decoder keys and "
        "encoder keys (split: hook_z_self / hook_z_cross)"
    )


def test_commands_register_before_running(monkeypatch, capsys):
    from sae_lens_t5gemma.loading import registration as registration

    calls = []
    monkeypatch.setattr(registration, "register", lambda: calls.append(1) or [])
    assert cli.main(["list"]) == 0 and calls == []
    assert cli.main(["inspect", "--path", "/nonexistent/sae.pt"]) == 2 and calls == [1]
    assert "error: " in capsys.readouterr().err


def test_root_api_exports_the_readme_names():
    import importlib

    import sae_lens_t5gemma as pkg

    assert sorted(pkg.__all__[1:]) == sorted(pkg._EXPORTS)
    for name, module in pkg._EXPORTS.items():
        assert getattr(pkg, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="module 'sae_lens_t5gemma' has no attribute 'nope'"):
        pkg.nope  # noqa: B018
