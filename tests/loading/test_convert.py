"""``convert_snapshot``: mindchain snapshot -> SAELens-native folders + release YAML.

Covers: the output loads with plain SAELens in a process that never imports this
package (weights equal, metadata kept); the YAML block parses in SAELens' schema and,
registered as a local release, loads through ``SAE.from_pretrained``; a non-empty output
folder needs ``force``; invalid checkpoints stop the run before anything is written; a
failure while writing leaves the output folder as it was; ``force`` replaces only convert's
own output (a manifest with hashes), refusing by name otherwise; hub-cache and plain
snapshot layouts. Locking and kill -9 are in ``test_convert_hostile.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from sae_lens_t5gemma.loading.convert import REPO_ID_PLACEHOLDER, convert_snapshot, find_checkpoints
from sae_lens_t5gemma.loading.mindchain import MindchainCheckpointError
from sae_lens_t5gemma.loading.registration import register_release_yaml
from sae_lens_t5gemma.loading.release_yaml import lookup_from_yaml
from sae_lens_t5gemma.stand_in import synthetic as synthetic

IDS = [f"{s}/layer_{n}" for s in ("encoder", "decoder") for n in range(18)]


@pytest.fixture(scope="module")
def snapshot(hub_cache) -> Path:
    """The stand-in mindchain repo folder in the offline hub cache (hub-cache layout)."""
    return hub_cache / "models--mindchain--t5gemma2-sae-all-layers"


@pytest.fixture(scope="module")
def converted(snapshot, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "out"
    yaml_path = convert_snapshot(snapshot, out, progress=False)
    assert yaml_path == out / "pretrained_saes.yaml"
    return out


def _plain_copy(snapshot: Path, dest: Path, layers: int = 2) -> Path:
    """A plain snapshot folder (as `hf download --local-dir` makes) with a few layers."""
    snap = next((snapshot / "snapshots").iterdir())
    for stack in ("encoder", "decoder"):
        (dest / stack).mkdir(parents=True)
        for n in range(layers):
            rel = synthetic.mindchain_filename(stack, n)
            shutil.copyfile(snap / rel, dest / rel)
    return dest


def test_output_layout(converted):
    folders = sorted(str(p.parent.relative_to(converted)) for p in converted.rglob("cfg.json"))
    assert folders == sorted(IDS)
    assert sorted(p.name for p in (converted / "encoder" / "layer_5").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    assert not [p for p in converted.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    cfg = json.loads((converted / "decoder" / "layer_9" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name"] == "decoder_blocks.9.self_attn.hook_out"
    assert cfg["metadata"]["source_file"] == "decoder/sae_decoder_09.pt"
    assert cfg["metadata"]["training_history"]["l0"] == [2000.0, 1500.0, 1367.0]


def test_plain_saelens_loads_output_without_this_package(converted, snapshot):
    snap = next((snapshot / "snapshots").iterdir())
    script = textwrap.dedent(
        f"""
        import sys, torch
        from sae_lens import SAE, StandardSAE
        out, snap = {str(converted)!r}, {str(snap)!r}
        n = 0
        for stack in ("encoder", "decoder"):
            for layer in range(18):
                sae = SAE.load_from_disk(f"{{out}}/{{stack}}/layer_{{layer}}")
                src = torch.load(f"{{snap}}/{{stack}}/sae_{{stack}}_{{layer:02d}}.pt", weights_only=True)
                assert type(sae) is StandardSAE and sae.cfg.apply_b_dec_to_input is False
                for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    assert torch.equal(getattr(sae, k).data, src[k]), (stack, layer, k)
                want = f"encoder_blocks.{{layer}}.attn.hook_out" if stack == "encoder" else f"decoder_blocks.{{layer}}.self_attn.hook_out"
                assert sae.cfg.metadata.hook_name == want, sae.cfg.metadata.hook_name
                assert sae.cfg.metadata.context_size == 128 and sae.cfg.metadata.prepend_bos is True
                n += 1
        assert "sae_lens_t5gemma" not in sys.modules, "the package was imported"
        print("OK", n)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=converted
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "OK 36"


