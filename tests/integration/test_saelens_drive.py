"""SAELens' own code driving HookedT5Gemma2 (no SAELens internals mocked).

Covers: ``ActivationsStore.from_config`` (LanguageModelSAERunnerConfig + override_dataset)
yields activations equal to ``run_with_cache`` for an encoder and a decoder hook, and the
multi-hook store takes both from one pass; ``sae_lens.evals.run_evals`` with CE-loss and
KL on gives finite, sensible numbers: a perfect SAE (x -> relu(x) - relu(-x)) scores CE and
KL ~ 1 with zero extra loss (special tokens excluded, SAELens' default), a zero SAE scores ~ 0
(with no exclusion it is exactly SAELens' zero ablation), on an encoder
attn_out site and on a decoder hook_z site (SAELens' head-axis path).
"""

import math

import pytest
import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardSAE, StandardSAEConfig
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_t5gemma.model.hooked import HookedT5Gemma2, load_t5gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic

ENC_HOOK = "encoder_blocks.1.attn.hook_out"
DEC_HOOK = "decoder_blocks.0.self_attn.hook_z"


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HookedT5Gemma2:
    return load_t5gemma2(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.from_dict({"text": synthetic.stand_in_texts()})


def _store(model, dataset, hook: str) -> ActivationsStore:
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=64, d_sae=128),
        model_name="stand-in",
        hook_name=hook,
        is_dataset_tokenized=False,
        streaming=False,
        context_size=16,
        n_batches_in_buffer=2,
        store_batch_size_prompts=4,
        train_batch_size_tokens=32,
        training_tokens=2_000,
        logger=LoggingConfig(log_to_wandb=False),
        exclude_special_tokens=True,
    )
    return ActivationsStore.from_config(model, cfg, override_dataset=dataset)


@pytest.mark.parametrize("hook", [ENC_HOOK, DEC_HOOK])
def test_activations_store_yields_model_activations(model, dataset, hook):
    store = _store(model, dataset, hook)
    tokens = store.get_batch_tokens()
    assert tokens.shape == (4, 16) and bool((tokens[:, 0] == 2).all())  # SAELens puts <bos> first
    acts = store.get_activations(tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
    expected = cache[hook].reshape(4, 16, 64)
    assert acts.shape == (4, 16, 64)
    assert torch.equal(acts, expected)
    batch = store.next_batch()
    assert batch.shape == (32, 64) and torch.isfinite(batch).all() and batch.abs().sum() > 0


def test_multi_hook_store_one_pass(model, dataset):
    store = ActivationsStore.from_config_multi_hook(
        model,
        dataset=dataset,
        hook_names=[ENC_HOOK, DEC_HOOK],
        hook_d_ins={ENC_HOOK: 64, DEC_HOOK: 64},
        streaming=False,
        context_size=16,
        store_batch_size_prompts=4,
        n_batches_in_buffer=2,
        train_batch_size_tokens=32,
    )
    tokens = store.get_batch_tokens()
    layer_calls: list[str] = []
    hf = model.hf_model
    handles = [
        hf.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: layer_calls.append(p))
        for p in ("model.encoder.text_model.layers.0", "lm_head")
    ]
    try:
        acts = store.get_multi_hook_activations(tokens)
    finally:
        for h in handles:
            h.remove()
    assert layer_calls == ["model.encoder.text_model.layers.0"]  # one pass, no LM head
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[ENC_HOOK, DEC_HOOK])
    assert torch.equal(acts[ENC_HOOK], cache[ENC_HOOK])
    assert torch.equal(acts[DEC_HOOK], cache[DEC_HOOK].flatten(-2))


def _sae(hook: str, perfect: bool) -> StandardSAE:
    cfg = StandardSAEConfig(
        d_in=64,
        d_sae=128,
        apply_b_dec_to_input=False,
        reshape_activations="hook_z" if hook.endswith("hook_z") else "none",
        metadata=SAEMetadata(hook_name=hook, prepend_bos=True, context_size=16),
    )
    sae = StandardSAE(cfg)
    eye = torch.eye(64)
    with torch.no_grad():
        # relu(x) - relu(-x) == x: a perfect reconstruction through a ReLU SAE.
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0) if perfect else torch.zeros(128, 64))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("hook", [ENC_HOOK, DEC_HOOK])
def test_run_evals_ce_and_kl(model, dataset, hook):
    eval_cfg = EvalConfig(
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=1,
        compute_ce_loss=True,
        compute_kl=True,
        compute_variance_metrics=True,
        compute_sparsity_metrics=True,
        compute_featurewise_density_statistics=False,
        compute_featurewise_weight_based_metrics=False,
    )
    results = {}
    for perfect in (True, False):
        store = _store(model, dataset, hook)
        # The zero SAE must equal SAELens' zero ablation, which also zeroes special tokens.
        metrics, _ = run_evals(
            _sae(hook, perfect), store, model, ActivationScaler(), eval_cfg, exclude_special_tokens=perfect
        )
        results[perfect] = metrics
    good, zero = results[True], results[False]
    perf, behav = good["model_performance_preservation"], good["model_behavior_preservation"]
    for value in [*perf.values(), *behav.values()]:
        assert math.isfinite(value)
    assert perf["ce_loss_without_sae"] > 1.0  # a random model: loss near log(512) ~ 6.2
    assert perf["ce_loss_with_sae"] == pytest.approx(perf["ce_loss_without_sae"], abs=1e-4)
    assert perf["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert behav["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert behav["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert behav["kl_div_with_ablation"] > 1e-4
    assert good["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    zperf, zbehav = zero["model_performance_preservation"], zero["model_behavior_preservation"]
    assert zperf["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
    assert zbehav["kl_div_score"] == pytest.approx(0.0, abs=1e-4)
    assert zperf["ce_loss_with_sae"] == pytest.approx(zperf["ce_loss_with_ablation"], rel=1e-6)
    # A random model: ablation need not raise the loss, but it must change it.
    assert zperf["ce_loss_with_ablation"] != pytest.approx(zperf["ce_loss_without_sae"], abs=1e-4)
