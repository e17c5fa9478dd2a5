"""Hostile mindchain checkpoints: tensors built to exhaust memory (stride-0 views, a small view of a huge storage, history amplification; peak memory measured in a subprocess), meta/sparse/float8/self-overlapping/shared-storage tensors, mixed dtypes, deep and non-finite histories. Each is refused by name, or handled with a warning, and leaves every folder as it was."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hostile import PY, ROOT, _good, _refused, _save, _shared, _tree  # noqa: F401
from sae_lens import SAE

from sae_lens_t5gemma.loading import convert as convert
from sae_lens_t5gemma.loading.convert import convert_snapshot
from sae_lens_t5gemma.loading.mindchain import MindchainCheckpointError, mindchain_disk_loader
from sae_lens_t5gemma.loading.mindchain_history import training_history
from sae_lens_t5gemma.stand_in import synthetic as synthetic

# ------------------------------------------------------------------ hostile tensors


def _stride0(ck: dict) -> dict:
    ck["W_enc"] = torch.randn(1, 16).expand(8, 16)
    return ck


def _huge_view(ck: dict) -> dict:
    ck["b_dec"] = torch.randn(100_000)[:8]
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
