"""Hostile and broken inputs (issue 13): each is refused by name, or handled with a warning,
and leaves every folder as it was (sha256 of every file before and after).

Covers: checkpoints built to exhaust memory (stride-0 views, a small view of a huge
storage, history amplification) with peak memory measured in a subprocess; meta, sparse,
float8, self-overlapping and shared-storage tensors; mixed dtypes; deep and non-finite
histories; YAML attacks on ``register_release_yaml`` and ``training.register_release``
(unsafe tags, alias bombs, paths leaving the folder, huge files, taken release names);
malformed ``cfg.json`` and lying safetensors headers in local releases; unicode and space
paths; ``convert``'s lock, dangling-symlink output, and kill -9 at several points; the
CLI's one-line errors and exit codes 130/143; failing fast without network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from sae_lens_t5gemma import training
from sae_lens_t5gemma.cli import main as cli
from sae_lens_t5gemma.loading import convert as convert
from sae_lens_t5gemma.loading.convert import ConvertLockedError, convert_snapshot, lock_path
from sae_lens_t5gemma.loading.mindchain import MindchainCheckpointError, mindchain_disk_loader
from sae_lens_t5gemma.loading.mindchain_history import training_history
from sae_lens_t5gemma.loading.registration import register_release_yaml
from sae_lens_t5gemma.loading.release_yaml import RegistrationError, release_yaml
from sae_lens_t5gemma.stand_in import synthetic as synthetic

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]


def _tree(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` (symlinks not followed) with the sha256 of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link->" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _good(d_in: int = 8, d_sae: int = 16) -> dict:
    return synthetic.mindchain_checkpoint("encoder", 3, d_in=d_in, d_sae=d_sae, seed=3)


def _save(obj, folder: Path, name: str = "sae_encoder_03.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / name)
    return folder / name


def _refused(path: Path, message: str) -> None:
    """The file is refused with exactly ``message`` and its folder is unchanged."""
    before = _tree(path.parent)
    with pytest.raises(MindchainCheckpointError) as e:
        SAE.load_from_disk(path, converter=mindchain_disk_loader)
    assert str(e.value) == f"{path}: {message}"
    assert _tree(path.parent) == before


# ------------------------------------------------------------------ hostile tensors


def _stride0(ck: dict) -> dict:
    ck["W_enc"] = torch.randn(1, 16).expand(8, 16)
    return ck


def _huge_view(ck: dict) -> dict:
    ck["b_dec"] = torch.randn(100_000)[:8]
    return ck


def _shared(ck: dict) -> dict:
    buf = torch.randn(8 * 16)
    ck["W_enc"], ck["W_dec"] = buf.view(8, 16), buf.view(16, 8)
    return ck


def _overlap(ck: dict) -> dict:
    ck["W_enc"] = torch.randn(23).as_strided((8, 16), (1, 1))
    return ck


HOSTILE = {
    "stride 0": (
        _stride0,
        "W_enc has stride 0 along dim 0 (an expanded view: 64 stored bytes posing as 128 elements); "
        "refused before allocating it",
    ),
    "huge storage view": (
        _huge_view,
        "b_dec is a view of 32 bytes into a storage of 400,000 bytes; refused (re-save the tensor on its own, "
        "e.g. with .clone())",
    ),
    "meta": (
        lambda ck: ck | {"W_dec": torch.empty(16, 8, device="meta")},
        "W_dec is on device meta (a tensor without data); only tensors stored in the file are accepted",
    ),
    "sparse": (
        lambda ck: ck | {"W_enc": ck["W_enc"].to_sparse()},
        "W_enc is a sparse_coo tensor; only dense (strided) tensors are accepted",
    ),
    "float8": (
        lambda ck: ck | {"b_enc": ck["b_enc"].to(torch.float8_e4m3fn)},
        "b_enc has dtype torch.float8_e4m3fn; accepted: float32, float16, bfloat16 "
        "(converted to the dtype asked for when loading, float32 by default)",
    ),
    "shared storage": (
        _shared,
        "W_enc and W_dec share one storage (views of one buffer, e.g. tied weights); save them as separate tensors",
    ),
    "self-overlapping view": (
        _overlap,
        "W_enc is a view whose elements overlap (strides [1, 1], shape [8, 16])",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_tensor_refused_by_name(tmp_path, case):
    make, message = HOSTILE[case]
    _refused(_save(make(_good()), tmp_path), message)


def test_hostile_files_through_convert_leave_nothing(tmp_path):
    src = tmp_path / "src"
    _save(_good(), src / "encoder", "sae_encoder_03.pt")
    _save(_shared(_good()) | {"layer_idx": 4}, src / "encoder", "sae_encoder_04.pt")
    out = tmp_path / "out"
    with pytest.raises(
        MindchainCheckpointError, match="sae_encoder_04.pt: W_enc and W_dec share one storage"
    ):
        convert_snapshot(src, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


_PEAK = textwrap.dedent(
    """
    import resource, sys, torch, warnings
    import sae_lens_t5gemma
    from sae_lens_t5gemma.loading.mindchain import read_checkpoint
    warnings.simplefilter("ignore")
    read_checkpoint(sys.argv[2])  # warm up code paths on a small good file
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        read_checkpoint(sys.argv[1])
        result = "loaded"
    except ValueError as e:
        result = "refused: " + str(e).split(": ", 1)[1][:60]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(result); print(peak - base)
    """
)


@pytest.mark.parametrize("case", ["stride 0 (12.8 GB logical)", "huge storage view", "history amplification"])
def test_peak_memory_under_twice_the_file(tmp_path, case):
    ck = _good(640, 4096) if case != "history amplification" else _good()
    if case.startswith("stride 0"):
        ck["W_enc"] = torch.randn(1, 4096).expand(640, 4096)
        # A 12.8 GB materialisation: 1.6M-fold the stored row, in each of the 4 tensors' worth.
        ck["W_dec"] = torch.randn(1, 640).expand(4096 * 1280, 640)
        ck.pop("d_sae"), ck.pop("d_in")
    elif case == "huge storage view":
        ck["b_dec"] = torch.randn(10_000_000)[:640]
    else:
        ck["history"] = {"loss": torch.randn(10_000_000), "l0": torch.rand(10_000_000) * 1000}
    path = _save(ck, tmp_path)
    small = _save(_good(), tmp_path / "small")
    size = path.stat().st_size
    res = subprocess.run(
        [PY, "-c", _PEAK, str(path), str(small)],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result, grew = res.stdout.strip().splitlines()
    assert result == ("loaded" if case == "history amplification" else "refused: " + result[9:]), result
    assert result.startswith("loaded") or "stride 0" in result or "is a view of" in result
    assert int(grew) < 2 * size, (case, int(grew), size)


def test_history_amplification_is_bounded(tmp_path):
    ck = _good()
    ck["history"] = {"loss": torch.randn(2_000_000).abs(), "l0": [float(i) for i in range(50_000)]}
    path = _save(ck, tmp_path)
    with pytest.warns(
        UserWarning, match=r"training history trimmed: loss: 2000000 values, kept the last 1000"
    ):
        sae = SAE.load_from_disk(path, converter=mindchain_disk_loader)
    hist = training_history(sae)
    assert hist["l0"] == [float(i) for i in range(49_000, 50_000)]
    assert len(hist["loss"]) == 1000
    summary = sae.cfg.metadata.training_history_summary
    assert summary["l0"] == {"count": 50_000, "non_finite": 0, "first": 0.0, "last": 49999.0, "min": 0.0,
                             "max": 49999.0, "mean": 24999.5}  # fmt: skip
    sae.save_model(tmp_path / "saved")
    text = (tmp_path / "saved" / "cfg.json").read_text()
    assert len(text) < 100_000
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in cfg.json"))


def test_deep_and_non_finite_history(tmp_path):
    deep: list = [1.0]
    for _ in range(3000):
        deep = [deep]
    ck = _good()
    ck["history"] = {"deep": deep, "loss": [0.5, float("nan"), float("inf"), 0.25], "l0": [10.0]}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # only to write the file: pickling recurses
    try:
        path = _save(ck, tmp_path)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.warns(UserWarning) as rec:
        sae = SAE.load_from_disk(path, converter=mindchain_disk_loader)
    text = str(rec[0].message)
    assert "nested deeper than 8 levels, dropped" in text
    assert "loss[1]: non-finite value written as null" in text
    hist = training_history(sae)
    assert hist["loss"] == [0.5, None, None, 0.25] and hist["l0"] == [10.0]
    sae.save_model(tmp_path / "saved")
    json.loads((tmp_path / "saved" / "cfg.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_mixed_dtypes_upcast_with_a_warning(tmp_path):
    ck = _good()
    ck["W_enc"] = ck["W_enc"].half()
    path = _save(ck, tmp_path)
    with pytest.warns(
        UserWarning,
        match=re.escape(
            f"{path}: mixed dtypes (W_enc float16, b_enc float32, W_dec float32, b_dec float32); all four upcast to float32"
        ),
    ):
        sae = SAE.load_from_disk(path, converter=mindchain_disk_loader)
    assert sae.cfg.dtype == "float32"
    assert torch.equal(sae.W_enc.data, ck["W_enc"].float()) and torch.equal(sae.W_dec.data, ck["W_dec"])


def test_large_layer_in_file_name(tmp_path):
    path = _save(
        {k: v for k, v in _good().items() if k.startswith(("W", "b"))}, tmp_path, "sae_encoder_1000.pt"
    )
    _refused(path, "the file name says layer 1000, more than the largest accepted 999")


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


# ------------------------------------------------------------------ paths and convert


def test_unicode_and_space_paths(hub_cache, tmp_path):
    src = tmp_path / "snap ä ☃"
    ck = synthetic.mindchain_checkpoint("decoder", 2, 8, 16)
    _save(ck, src / "decoder", "sae_decoder_02.pt")
    out = tmp_path / "out dir ü"
    convert_snapshot(src, out, progress=False)
    sae = SAE.load_from_disk(out / "decoder" / "layer_2")
    assert torch.equal(sae.W_dec.data, ck["W_dec"])
    bad = _save(_shared(_good()), tmp_path / "ü x", "sae_encoder_03.pt")
    _refused(bad, "W_enc and W_dec share one storage (views of one buffer, e.g. tied weights); "
             "save them as separate tensors")  # fmt: skip


def test_dangling_symlink_out(tmp_path):
    src = tmp_path / "src"
    _save(synthetic.mindchain_checkpoint("encoder", 0, 8, 16), src / "encoder", "sae_encoder_00.pt")
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError) as e:
        convert_snapshot(src, out, progress=False)
    assert str(e.value) == (
        f"{out}: is a symlink to {tmp_path / 'nowhere'}, which does not exist; remove the link or choose another folder"
    )
    assert _tree(tmp_path) == before


def test_second_writer_fails_at_once_and_stale_lock_is_cleared(tmp_path):
    src = tmp_path / "src"
    _save(synthetic.mindchain_checkpoint("encoder", 0, 8, 16), src / "encoder", "sae_encoder_00.pt")
    out = tmp_path / "out"
    holder = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(out).write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "then"})
        )
        t = time.perf_counter()
        with pytest.raises(ConvertLockedError) as e:
            convert_snapshot(src, out, progress=False)
        assert time.perf_counter() - t < 1
        assert str(e.value) == (
            f"{out}: another convert is writing this folder (pid {holder.pid} on {os.uname().nodename}, since then); "
            f"lock file {lock_path(out)}. If that process is gone, remove the lock file."
        )
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=f"removing a stale lock of process {holder.pid}, which is gone"):
        convert_snapshot(src, out, progress=False)
    assert (out / "encoder" / "layer_0" / "cfg.json").is_file() and not lock_path(out).exists()


_KILLABLE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sae_lens_t5gemma.loading import convert as convert
    stop_at, signal_file = sys.argv[3], Path(sys.argv[4])
    def step(name):
        if name == stop_at:
            signal_file.write_text(name)
            time.sleep(600)
    convert._step = step
    if stop_at == "mid-safetensors":
        import sae_lens.saes.sae as m
        def slow_save(tensors, filename, *a, **k):
            Path(filename).write_bytes(b"partial safetensors")
            signal_file.write_text("mid-safetensors")
            time.sleep(600)
        m.save_file = slow_save
    convert.convert_snapshot(sys.argv[1], sys.argv[2], force=True, progress=False)
    """
)


