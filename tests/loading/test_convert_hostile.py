"""``convert`` under attack: unicode and space paths, its lock, dangling-symlink output, kill -9 at several points (complete or previous output), and failing fast without network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hostile import PY, ROOT, _good, _refused, _save, _shared, _tree  # noqa: F401
from sae_lens import SAE

from sae_lens_t5gemma.loading import convert as convert
from sae_lens_t5gemma.loading.convert import ConvertLockedError, convert_snapshot, lock_path
from sae_lens_t5gemma.stand_in import synthetic as synthetic

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
