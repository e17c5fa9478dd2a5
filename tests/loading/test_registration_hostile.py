"""Hostile release YAML and local SAELens folders: unsafe tags, alias bombs, paths leaving the folder, huge files, taken release names; malformed ``cfg.json`` and lying safetensors headers. Each refused by name, nothing written."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import yaml
from hostile import PY, ROOT, _good, _refused, _save, _tree  # noqa: F401
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from sae_lens_t5gemma import training
from sae_lens_t5gemma.loading import convert as convert
from sae_lens_t5gemma.loading.mindchain import mindchain_disk_loader
from sae_lens_t5gemma.loading.registration import register_release_yaml
from sae_lens_t5gemma.loading.release_yaml import RegistrationError, release_yaml
from sae_lens_t5gemma.stand_in import synthetic as synthetic

# ------------------------------------------------------------------------ YAML attacks


def _release(tmp_path: Path, name: str, path: str = "a/sae_encoder_00.pt") -> Path:
    folder = tmp_path / "rel"
    _save(synthetic.mindchain_checkpoint("encoder", 0, 8, 16), folder / "a", "sae_encoder_00.pt")
    body = {"model": "google/t5gemma-2-270m-270m", "repo_id": "x/y", "saes": [{"id": "a", "path": path}]}
    (folder / "release.yaml").write_text(yaml.safe_dump({name: body}))
    return folder / "release.yaml"


def _yaml_refused(path: Path, message: str, **kwargs) -> None:
    before, directory = _tree(path.parent), dict(get_pretrained_saes_directory())
    with pytest.raises(RegistrationError) as e:
        register_release_yaml(str(path), **kwargs)
    assert str(e.value) == message
    assert _tree(path.parent) == before and get_pretrained_saes_directory() == directory


def test_yaml_python_object_tag(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("r1: !!python/object/apply:os.system ['touch pwned']\n")
    _yaml_refused(
        path,
        f"{path}: cannot read release YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' (line 1, column 5)",
    )
    assert not Path("pwned").exists()


def test_yaml_alias_bomb(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    lines.append("r1: {repo_id: x/y, model: m, saes: [*i]}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1024
    t = time.perf_counter()
    _yaml_refused(
        path,
        f"{path}: cannot read release YAML: YAML aliases (*a) are not accepted in a release file (line 2, column 8)",
    )
    assert time.perf_counter() - t < 2


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/../../x"])
def test_yaml_paths_leaving_the_folder(tmp_path, bad):
    path = _release(tmp_path, "t5g-adv-escape", bad)
    _yaml_refused(
        path,
        f"{path}: release 't5g-adv-escape': SAE 'a' has path {bad!r}, which leaves the release folder; "
        "refused (pass allow_outside_root=True if you trust this file)",
        local_root=path.parent,
    )


def test_yaml_symlink_out_of_the_folder_needs_opt_in(tmp_path):
    path = _release(tmp_path, "t5g-adv-link", "link/sae_encoder_00.pt")
    (path.parent / "link").symlink_to(path.parent / "a")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (path.parent / "link").unlink()
    (path.parent / "link").symlink_to(outside)
    _save(synthetic.mindchain_checkpoint("encoder", 0, 8, 16), outside, "sae_encoder_00.pt")
    _yaml_refused(
        path,
        f"{path}: release 't5g-adv-link': SAE 'a' resolves to {outside / 'sae_encoder_00.pt'}, outside the "
        f"release folder {path.parent}; refused (pass allow_outside_root=True if you trust it)",
        local_root=path.parent,
    )
    assert register_release_yaml(path, local_root=path.parent, allow_outside_root=True) == ["t5g-adv-link"]
    assert SAE.from_pretrained(release="t5g-adv-link", sae_id="a").cfg.d_sae == 16


def test_yaml_huge_file(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * (3 * 2**20) + "\n")
    _yaml_refused(
        path, f"{path}: {path.stat().st_size:,} bytes, more than the 2,097,152 read for a release YAML"
    )


def test_release_names_taken(tmp_path):
    # The package's own release: never, not even with replace=True.
    pkg = _release(tmp_path / "p", "t5gemma2-270m-attn_out")
    for replace in (False, True):
        _yaml_refused(
            pkg,
            "Release 't5gemma2-270m-attn_out' is one of sae_lens_t5gemma's own releases "
            "(repo_id 'mindchain/t5gemma2-sae-all-layers'); it cannot be replaced. Use another release name.",
            local_root=pkg.parent,
            replace=replace,
        )
        with pytest.raises(RegistrationError, match="is one of sae_lens_t5gemma's own releases"):
            training.register_release(pkg, replace=replace)
    # SAELens' own: never.
    theirs = _release(tmp_path / "s", "gemma-scope-2-270m-pt-res")
    _yaml_refused(
        theirs,
        "Release 'gemma-scope-2-270m-pt-res' already exists in SAELens' pretrained SAE directory "
        "(repo_id 'google/gemma-scope-2-270m-pt'); refusing to overwrite it. Use another release name.",
        replace=True,
    )
    # The user's own: only with replace=True (str paths accepted).
    first = _release(tmp_path / "u1", "t5g-adv-user")
    second = _release(tmp_path / "u2", "t5g-adv-user")
    assert training.register_release(str(first)) == "t5g-adv-user"
    with pytest.raises(RegistrationError, match="'t5g-adv-user' was registered earlier with other contents"):
        training.register_release(second)
    assert get_pretrained_saes_directory()["t5g-adv-user"].repo_id == str(first.parent)
    assert training.register_release(second, replace=True) == "t5g-adv-user"
    assert get_pretrained_saes_directory()["t5g-adv-user"].repo_id == str(second.parent)


# -------------------------------------------------------------- local SAELens folders


def _saelens_folder(tmp_path: Path) -> Path:
    sae = SAE.load_from_disk(_save(_good(), tmp_path / "pt"), converter=mindchain_disk_loader)
    folder = tmp_path / "rel" / "s"
    sae.save_model(folder)
    text = release_yaml("t5g-adv-cfg", "x/y", "m", [{"id": "s", "path": "s"}])
    (tmp_path / "rel" / "release.yaml").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input is 'yes', expected true or false"),
        ({"dtype": "torch.float128"}, "dtype is 'torch.float128', expected one of ['float32', "),
        ({"d_sae": 10**30}, "d_sae is 1000000000000000000000000000000, expected an integer in 1..16777216"),
        ("NaN", "not valid JSON (NaN is not standard JSON)"),
        ("[1, 2]", "expected a JSON object, found list"),
        (b"\xff\xfe", "not UTF-8 text (invalid start byte at byte 0)"),
    ],
)
def test_malformed_cfg_json_in_local_release(tmp_path, change, message):
    folder = _saelens_folder(tmp_path)
    cfg_path = folder / "cfg.json"
    if isinstance(change, dict):
        cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | change))
    elif isinstance(change, bytes):
        cfg_path.write_bytes(change)
    else:
        cfg_path.write_text(change)
    register_release_yaml(folder.parent / "release.yaml", local_root=folder.parent, replace=True)
    before = _tree(folder.parent)
    with pytest.raises(RegistrationError) as e:
        SAE.from_pretrained(release="t5g-adv-cfg", sae_id="s")
    assert str(e.value).startswith(f"{cfg_path}: {message}")
    assert _tree(folder.parent) == before


def test_safetensors_header_that_lies(tmp_path):
    folder = _saelens_folder(tmp_path)
    weights = folder / "sae_weights.safetensors"
    raw = weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["W_enc"]["shape"] = [80_000, 160_000]
    hb = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    register_release_yaml(folder.parent / "release.yaml", local_root=folder.parent, replace=True)
    before = _tree(folder.parent)
    with pytest.raises(RegistrationError) as e:
        SAE.from_pretrained(release="t5g-adv-cfg", sae_id="s")
    assert str(e.value) == (
        f"{weights}: not a valid safetensors file (Error while deserializing header: "
        "invalid shape, data type, or offset for tensor)"
    ) or str(e.value).startswith(f"{weights}: not a valid safetensors file (")
    assert _tree(folder.parent) == before
