"""Precision and activation-store memory (issue 9, items 2 and 4), on the tiny random T5Gemma 2.

Covers:

- (the ``auto`` decision and the dtype contract are in ``test_dtypes.py``);
- parity: a bfloat16 model's hooked activations against the float32 model's, relative error of
  the activations within 2% at every attn_out site of both stacks;
- training a bfloat16 model with two hooks in one multi-hook runner: SAELens receives float32
  activations (its multi-hook store does not cast), the SAEs stay float32, and they train;
- ``TrainConfig``: model dtype ``auto``, ``autocast``/``autocast_lm``/``sparse_decode`` reach
  SAELens' configs, ``max_memory`` parsing and its errors;
- store sizing from the total hook width and the budget: the chosen sizes fit the budget, the
  buffer keeps at least two SAE batches, and a served SAE batch mixes many sequences (checked
  by running SAELens' own mixing buffer on sequence ids).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from sae_lens_t5gemma import training
from sae_lens_t5gemma.model.hooked import load_t5gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic
from sae_lens_t5gemma.training import runner as training_runner
from sae_lens_t5gemma.training.memory import memory_budget, store_bytes
from sae_lens_t5gemma.training.plan import ModelDims, TrainingPlan, expand_hooks

pytestmark = [
    pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted"),
    pytest.mark.auto_branch,
]

# The bf16/fp32 parity bound: ||a_bf16 - a_fp32|| / ||a_fp32|| per site. bfloat16 keeps 8
# mantissa bits (relative rounding 2^-9 = 0.2% per value); through 2 layers it compounds to
# well under 2% (measured 0.4-0.9% on this model; the issue measured 0.85% at the real size).
PARITY_REL = 0.02

REAL_DIMS = ModelDims(
    "real-dims",
    {"encoder": 18, "decoder": 18},
    {"encoder": 640, "decoder": 640},
    {"encoder": 1024, "decoder": 1024},
)


@pytest.fixture(scope="module")
def fp32_and_bf16(tiny_model_dir):
    return load_t5gemma2(tiny_model_dir, dtype="float32"), load_t5gemma2(tiny_model_dir, dtype="bfloat16")


@pytest.mark.parametrize("convention", ["prefix_lm", "reconstruct"])
def test_bf16_activations_match_fp32(fp32_and_bf16, convention):
    fp32, bf16 = fp32_and_bf16
    hooks = [
        "encoder_blocks.0.attn.hook_out",
        "encoder_blocks.1.attn.hook_out",
        "decoder_blocks.0.self_attn.hook_out",
        "decoder_blocks.1.self_attn.hook_out",
        "encoder_blocks.1.hook_resid_post",
    ]
    texts = synthetic.stand_in_texts()[:6]
    rel = {}
    for m in (fp32, bf16):
        m.convention = convention
    a32 = training.collect_activations(fp32, texts, hooks)
    a16 = training.collect_activations(bf16, texts, hooks)
    for h in hooks:
        assert a32[h].shape == a16[h].shape and a32[h].shape[0] > 50
        rel[h] = float((a16[h] - a32[h]).norm() / a32[h].norm())
    assert max(rel.values()) < PARITY_REL, rel
    assert min(rel.values()) > 0  # really bfloat16: rounding shows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    texts = synthetic.stand_in_texts()[:20]
    rng, lines = random.Random(0), []
    for _ in range(15):
        rng.shuffle(texts)
        lines += texts
    return training.write_text_dataset(lines, tmp_path_factory.mktemp("data") / "train.jsonl")


def test_bf16_model_trains_two_hooks_in_one_runner(
    tiny_model_dir, fp32_and_bf16, data, tmp_path, monkeypatch
):
    _, bf16 = fp32_and_bf16
    seen: list[tuple[torch.dtype, ...]] = []
    original = training_runner._cast_multi_hook_activations

    def spy(store):
        original(store)
        cast = store.get_multi_hook_activations

        def record(tokens):
            out = cast(tokens)
            seen.append(tuple(t.dtype for t in out.values()))
            return out

        store.get_multi_hook_activations = record

    monkeypatch.setattr(training_runner, "_cast_multi_hook_activations", spy)
    cfg = training.TrainConfig(
        model=str(tiny_model_dir), hooks=["encoder.0.attn_out", "encoder.1.attn_out"], dataset=str(data),
        out=str(tmp_path / "out"), architecture="topk", k=8, d_sae=64, training_tokens=40 * 256,
        train_batch_size_tokens=256, context_size=32, store_batch_size_prompts=8, lr=3e-3,
        eval_every_n_steps=1000, n_eval_batches=1, eval_batch_size_prompts=4, n_batches_for_norm_estimate=5,
        disable_concat_sequences=False, model_dtype="bfloat16",
    )  # fmt: skip
    plan = training.plan_training(cfg)
    result = training.train(plan, model=bf16, keep_initial=True)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert {s.cfg.metadata.t5gemma2_model_dtype for s in result.saes.values()} == {"bfloat16"}
    held = training.collect_activations(
        bf16, synthetic.stand_in_texts()[20:], [s.hook_name for s in plan.sites]
    )
    for site in plan.sites:
        sae = result.saes[site.friendly]
        assert sae.W_enc.dtype == torch.float32 and sae.cfg.dtype == "float32"
        x = held[site.hook_name]
        before = training.reconstruction_mse(result.initial_saes[site.friendly], x)
        after = training.reconstruction_mse(sae, x)
        assert after < 0.5 * before, (site.friendly, before, after)


def test_config_fields_reach_sae_lens(tiny_model_dir, data):
    # The short stand-in sentences fill no 512-token row one document at a time: pack them.
    base = dict(
        model=str(tiny_model_dir),
        dataset=str(data),
        architecture="topk",
        k=8,
        d_sae=64,
        disable_concat_sequences=False,
    )
    cfg = training.TrainConfig(
        hooks=["encoder.1.attn_out"], autocast=True, autocast_lm=True, sparse_decode=True, **base
    )
    assert training.TrainConfig(hooks=["x"], **base).model_dtype == "auto"
    plan = training.plan_training(cfg)
    run = training.build_runner_config(plan, plan.sites[0])
    assert (
        run.autocast,
        run.autocast_lm,
        run.sae.use_sparse_activations,
        run.sae.dtype,
        run.sae.rescale_acts_by_decoder_norm,
    ) == (
        True,
        True,
        True,
        "float32",
        False,
    )
    multi = training.build_multi_runner_config(
        training.plan_training(training.TrainConfig(hooks=["encoder.*.attn_out"], autocast=True, **base))
    )
    assert (multi.autocast, multi.autocast_lm) == (True, False)
    with pytest.raises(ValueError, match="model_dtype must be auto, float32, bfloat16 or float16, got 'fp8'"):
        training.plan_training(training.TrainConfig(hooks=["encoder.1.attn_out"], model_dtype="fp8", **base))
    with pytest.raises(ValueError, match="sparse_decode is SAELens' TopK option .* architecture 'batchtopk'"):
        training.plan_training(
            training.TrainConfig(
                hooks=["encoder.1.attn_out"], **{**base, "architecture": "batchtopk"}, sparse_decode=True
            )
        )


@pytest.mark.parametrize(
    "given, expected",
    [
        ("1.5GiB", int(1.5 * 2**30)),
        ("800MB", 800 * 10**6),
        ("512 mib", 512 * 2**20),
        (4096, 4096),
        ("100", 100),
    ],
)
def test_memory_budget_parses_sizes(given, expected):
    assert memory_budget(given) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GiB", 0, "1.5TB", True])
def test_memory_budget_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="max_memory must be"):
        memory_budget(bad)


def test_default_budget_is_a_sixteenth_of_ram():
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_budget(None) == max(512 * 2**20, total // 16)


def _plan(hooks: list[str], **overrides) -> TrainingPlan:
    cfg = training.TrainConfig.from_preset(
        "recommended", model="real-dims", hooks=hooks, dataset="x", **overrides
    )
    sites = expand_hooks(hooks, REAL_DIMS)
    return TrainingPlan(cfg, REAL_DIMS, tuple(sites), (), tuple(dict.fromkeys(s.stack for s in sites)))


def test_store_sizing_scales_with_total_hook_width():
    one = _plan(["encoder.5.attn_out"], max_memory="1.5GiB").store_sizing()
    # Encoder-only: the encoder reads whole rows (512 covered positions); four SAE batches fit.
    assert (one.width, one.store_batch_size_prompts, one.n_batches_in_buffer) == (640, 16, 32)
    plan36 = _plan(["encoder.*.attn_out", "decoder.*.attn_out"], max_memory="1.5GiB")
    enc = plan36.store_sizing([s for s in plan36.sites if s.stack == "encoder"])
    # One runner per stack: 18 hooks x 640 floats; covered length 256, so 48 rows = 3 SAE batches.
    assert (enc.width, enc.store_batch_size_prompts, enc.n_batches_in_buffer) == (11520, 1, 48)
    assert enc.estimate_bytes <= enc.budget_bytes == int(1.5 * 2**30)
    assert enc.n_batches_for_norm_estimate == 1
    for sizing in (one, enc):
        assert sizing.estimate_bytes == store_bytes(
            sizing.width, sizing.store_batch_size_prompts, 512, 512 if sizing is one else 256,
            sizing.n_batches_in_buffer * (512 if sizing is one else 256), 4096,
        )  # fmt: skip
    # More memory buys the fourth batch back before more prompts per forward.
    big = _plan(["encoder.*.attn_out", "decoder.*.attn_out"], max_memory="3GiB")
    big_enc = big.store_sizing([s for s in big.sites if s.stack == "encoder"])
    assert (big_enc.n_batches_in_buffer, big_enc.store_batch_size_prompts) == (64, 8)
    with pytest.raises(
        ValueError, match=r"max_memory=0.50 GiB is too small for the activation store of 18 hook\(s\) "
    ):
        _plan(["encoder.*.attn_out", "decoder.*.attn_out"], max_memory="512MiB").store_sizing(
            [s for s in plan36.sites if s.stack == "encoder"]
        )
    # Explicit sizes are kept (and still checked against the budget).
    fixed = _plan(["encoder.5.attn_out"], store_batch_size_prompts=4, n_batches_in_buffer=10).store_sizing()
    assert (fixed.store_batch_size_prompts, fixed.n_batches_in_buffer) == (4, 10)


def test_sized_buffer_still_mixes_sequences():
    """Shuffle quality: SAELens' mixing buffer, fed sequence ids, at the sizes chosen for 36 hooks."""
    from sae_lens.training.mixing_buffer import mixing_buffer

    plan36 = _plan(["encoder.*.attn_out", "decoder.*.attn_out"], max_memory="1.5GiB")
    sizing = plan36.store_sizing([s for s in plan36.sites if s.stack == "encoder"])
    covered, batch = 256, 4096
    per_forward = sizing.store_batch_size_prompts * covered

    def forwards():
        seq = 0
        while True:
            ids = torch.arange(seq, seq + sizing.store_batch_size_prompts).repeat_interleave(covered)
            seq += sizing.store_batch_size_prompts
            yield ids.unsqueeze(1).float()

    assert per_forward == 256
    torch.manual_seed(0)
    stream = mixing_buffer(sizing.n_batches_in_buffer * covered, batch, forwards())
    shares, distinct = [], []
    for _, served in zip(range(40), stream, strict=False):
        counts = Counter(served[:, 0].long().tolist())
        distinct.append(len(counts))
        shares.append(max(counts.values()) / batch)
    # Unshuffled, a 4096-token batch is 16 whole rows (each 1/16 = 6.25% of it). Mixed, every
    # batch spreads over at least 40 rows and no row supplies more than 3% of it.
    assert min(distinct) >= 40 and max(shares) <= 0.03, (min(distinct), max(shares))


def test_cli_train_takes_precision_and_memory(tiny_model_dir, data, monkeypatch, capsys):
    from sae_lens_t5gemma.cli.main import main

    seen = []
    monkeypatch.setattr(training, "run_training", lambda cfg, cache_dir=None: seen.append(cfg))
    base = [
        "train",
        str(tiny_model_dir),
        "--hook",
        "encoder.1.attn_out",
        "--dataset",
        str(data),
        "--device",
        "cpu",
    ]
    assert main([*base, "--model-dtype", "bfloat16", "--autocast", "--max-memory", "800MB"]) == 0
    assert main(base) == 0
    assert [(c.model_dtype, c.autocast, c.max_memory) for c in seen] == [
        ("bfloat16", True, "800MB"),
        ("auto", False, None),
    ]
    monkeypatch.undo()
    assert main([*base, "--max-memory", "lots", "--out", "unused"]) == 2
    assert "max_memory must be a byte count or a size like '1.5GiB', got 'lots'" in capsys.readouterr().err