def test_yaml_block(converted):
    text = (converted / "pretrained_saes.yaml").read_text()
    assert text.startswith("# t5gemma2-270m-attn_out: the mindchain T5Gemma 2 SAEs in SAELens' native format")
    data = yaml.safe_load(text)
    assert list(data) == ["t5gemma2-270m-attn_out"]
    body = data["t5gemma2-270m-attn_out"]
    assert body["repo_id"] == REPO_ID_PLACEHOLDER and body["model"] == "google/t5gemma-2-270m-270m"
    assert "conversion_func" not in body  # SAELens' default loader reads native folders
    assert [s["id"] for s in body["saes"]] == IDS
    assert all(s["path"] == s["id"] and s["l0"] == 1367.0 for s in body["saes"])
    lookup = lookup_from_yaml("t5gemma2-270m-attn_out", body)
    assert lookup.saes_map["decoder/layer_3"] == "decoder/layer_3"


def test_converted_release_registers_locally(snapshot, tmp_path):
    out = tmp_path / "native"
    yaml_path = convert_snapshot(
        snapshot, out, progress=False, release="t5g-test-native", repo_id="me/native"
    )
    assert yaml.safe_load(yaml_path.read_text())["t5g-test-native"]["repo_id"] == "me/native"
    register_release_yaml(yaml_path, local_root=out)
    assert get_pretrained_saes_directory()["t5g-test-native"].repo_id == str(out.resolve())
    a = SAE.from_pretrained(release="t5g-test-native", sae_id="decoder/layer_12")
    b = SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id="decoder/layer_12")
    assert all(
        torch.equal(getattr(a, k).data, getattr(b, k).data) for k in ("W_enc", "b_enc", "W_dec", "b_dec")
    )
    assert a.cfg.metadata.hook_name == b.cfg.metadata.hook_name == "decoder_blocks.12.self_attn.hook_out"