def _loadable(folder: Path) -> bool:
    try:
        SAE.load_from_disk(folder)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("stop_at", ["validated", "mid-safetensors", "wrote encoder/layer_1", "staged",
                                     "moved old output aside"])  # fmt: skip
def test_kill_9_leaves_complete_or_previous_output(tmp_path, stop_at):
    src = tmp_path / "src"
    for n in range(2):
        _save(
            synthetic.mindchain_checkpoint("encoder", n, 8, 16, seed=1),
            src / "encoder",
            f"sae_encoder_0{n}.pt",
        )
    out = tmp_path / "out"
    previous = None
    if stop_at == "moved old output aside":
        convert_snapshot(src, out, progress=False)
        previous = _tree(out)
    signal_file = tmp_path / "reached"
    proc = subprocess.Popen(
        [PY, "-c", _KILLABLE, str(src), str(out), stop_at, str(signal_file)],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not signal_file.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Nothing at OUT that plain SAELens would take for a complete SAE, unless OUT is complete.
    if out.exists():
        assert (out / convert.MANIFEST_NAME).is_file() and not (out / convert.INCOMPLETE_MARKER).exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    for p in leftovers:
        assert ".staging-" in p.name or ".old-" in p.name or p.name == ".out.lock", p
        for sub in p.rglob("*.partial"):
            assert not _loadable(sub), sub
        if ".staging-" in p.name and stop_at not in ("staged", "moved old output aside"):
            assert (p / convert.INCOMPLETE_MARKER).is_file()
    # The next run clears the stale lock and leftovers (restoring a moved-aside output) and completes.
    if stop_at == "moved old output aside":
        assert not out.exists()
    with pytest.warns(UserWarning, match="removing a stale lock"):
        convert_snapshot(src, out, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reached", "src"]
    assert _loadable(out / "encoder" / "layer_1")
    if previous is not None:
        assert _tree(out) == previous  # same sources: the same bytes


# ------------------------------------------------------------------------------ the CLI


def _main_with(monkeypatch, capsys, exc: BaseException | None, argv: list[str], signal_self: bool = False):
    def boom(*a, **k):
        if signal_self:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise exc

    monkeypatch.setattr(convert, "convert_snapshot", boom)
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_cli_interrupts(monkeypatch, capsys, tmp_path):
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "out")]
    code, err = _main_with(monkeypatch, capsys, KeyboardInterrupt(), argv)
    assert code == 130
    assert err == (
        f"interrupted: convert stopped; {tmp_path / 'out'} is as it was before the run "
        "(the staged output was removed). Rerun the same command.\n"
    )
    from sae_lens.training._interruption import InterruptedException

    code, err = _main_with(monkeypatch, capsys, InterruptedException(), argv)
    assert code == 130 and err.count("\n") == 1 and err.startswith("interrupted: convert stopped")
    code, err = _main_with(monkeypatch, capsys, None, argv, signal_self=True)
    assert code == 143 and err.startswith("terminated (SIGTERM): convert stopped;") and err.count("\n") == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize(
    ("exc", "line", "code"),
    [
        (PermissionError(13, "Permission denied", "/ro/out"), "error: /ro/out: Permission denied (PermissionError)", 1),
        (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device (OSError)", 1),
        (RuntimeError("PytorchStreamReader failed\nreading zip archive"),
         "error: RuntimeError: PytorchStreamReader failed reading zip archive", 1),
        (NotImplementedError("no"), "error: NotImplementedError: no", 1),
        (RecursionError("maximum recursion depth exceeded"), "error: input nested too deeply (RecursionError)", 1),
        (json.JSONDecodeError("Expecting value", "x", 0), "error: Expecting value: line 1 column 1 (char 0)", 2),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
         "error: not UTF-8 text (invalid start byte at byte 0)", 2),
    ],
)  # fmt: skip
def test_cli_error_lines(monkeypatch, capsys, tmp_path, exc, line, code):
    got, err = _main_with(monkeypatch, capsys, exc, ["convert", "a", "b"])
    assert (got, err) == (code, line + "\n")


