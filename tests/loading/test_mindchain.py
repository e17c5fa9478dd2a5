"""The mindchain converter: ``SAE.from_pretrained`` on the offline stand-in hub, the card's
forward formula, bit-identical weights, dtype/device, config metadata, the disk loader
via ``SAE.load_from_disk(converter=...)``, and a clear error for every bad input (code
pickles, missing keys, wrong/transposed shapes, disagreeing fields, NaN/Inf, truncated
files, file-name mismatches, no network and no cache), tensor-only files (stack and layer
from the file name, widths from the shapes), what the metadata marks as assumed, and the
fallback for legacy (non-zip) torch files, which cannot be memory-mapped, the finiteness
sums on one thread (the caller's thread count restored), and the converter over an
already read checkpoint that ``convert`` uses."""

from __future__ import annotations

import io
import pathlib
import re

import numpy as np
import pytest
import sae_lens
import torch
from huggingface_hub import hf_hub_download
from sae_lens import SAE, StandardSAE

from sae_lens_t5gemma.loading.mindchain import (
    CONTEXT_SIZE,
    MindchainCheckpointError,
    converter_for,
    mindchain_disk_loader,
    mindchain_huggingface_loader,
    read_checkpoint,
)
from sae_lens_t5gemma.loading.mindchain_history import training_history
from sae_lens_t5gemma.model.sites import site
from sae_lens_t5gemma.stand_in import synthetic as synthetic

RELEASE = "t5gemma2-270m-attn_out"
D_IN, D_SAE = 64, 256


def _source(stack: str, layer: int) -> dict:
    """The tensors the stand-in hub holds for one SAE, straight from the cached file."""
    path = hf_hub_download(synthetic.MINDCHAIN_REPO, synthetic.mindchain_filename(stack, layer))
    return torch.load(path, weights_only=True)


def test_issue_snippet(hub_cache):
    from sae_lens import SAE

    import sae_lens_t5gemma  # noqa: F401  (registers the release)

    sae = SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id="encoder/layer_5")
    assert type(sae) is StandardSAE
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.apply_b_dec_to_input is False
    assert sae.cfg.normalize_activations == "none"
    assert sae.cfg.metadata.hook_name == "encoder_blocks.5.attn.hook_out"


@pytest.mark.parametrize(("stack", "layer"), [("encoder", 0), ("encoder", 17), ("decoder", 5)])
def test_weights_bit_identical(hub_cache, stack, layer):
    sae = SAE.from_pretrained(release=RELEASE, sae_id=f"{stack}/layer_{layer}")
    src = _source(stack, layer)
    regenerated = synthetic.mindchain_checkpoint(stack, layer, D_IN, D_SAE, seed=0)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        param = getattr(sae, k)
        assert param.dtype == torch.float32
        assert torch.equal(param.data, src[k]), k
        assert torch.equal(param.data, regenerated[k]), k


def test_encode_decode_equal_card_formula(hub_cache):
    sae = SAE.from_pretrained(release=RELEASE, sae_id="decoder/layer_3")
    ck = _source("decoder", 3)
    x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(1)) * 0.5
    f = torch.relu(x @ ck["W_enc"] + ck["b_enc"])  # the card's code, verbatim
    x_hat = f @ ck["W_dec"] + ck["b_dec"]
    with torch.no_grad():
        feats = sae.encode(x)
        assert torch.equal(feats, f)
        assert torch.equal(sae.decode(feats), x_hat)
        assert torch.equal(sae(x), x_hat)
    assert 0 < (f > 0).float().mean().item() < 1  # a real mix of active and inactive latents


@pytest.mark.parametrize(
    ("dtype", "device"),
    [
        ("float16", "cpu"),
        ("bfloat16", "cpu"),
        ("float32", "meta"),
        pytest.param(
            "float16", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
        ),
    ],
)
def test_dtype_and_device_honoured(hub_cache, dtype, device):
    sae = SAE.from_pretrained(release=RELEASE, sae_id="encoder/layer_2", dtype=dtype, device=device)
    want = getattr(torch, dtype)
    assert sae.cfg.dtype == dtype and sae.cfg.device == device
    src = _source("encoder", 2)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        p = getattr(sae, k)
        assert p.dtype == want and p.device.type == device, k
        if device != "meta":
            assert torch.equal(p.detach().cpu(), src[k].to(want)), k