def _tree(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` with the sha256 of its bytes (folders as "dir")."""
    import hashlib

    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def test_non_empty_out_dir_needs_force(snapshot, tmp_path):
    src = _plain_copy(snapshot, tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as e:
        convert_snapshot(src, out, progress=False)
    assert str(e.value) == (
        f"{out}: output folder is not empty (1 entries: notes.txt); "
        "pass force=True (--force) to replace an earlier convert output in it"
    )
    # --force replaces only what convert wrote: a user's file is refused by name.
    with pytest.raises(FileExistsError) as e:
        convert_snapshot(src, out, force=True, progress=False)
    assert str(e.value) == (
        f"{out}: --force replaces only what convert wrote, and this folder holds 1 other entries: "
        "notes.txt. Move them away or choose another output folder; nothing was changed"
    )
    assert _tree(out) == {"notes.txt": __import__("hashlib").sha256(b"mine").hexdigest()}
    (out / "notes.txt").unlink()
    convert_snapshot(src, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        ".sae_lens_t5gemma_convert.json",
        "decoder",
        "encoder",
        "pretrained_saes.yaml",
    ]
    first = _tree(out)
    # Its own output is replaced whole by --force.
    convert_snapshot(src, out, force=True, progress=False)
    assert _tree(out) == first
    # A user file inside a converted folder, or an edited converted file, blocks --force.
    (out / "encoder" / "layer_1" / "my_notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"holds 1 other entries: encoder/layer_1/my_notes\.txt\."):
        convert_snapshot(src, out, force=True, progress=False)
    (out / "encoder" / "layer_1" / "my_notes.txt").unlink()
    (out / "pretrained_saes.yaml").write_text("edited by the user")
    with pytest.raises(
        FileExistsError, match=r"1 other entries: pretrained_saes\.yaml \(changed since convert wrote it\)"
    ):
        convert_snapshot(src, out, force=True, progress=False)
    assert (out / "pretrained_saes.yaml").read_text() == "edited by the user"
    assert not [
        p for p in tmp_path.iterdir() if ".staging-" in p.name or ".old-" in p.name or ".lock" in p.name
    ]


def test_invalid_checkpoints_stop_before_writing(snapshot, tmp_path):
    src = _plain_copy(snapshot, tmp_path / "src", layers=3)
    bad1 = src / "encoder" / "sae_encoder_01.pt"
    bad1.write_bytes(bad1.read_bytes()[:100])
    ck = torch.load(src / "decoder" / "sae_decoder_02.pt", weights_only=True)
    ck["W_dec"] = ck["W_dec"].T.contiguous()
    torch.save(ck, src / "decoder" / "sae_decoder_02.pt")
    out = tmp_path / "out"
    with pytest.raises(MindchainCheckpointError) as e:
        convert_snapshot(src, out, progress=False)
    lines = str(e.value).splitlines()
    assert lines[0] == "2 of 6 checkpoints are invalid; nothing was written:"
    assert lines[1].startswith(f"  {bad1}: cannot be read, the file is truncated or corrupt")
    assert lines[2] == (
        f"  {src / 'decoder' / 'sae_decoder_02.pt'}: wrong tensor shapes for d_in=64, d_sae=256: "
        "W_dec has shape [64, 256], expected [256, 64] = [d_sae, d_in] (transposed?)"
    )
    assert not out.exists()


def test_failure_while_writing_leaves_no_partial_folder(snapshot, tmp_path, monkeypatch):
    # Fault injection: the third safetensors write fails halfway, as on a full disk.
    import sae_lens.saes.sae as sae_module

    real_save = sae_module.save_file
    calls = []

    def failing_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(sae_module, "save_file", failing_save)
    src = _plain_copy(snapshot, tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left on device"):
        convert_snapshot(src, out, progress=False)
    # It was writing into the staging folder beside OUT, which is gone again.
    assert Path(calls[2]).parent.parent.parent.name.startswith(".out.staging-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # A previous complete output survives a failed --force run unchanged.
    monkeypatch.setattr(sae_module, "save_file", real_save)
    convert_snapshot(src, out, progress=False)
    before = _tree(out)
    calls.clear()
    monkeypatch.setattr(sae_module, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        convert_snapshot(src, out, force=True, progress=False)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert torch.equal(
        SAE.load_from_disk(out / "encoder" / "layer_1").W_enc.data,
        torch.load(src / "encoder" / "sae_encoder_01.pt")["W_enc"],
    )


def test_find_checkpoints_layouts_and_errors(snapshot, tmp_path):
    files = find_checkpoints(snapshot)
    assert [f"{p.parent.name}/{p.name}" for p in files] == [
        synthetic.mindchain_filename(s, n) for s in ("encoder", "decoder") for n in range(18)
    ]
    plain = _plain_copy(snapshot, tmp_path / "plain", layers=2)
    (plain / "encoder" / "notes.pt").write_bytes(b"ignored: not a mindchain name")
    assert [p.name for p in find_checkpoints(plain)] == [
        "sae_encoder_00.pt", "sae_encoder_01.pt", "sae_decoder_00.pt", "sae_decoder_01.pt"
    ]  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no mindchain checkpoints"):
        find_checkpoints(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such snapshot folder"):
        convert_snapshot(tmp_path / "missing", tmp_path / "out", progress=False)


def test_mixed_models_are_an_error(tmp_path):
    for stack, model in (("encoder", "google/t5gemma-2-270m-270m"), ("decoder", "google/t5gemma-2-1b-1b")):
        (tmp_path / "src" / stack).mkdir(parents=True)
        ck = synthetic.mindchain_checkpoint(stack, 0, 8, 16, model_name=model)
        torch.save(ck, tmp_path / "src" / synthetic.mindchain_filename(stack, 0))
    with pytest.raises(MindchainCheckpointError, match="the checkpoints name 2 different models"):
        convert_snapshot(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