def test_cli_convert_read_only_out(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    src = tmp_path / "src"
    _save(synthetic.mindchain_checkpoint("encoder", 0, 8, 16), src / "encoder", "sae_encoder_00.pt")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["convert", str(src), str(ro / "out"), "--no-progress"]) == 1
    finally:
        ro.chmod(0o700)
    assert capsys.readouterr().err.startswith(
        f"error: {ro / '.out.lock'}: Permission denied (PermissionError)"
    )


# ---------------------------------------------------------------------------- network


def test_no_network_fails_fast_with_the_right_message(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = textwrap.dedent(
        """
        import time
        from sae_lens import SAE
        import sae_lens_t5gemma
        t = time.perf_counter()
        try:
            SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id="encoder/layer_5")
        except FileNotFoundError as e:
            print(f"{time.perf_counter() - t:.2f}"); print(e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "empty"),
            "PYTHONPATH": str(ROOT)}  # fmt: skip
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env)
    seconds, message = res.stdout.split("\n", 1)
    assert float(seconds) < 3, seconds
    assert message.startswith(
        f"mindchain/t5gemma2-sae-all-layers/encoder/sae_encoder_05.pt: no network and no cached copy: the hub "
        f"(http://127.0.0.1:{port}) cannot be reached ("
    )
    assert "To fix: connect to the network and retry; or on a machine with network run " in message
    assert "HF_HUB_OFFLINE" not in message


# ------------------------------------------------------------------ datasets for train


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"\n\n", "is empty"),
        ("latin1.txt", "fine line\ncaf\xe9\n".encode("latin-1"), "line 2 is not UTF-8 text (invalid continuation byte at byte 3)"),
        ("no_text.jsonl", b'{"text": "ok"}\n{"body": "no text field"}\n', "line 2: expected a JSON object with a 'text' field"),
        ("bad_json.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        ("one_short_line.txt", b"A dog ran.\n", "none of the first 1 documents reaches context_size=32 tokens"),
    ],
)  # fmt: skip
def test_bad_training_datasets_fail_before_the_model_loads(tiny_model_dir, tmp_path, name, content, message):
    """Every line is checked (not only the first); a bad line names its file and line number."""
    data = tmp_path / name
    data.write_bytes(content)
    before = _tree(tmp_path)
    cfg = training.TrainConfig(
        model=str(tiny_model_dir), hooks=["encoder.1.attn_out"], dataset=str(data), out=str(tmp_path / "out"),
        architecture="topk", k=4, d_sae=32, training_tokens=512, train_batch_size_tokens=256, context_size=32,
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        training.plan_training(cfg)
    assert str(err.value).startswith(
        f"Dataset file {str(data)!r}" if "none of" not in message else "Dataset ["
    )
    assert message in str(err.value)
    assert _tree(tmp_path) == before  # nothing written
