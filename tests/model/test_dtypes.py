"""The dtype contract (``sae_lens_t5gemma.model.dtypes``), on every branch whatever this machine is.

Covers:

- the ``auto`` decision: CPU flags (``avx512_bf16``, ``amx_bf16``) and CUDA's
  ``is_bf16_supported`` faked both ways, and ``SAE_LENS_T5GEMMA_FAST_BF16`` forcing it;
- the defaults: float32 for analysis whatever the hardware, ``auto`` for training,
  ``SAE_LENS_T5GEMMA_DTYPE`` replacing both; bad values named;
- every boundary where a float32 SAE meets a float32, bfloat16 or float16 model: splicing
  (with and without the error term, special-token bypass, transcoders), ``steer``,
  ``top_features``, ``evaluate_sae`` and corpus statistics; what reaches the model is in its
  dtype, and results agree with the float32 model within stated tolerances;
- the mindchain SAEs spliced into the stand-in: logits in bfloat16 and float16 against float32;
- float16 overflow: an SAE output beyond 65504 raises, naming the hook;
- training under each branch of ``auto`` records the dtype it harvested in.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEVICE
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from sae_lens_t5gemma import training
from sae_lens_t5gemma.analysis.evaluation import evaluate_sae
from sae_lens_t5gemma.model import dtypes as dtypes
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2, load_t5gemma2
from sae_lens_t5gemma.model.steering import top_features
from sae_lens_t5gemma.stand_in import synthetic as synthetic

pytestmark = pytest.mark.auto_branch

LOW = ["bfloat16", "float16"]

# Relative L2 difference of logits against the float32 model, on the stand-in (18 layers per
# stack, hidden 64): the clean model itself measured 5.7% (bfloat16) and 0.76% (float16), and
# the mindchain SAEs spliced in 4.4% and 0.65%. The bounds leave room for other CPUs' kernels.
LOGIT_REL = {"bfloat16": 0.08, "float16": 0.015}


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 {flags}\n\n")
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize(
    "flags, fast",
    [("avx512f avx512_bf16", True), ("avx512f amx_bf16 amx_tile", True), ("avx512f avx512_vnni", False)],
)
def test_cpu_bf16_check_reads_the_flags(tmp_path, flags, fast):
    assert dtypes.cpu_has_fast_bf16(_cpuinfo(tmp_path, flags)) is fast
    # A flag named only as a prefix of another does not count; no file, no bfloat16.
    assert dtypes.cpu_has_fast_bf16(_cpuinfo(tmp_path, "avx512_bf16x")) is False
    assert dtypes.cpu_has_fast_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu_check_both_ways(monkeypatch, native):
    monkeypatch.delenv(dtypes.FAST_BF16_ENV, raising=False)
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: native)
    want = torch.bfloat16 if native else torch.float32
    assert dtypes.auto_dtype("cpu") == want
    assert dtypes.resolve_dtype("auto", "cpu") == want
    assert dtypes.resolve_dtype(None, "cpu", "training") == want
    assert dtypes.resolve_dtype(None, "cpu") == torch.float32  # analysis: float32 on every machine
    assert dtypes.resolve_dtype("auto", "meta") == torch.float32


@pytest.mark.parametrize("available, bf16, want", [(True, True, torch.bfloat16), (True, False, torch.float32),
                                                   (False, True, torch.float32)])  # fmt: skip
def test_auto_follows_the_cuda_check_both_ways(monkeypatch, available, bf16, want):
    monkeypatch.delenv(dtypes.FAST_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert dtypes.auto_dtype("cuda") == want
    assert dtypes.auto_dtype(torch.device("cuda", 1)) == want


@pytest.mark.parametrize("forced, want", [("1", torch.bfloat16), ("0", torch.float32)])
def test_the_environment_forces_the_auto_branch(monkeypatch, forced, want):
    monkeypatch.setenv(dtypes.FAST_BF16_ENV, forced)
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: forced == "0")  # the opposite answer
    assert dtypes.auto_dtype("cpu") == want and dtypes.auto_dtype("cuda") == want
    monkeypatch.setenv(dtypes.FAST_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=r"^SAE_LENS_T5GEMMA_FAST_BF16='yes': expected 1 \(bfloat16\) or 0"):
        dtypes.auto_dtype("cpu")


def test_defaults_and_the_dtype_variable(monkeypatch, tiny_model_dir):
    monkeypatch.delenv(dtypes.DTYPE_ENV, raising=False)
    monkeypatch.setenv(dtypes.FAST_BF16_ENV, "1")
    assert load_t5gemma2(tiny_model_dir).cfg.dtype == torch.float32  # analysis ignores the hardware
    assert HookedT5Gemma2.from_pretrained(tiny_model_dir, dtype="auto").cfg.dtype == torch.bfloat16
    assert training.TrainConfig(model="m", dataset="d", hooks=["x"]).model_dtype == "auto"
    monkeypatch.setenv(dtypes.DTYPE_ENV, "float16")
    assert load_t5gemma2(tiny_model_dir).hf_model.dtype == torch.float16
    assert training.TrainConfig(model="m", dataset="d", hooks=["x"]).model_dtype == "float16"
    monkeypatch.setenv(dtypes.DTYPE_ENV, "half")
    with pytest.raises(
        ValueError, match=r"^SAE_LENS_T5GEMMA_DTYPE='half': expected one of float32, bfloat16"
    ):
        load_t5gemma2(tiny_model_dir)
    with pytest.raises(ValueError, match=r"dtype 'int8' is not a torch floating dtype .* or 'auto'"):
        dtypes.resolve_dtype("int8")


# --------------------------------------------------------------------------- boundaries


@pytest.fixture(scope="module")
def models(tiny_model_dir) -> dict[str, HookedT5Gemma2]:
    return {d: load_t5gemma2(tiny_model_dir, dtype=d, device=DEVICE) for d in ("float32", *LOW)}


def _sae(model: HookedT5Gemma2, hook: str, d_in: int, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    meta = SAEMetadata(model_name="stand-in", hook_name=hook, prepend_bos=True)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, device=DEVICE, metadata=meta))
    with torch.no_grad():
        sae.b_enc.uniform_(0.0, 0.1)
    return sae


TEXTS = synthetic.stand_in_texts()[:3]
SITES = [("encoder_blocks.1.attn.hook_z", "attn"), ("decoder_blocks.0.hook_resid_post", "model"),
         ("decoder_blocks.1.mlp.hook_post", "mlp")]  # fmt: skip


def _width(model: HookedT5Gemma2, kind: str) -> int:
    return {"attn": model.cfg.n_heads * model.cfg.d_head, "mlp": model.cfg.d_mlp}.get(kind, model.cfg.d_model)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("hook, kind", SITES)
def test_splicing_hands_the_model_its_dtype(models, dtype, hook, kind):
    ref, model = models["float32"], models[dtype]
    sae = _sae(model, hook, _width(model, kind))
    tokens = model.to_tokens(TEXTS)
    seen = {}

    def record(x, hook):
        seen[hook.name] = x.dtype

    with torch.no_grad():
        clean = model(tokens)
        for error_term in (False, True):
            logits, cache = model.run_with_cache_with_saes(
                tokens, saes=[sae], use_error_term=error_term, exclude_special_tokens=True
            )
            want = ref.run_with_saes(
                tokens, saes=[sae], use_error_term=error_term, exclude_special_tokens=True
            )
            assert logits.dtype == getattr(torch, dtype)
            assert rel(logits, want) < LOGIT_REL[dtype], (error_term, rel(logits, want))
            assert cache[f"{hook}.hook_sae_acts_post"].dtype == torch.float32  # the SAE's own dtype
            assert cache[f"{hook}.hook_sae_output"].dtype == getattr(torch, dtype)  # what flows on
            if error_term:  # the error term restores the activation to within one unit of rounding
                ulp = 2 * torch.finfo(logits.dtype).eps
                torch.testing.assert_close(logits, clean, atol=ulp, rtol=ulp)
        model.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(f"{hook}.hook_sae_output", record)])
    assert seen == {f"{hook}.hook_sae_output": getattr(torch, dtype)}


@pytest.mark.parametrize("dtype", LOW)
def test_transcoder_steer_features_and_evals_follow_the_contract(models, dtype):
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    ref, model = models["float32"], models[dtype]
    d = model.cfg.d_model
    meta = SAEMetadata(model_name="stand-in", hook_name="decoder_blocks.1.mlp.hook_in", prepend_bos=True)
    meta.hook_name_out = "decoder_blocks.1.mlp.hook_out"
    torch.manual_seed(1)
    tc = Transcoder(
        TranscoderConfig(
            d_in=d, d_sae=2 * d, d_out=d, apply_b_dec_to_input=False, device=DEVICE, metadata=meta
        )
    )
    tokens = model.to_tokens(TEXTS)
    with torch.no_grad():
        tc.b_enc.uniform_(0.0, 0.2)
        assert (
            rel(model.run_with_saes(tokens, saes=[tc]), ref.run_with_saes(tokens, saes=[tc]))
            < LOGIT_REL[dtype]
        )

    sae = _sae(model, "encoder_blocks.1.attn.hook_out", d, seed=2)
    with torch.no_grad(), model.steer(sae, [0, 3], scale=4.0) as report:
        steered = model(tokens)
    with torch.no_grad(), ref.steer(sae, [0, 3], scale=4.0):
        steered_ref = ref(tokens)
    assert steered.dtype == getattr(torch, dtype) and rel(steered, steered_ref) < LOGIT_REL[dtype]
    assert report.summary()["positions"] > 0

    rows = top_features(model, sae, TEXTS[0], k=5)
    rows_ref = top_features(ref, sae, TEXTS[0], k=5)
    assert [(r.position, r.feature) for r in rows][:3] == [(r.position, r.feature) for r in rows_ref][:3]

    batches = [model.to_tokens(TEXTS)]
    got, want = evaluate_sae(model, sae, batches), evaluate_sae(ref, sae, batches)
    assert got["n_tokens"] == want["n_tokens"]
    for key in ("explained_variance", "l0", "ce_loss_with_sae"):
        assert got[key] == pytest.approx(want[key], rel=0.05, abs=0.02), key


def test_mindchain_saes_spliced_in_low_precision_match_float32(hub_cache):
    with synthetic.offline_hub(hub_cache):
        saes = [SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id=f"{s}/layer_5", device=DEVICE)
                for s in ("encoder", "decoder")]  # fmt: skip
        models = {
            d: load_t5gemma2(synthetic.T5GEMMA2_MODEL, dtype=d, device=DEVICE) for d in ("float32", *LOW)
        }
    assert all(s.cfg.dtype == "float32" for s in saes)
    tokens = models["float32"].to_tokens(synthetic.stand_in_texts()[:4])
    with torch.no_grad():
        want = models["float32"].run_with_saes(tokens, saes=saes)
        for d in LOW:
            got = models[d].run_with_saes(tokens, saes=saes)
            assert got.dtype == getattr(torch, d)
            assert rel(got, want) < LOGIT_REL[d], (d, rel(got, want))


def test_float16_overflow_is_named_not_silent(models):
    model = models["float16"]
    hook = "encoder_blocks.0.hook_resid_post"
    sae = _sae(model, hook, model.cfg.d_model)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.fill_(1e5)  # the output is exactly 1e5, beyond float16's 65504
    tokens = model.to_tokens(TEXTS[0])
    with pytest.raises(OverflowError, match=rf"^SAE at {hook}: the SAE's output reaches \|x\| = 1e\+05, beyond "
                       r"float16's largest value \(65504\); .* Load the model in bfloat16 or float32"):  # fmt: skip
        model.run_with_saes(tokens, saes=[sae])
    with torch.no_grad():
        sae.W_dec[0].fill_(1.0)  # setting feature 0 to 1e6 adds about 1e6 to every coordinate
    with pytest.raises(OverflowError, match=rf"^steering at {hook}: "), model.steer(sae, [0], value=1e6):
        model(tokens)
    models["bfloat16"].run_with_saes(tokens, saes=[sae])  # bfloat16 has float32's range


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "forced, asked, want", [("1", "auto", "bfloat16"), ("0", "auto", "float32"), ("1", "float16", "float16")]
)
def test_training_records_the_dtype_of_either_auto_branch(
    tiny_model_dir, tmp_path, monkeypatch, forced, asked, want
):
    import json

    monkeypatch.delenv(dtypes.DTYPE_ENV, raising=False)
    monkeypatch.setenv(dtypes.FAST_BF16_ENV, forced)
    data = training.write_text_dataset(synthetic.stand_in_texts() * 4, tmp_path / "train.jsonl")
    cfg = training.TrainConfig(
        model=str(tiny_model_dir), hooks=["encoder.1.attn_out"], dataset=str(data), out=str(tmp_path / "out"),
        architecture="topk", k=8, d_sae=64, training_tokens=8 * 256, train_batch_size_tokens=256,
        context_size=32, store_batch_size_prompts=8, eval_every_n_steps=1000, n_eval_batches=1,
        eval_batch_size_prompts=4, n_batches_for_norm_estimate=2, disable_concat_sequences=False,
        **({} if asked == "auto" else {"model_dtype": asked}),
    )  # fmt: skip
    plan = training.plan_training(cfg)
    assert cfg.model_dtype == asked and plan.model_dtype == want
    result = training.train(plan)
    sae = result.saes["encoder.1.attn_out"]
    assert sae.cfg.metadata.t5gemma2_model_dtype == want and sae.cfg.dtype == "float32"
    ev = result.eval_metrics["encoder.1.attn_out"]
    assert all(v == v for v in training.flatten_metrics(ev).values() if isinstance(v, float))  # no NaN
    record = json.loads((tmp_path / "out" / "encoder.1.attn_out" / "eval_metrics.json").read_text())
    assert (record["model_dtype"], record["sae_dtype"]) == (want, "float32")
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["model_dtype"] == want