@pytest.mark.parametrize(("stack", "layer"), [("encoder", 5), ("decoder", 11)])
def test_metadata_after_from_pretrained(hub_cache, stack, layer):
    sae, cfg_dict, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(
        release=RELEASE, sae_id=f"{stack}/layer_{layer}"
    )
    m = sae.cfg.metadata
    s = site(stack, layer, "attn_out")
    assert m.hook_name == s.hook_name
    assert m.hook_name == (
        f"encoder_blocks.{layer}.attn.hook_out"
        if stack == "encoder"
        else f"decoder_blocks.{layer}.self_attn.hook_out"
    )
    assert m.hf_hook_name == (
        f"model.encoder.text_model.layers.{layer}.self_attn.o_proj"
        if stack == "encoder"
        else f"model.decoder.layers.{layer}.self_attn.o_proj"
    )
    assert m.hf_hook_name_legacy == f"model.{stack}.layers.{layer}.self_attn.o_proj"
    assert m.model_name == "google/t5gemma-2-270m-270m"
    assert (m.context_size, m.prepend_bos) == (CONTEXT_SIZE, True)
    assert (m.layer_type, m.layer_idx) == (stack, layer)
    assert m.sae_lens_version == sae_lens.__version__
    assert m.source_repo_id == synthetic.MINDCHAIN_REPO
    assert m.source_file == synthetic.mindchain_filename(stack, layer)
    # The training history stays reachable from the SAE and from the returned config dict.
    hist = {"loss": [0.01, 0.002, 0.0014], "l0": [2000.0, 1500.0, 1367.0]}
    assert training_history(sae) == hist
    assert training_history(cfg_dict) == hist
    assert sparsity is None


def test_load_from_disk_with_converter(hub_cache):
    path = hf_hub_download(synthetic.MINDCHAIN_REPO, "decoder/sae_decoder_07.pt")
    sae = SAE.load_from_disk(path, converter=mindchain_disk_loader)
    src = torch.load(path, weights_only=True)
    assert type(sae) is StandardSAE and sae.cfg.apply_b_dec_to_input is False
    assert all(torch.equal(getattr(sae, k).data, src[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    assert sae.cfg.metadata.hook_name == "decoder_blocks.7.self_attn.hook_out"
    assert sae.cfg.metadata.source_file == "decoder/sae_decoder_07.pt"
    half = SAE.load_from_disk(path, dtype="float16", converter=mindchain_disk_loader)
    assert half.W_dec.dtype == torch.float16 and torch.equal(half.W_dec.data, src["W_dec"].half())


def test_unknown_sae_id_in_from_pretrained(hub_cache):
    # SAELens checks the id before any loader runs and shows the first five valid ids;
    # registration.check_sae_id and `sae-lens-t5gemma list` show all of them.
    with pytest.raises(
        ValueError, match=re.escape("ID encoder/layer_18 not found in release t5gemma2-270m-attn_out")
    ):
        SAE.from_pretrained(release=RELEASE, sae_id="encoder/layer_18")


def test_no_network_and_no_cache(tmp_path):
    with (
        synthetic.offline_hub(tmp_path / "empty_cache"),
        pytest.raises(FileNotFoundError) as e,
    ):
        SAE.from_pretrained(release=RELEASE, sae_id="encoder/layer_5")
    msg = str(e.value)
    assert msg.startswith(
        "mindchain/t5gemma2-sae-all-layers/encoder/sae_encoder_05.pt: not in the local Hugging Face cache"
    )
    assert "HF_HUB_OFFLINE is set" in msg
    assert "`hf download mindchain/t5gemma2-sae-all-layers`" in msg and "HF_HUB_CACHE" in msg


# ------------------------------------------------------------------------------ bad input


class _RunsCode:
    """Unpickling this would create a file: proof whether pickle code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _good(stack: str = "encoder", layer: int = 3) -> dict:
    return synthetic.mindchain_checkpoint(stack, layer, d_in=8, d_sae=16, seed=3)


def _save(obj, folder: pathlib.Path, name: str = "sae_encoder_03.pt") -> pathlib.Path:
    path = folder / name
    torch.save(obj, path)
    return path


def _with(**changes) -> dict:
    ck = _good()
    for k, v in changes.items():
        if v is None:
            del ck[k]
        else:
            ck[k] = v(ck) if callable(v) else v
    return ck


def _nan_at(key: str, value: float):
    def f(ck: dict) -> torch.Tensor:
        t = ck[key].clone()
        t.view(-1)[2] = value
        return t

    return f


BAD_CHECKPOINTS = {
    "missing key": (_with(W_dec=None), r"missing keys \['W_dec'\]; the file has \['W_enc', "),
    "two missing keys": (_with(b_enc=None, W_dec=None), r"missing keys \['b_enc', 'W_dec'\]"),
    "W_enc transposed": (
        _with(W_enc=lambda ck: ck["W_enc"].T.contiguous()),
        re.escape(
            "wrong tensor shapes for d_in=8, d_sae=16: W_enc has shape [16, 8], expected [8, 16] = [d_in, d_sae] (transposed?)"
        ),
    ),
    "W_dec transposed": (
        _with(W_dec=lambda ck: ck["W_dec"].T.contiguous()),
        re.escape("W_dec has shape [8, 16], expected [16, 8] = [d_sae, d_in] (transposed?)"),
    ),
    "b_enc wrong length": (
        _with(b_enc=lambda ck: ck["b_enc"][:10]),
        re.escape("b_enc has shape [10], expected [16] = [d_sae]"),
    ),
    "d_in field disagrees": (
        _with(d_in=9),
        re.escape("the fields d_in=9, d_sae=16 disagree with the tensors, which have d_in=8, d_sae=16"),
    ),
    "d_sae field disagrees": (
        _with(d_sae=4096),
        re.escape("the fields d_in=8, d_sae=4096 disagree with the tensors, which have d_in=8, d_sae=16"),
    ),
    "NaN": (
        _with(W_dec=_nan_at("W_dec", float("nan"))),
        re.escape("W_dec has 1 NaN and 0 Inf values (of 128)"),
    ),
    "Inf": (
        _with(b_enc=_nan_at("b_enc", float("-inf"))),
        re.escape("b_enc has 0 NaN and 1 Inf values (of 16)"),
    ),
    "integer tensor": (
        _with(W_enc=lambda ck: ck["W_enc"].long()),
        "W_enc is a torch.int64 tensor, expected a floating-point tensor",
    ),
    "not a tensor": (_with(b_dec=[0.0] * 8), "b_dec is a list, expected a floating-point tensor"),
    "bad layer_type": (
        _with(layer_type="middle"),
        r"layer_type is 'middle', expected one of \['encoder', 'decoder'\]",
    ),
    "negative layer_idx": (_with(layer_idx=-1), "layer_idx is -1, expected an integer >= 0"),
    "huge layer_idx": (
        _with(layer_idx=10**30),
        "layer_idx is 1000000000000000000000000000000, more than the largest accepted value 999",
    ),
    "huge d_sae field": (_with(d_sae=2**40), "d_sae is 1099511627776, more than the largest accepted value"),
    "float64 tensor": (
        _with(b_dec=lambda ck: ck["b_dec"].double()),
        re.escape("b_dec has dtype torch.float64; accepted: float32, float16, bfloat16"),
    ),
    "string d_in": (_with(d_in="640"), "d_in is '640', expected an integer >= 1"),
    "not a dict": ([torch.zeros(3)], "expected a dict of tensors and fields, found a list"),
    "name disagrees": (
        _with(layer_idx=4),
        re.escape(
            "the file name says encoder layer 3, but the checkpoint says layer_type='encoder', layer_idx=4"
        ),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_clear_error(tmp_path, case):
    obj, pattern = BAD_CHECKPOINTS[case]
    path = _save(obj, tmp_path)
    with pytest.raises(MindchainCheckpointError, match=pattern) as e:
        SAE.load_from_disk(path, converter=mindchain_disk_loader)
    assert str(e.value).startswith(f"{path}: ")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    ck = _good()
    ck["history"] = _RunsCode(marker)
    path = _save(ck, tmp_path)
    with pytest.raises(
        MindchainCheckpointError, match="the pickle needs to run code to load, which is refused"
    ) as e:
        SAE.load_from_disk(path, converter=mindchain_disk_loader)
    assert str(e.value).startswith(f"{path}: ")
    # Names what the pickle wanted to call (Path.touch is pickled as getattr(PosixPath, 'touch')).
    assert (
        "(torch.load(weights_only=True) failed: Unsupported global: GLOBAL getattr was not an allowed global"
        in str(e.value)
    )
    assert not marker.exists()
    # Control: the file really does run code when unpickled without weights_only.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_numpy_values_in_history_are_data_not_code(tmp_path):
    ck = _good()
    ck["history"] = {"loss": [np.float64(0.5), np.float32(0.25)], "l0": np.array([900.0, 800.0])}
    ck["d_in"], ck["layer_idx"] = np.int64(8), np.int32(3)
    sae = SAE.load_from_disk(_save(ck, tmp_path), converter=mindchain_disk_loader)
    assert sae.cfg.d_in == 8 and type(sae.cfg.d_in) is int and sae.cfg.metadata.layer_idx == 3
    assert training_history(sae) == {"loss": [0.5, 0.25], "l0": [900.0, 800.0]}
    assert type(training_history(sae)["loss"][0]) is float


@pytest.mark.parametrize("keep", [0, 0.5, 0.99])
def test_truncated_file(tmp_path, keep):
    good = _save(_good(), tmp_path, "full.pt").read_bytes()
    path = tmp_path / "sae_encoder_03.pt"
    path.write_bytes(good[: int(len(good) * keep)])
    with pytest.raises(
        MindchainCheckpointError, match="cannot be read, the file is truncated or corrupt"
    ) as e:
        SAE.load_from_disk(path, converter=mindchain_disk_loader)
    assert str(e.value).startswith(f"{path}: ")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such mindchain checkpoint file"):
        mindchain_disk_loader(tmp_path / "sae_encoder_00.pt")


def test_bad_file_through_the_hub(hub_cache):
    # A second repo in the same offline cache, holding a NaN checkpoint: the hub loader
    # names the cached file in its error.
    buf = io.BytesIO()
    torch.save(_with(W_enc=_nan_at("W_enc", float("nan"))), buf)
    synthetic.write_hub_repo(
        hub_cache, "test-user/bad-mindchain", {"encoder/sae_encoder_03.pt": buf.getvalue()}
    )
    with pytest.raises(MindchainCheckpointError, match=r"sae_encoder_03\.pt: W_enc has 1 NaN"):
        SAE.from_pretrained(
            release="test-user/bad-mindchain",
            sae_id="encoder/sae_encoder_03.pt",
            converter=mindchain_huggingface_loader,
        )
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        mindchain_huggingface_loader("test-user/bad-mindchain", "encoder/sae_encoder_04.pt")


# ------------------------------------------------------------------ tensor-only files


def _tensor_only(stack: str, layer: int, d_in: int = D_IN, d_sae: int = D_SAE) -> dict:
    ck = synthetic.mindchain_checkpoint(stack, layer, d_in, d_sae, seed=7)
    return {k: ck[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}


def test_tensor_only_file_through_the_hub(hub_cache):
    # The card's quick start shows only the four tensors: no layer_type, layer_idx, d_in, d_sae.
    ck = _tensor_only("decoder", 6)
    buf = io.BytesIO()
    torch.save(ck, buf)
    repo = "test-user/tensor-only-mindchain"
    synthetic.write_hub_repo(hub_cache, repo, {"decoder/sae_decoder_06.pt": buf.getvalue()})
    sae = SAE.from_pretrained(
        release=repo, sae_id="decoder/sae_decoder_06.pt", converter=mindchain_huggingface_loader
    )
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, k).data, ck[k]), k
    m = sae.cfg.metadata
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert (m.layer_type, m.layer_idx) == ("decoder", 6)
    assert m.hook_name == "decoder_blocks.6.self_attn.hook_out"
    assert m.fields_from == {
        "layer_type": "file name",
        "layer_idx": "file name",
        "d_in": "tensor shapes",
        "d_sae": "tensor shapes",
    }
    assert training_history(sae) == {}


def test_metadata_marks_assumptions(hub_cache):
    sae = SAE.from_pretrained(release=RELEASE, sae_id="encoder/layer_1")
    m = sae.cfg.metadata
    assert m.training_convention == "unknown"
    assert set(m.assumed) == {
        "context_size",
        "prepend_bos",
        "exclude_special_tokens",
        "training_convention",
        "dataset_path",
    }
    assert m.assumed["context_size"].startswith("guess: ")
    assert m.assumed["prepend_bos"].startswith("guess: ")
    assert m.assumed["training_convention"].startswith("unknown: the card does not say")
    assert m.model_class_name == "HookedT5Gemma2"
    assert m.model_from_pretrained_kwargs == {"dtype": "float16"}
    assert m.dataset_path is None and m.exclude_special_tokens is False
    assert m.fields_from["layer_idx"] == "checkpoint"


def test_tensor_only_file_without_a_mindchain_name(tmp_path):
    path = _save(_tensor_only("encoder", 2, 8, 16), tmp_path, "weights.pt")
    with pytest.raises(
        MindchainCheckpointError,
        match=re.escape(
            f"{path}: cannot tell the stack and layer: the file name is not sae_<encoder|decoder>_<NN>.pt "
            "and the file has no layer_type and layer_idx fields"
        ),
    ):
        mindchain_disk_loader(path)
    # With the two fields it loads under any name; widths still come from the shapes.
    ck = _tensor_only("encoder", 2, 8, 16) | {"layer_type": "encoder", "layer_idx": 2}
    cfg, state = mindchain_disk_loader(_save(ck, tmp_path, "weights.pt"))
    assert (cfg["d_in"], cfg["d_sae"], cfg["metadata"]["hook_name"]) == (
        8,
        16,
        "encoder_blocks.2.attn.hook_out",
    )
    assert torch.equal(state["W_dec"], ck["W_dec"])


def test_legacy_torch_file_falls_back_to_a_full_read(tmp_path):
    # torch's pre-1.6 format cannot be memory-mapped; it must still load, identically.
    ck = _good()
    path = tmp_path / "sae_encoder_03.pt"
    torch.save(ck, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] != b"PK"
    with pytest.raises(RuntimeError, match="mmap can only be used with files saved with"):
        torch.load(path, mmap=True, weights_only=True)
    sae = SAE.load_from_disk(path, converter=mindchain_disk_loader)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, k).data, ck[k]), k
    # ... and the same checks apply to it.
    torch.save(_with(W_enc=_nan_at("W_enc", float("nan"))), path, _use_new_zipfile_serialization=False)
    with pytest.raises(
        MindchainCheckpointError, match=re.escape("W_enc has 1 NaN and 0 Inf values (of 128)")
    ):
        mindchain_disk_loader(path)


def test_finiteness_check_runs_on_one_thread_and_restores_the_thread_count(tmp_path, monkeypatch):
    # The sums run with torch on one thread (see mindchain._one_thread); the caller's
    # setting comes back after a clean load and after a refused one.
    seen = []
    real_sum = torch.Tensor.sum

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_sum(self, *args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch.Tensor, "sum", spy)
        cfg, state = mindchain_disk_loader(_save(_good(), tmp_path))
        assert seen == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2
        bad = _save(_with(b_dec=_nan_at("b_dec", float("inf"))), tmp_path)
        with pytest.raises(
            MindchainCheckpointError, match=re.escape("b_dec has 0 NaN and 1 Inf values (of 8)")
        ):
            mindchain_disk_loader(bad)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(state["W_enc"], _good()["W_enc"])


def test_converter_for_a_read_checkpoint_equals_the_disk_loader(tmp_path):
    # convert builds each SAE from the checkpoint it already read, without a second read.
    path = _save(_good(), tmp_path)
    ckpt = read_checkpoint(path)
    cfg_a, state_a = converter_for(ckpt)(path, "cpu", {"dtype": "float16"})
    cfg_b, state_b = mindchain_disk_loader(path, "cpu", {"dtype": "float16"})
    assert cfg_a == cfg_b
    assert state_a.keys() == state_b.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for k in state_a:
        assert state_a[k].dtype == torch.float16
        assert torch.equal(state_a[k], state_b[k]), k


def test_fp16_sum_overflow_is_not_mistaken_for_inf(tmp_path):
    # The fast check sums each tensor; a large finite fp16 tensor overflows that sum, and
    # the exact count must then clear it.
    ck = {k: v.half() for k, v in _tensor_only("encoder", 3, 8, 16).items()}
    ck["W_enc"] = torch.full((8, 16), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(ck["W_enc"].sum())
    cfg, state = mindchain_disk_loader(_save(ck, tmp_path))
    assert cfg["dtype"] == "float16" and torch.equal(state["W_enc"], ck["W_enc"])
