"""SAELens' own ``HookedSAETransformer`` tests, ported to ``HookedT5Gemma2`` on the tiny stand-in.

Port of ``tests/analysis/test_hooked_sae_transformer.py`` from decoderesearch/SAELens at commit
0decaea1173c819cdc375caf66c2dc19d4ec9f06 (the version with ``_SAEWrapper`` and transcoders;
its ``hooked_sae_transformer.py`` is the one in the installed sae-lens 6.54.12). Each ported
test keeps its name and its assertions. What changed:

- The model is the 2-layer random T5Gemma 2 stand-in (``convention="prefix_lm"``, the default),
  not TinyStories. The ``hooked_sae`` fixture runs over an encoder site, a decoder site, a
  decoder ``hook_z`` site (SAELens' ``reshape_activations="hook_z"``), the d_mlp-wide
  ``mlp.hook_post`` and a transcoder (``decoder_blocks.1.mlp.hook_in -> mlp.hook_out``). Where
  SAELens looks up the wrapper at ``hook_name`` the port looks at the output hook
  (``hook_name_out`` for a transcoder), as SAELens' own transcoder tests do.
- ``test_HookedSAETransformer_works_with_hook_z_saes`` and ``..._adds_hook_in_to_mlp`` load GPT-2
  from the hub in SAELens; here they run on the stand-in (both stacks).
- The chained-transcoder and multi-SAE gradient tests use layers 0-1 of both stacks (the
  stand-in has 2 layers, not 3).
- An autouse fixture resets SAEs and hooks after every test, so one failure does not cascade.

Left out: nothing of that file. Not in it, so added at the end (marked "not in SAELens"):
``exclude_special_tokens`` on encoder and decoder sites (checked against SAELens' batch mask
under the position contract, and in ``generate``), ``reset_saes_end=False``, transcoder outputs
against a hand computation, and unknown keywords raising through ``run_with_saes``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer, _SAEWrapper, get_deep_attr
from sae_lens.saes.sae import SAE, SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint

from sae_lens_t5gemma import HookedT5Gemma2, load_t5gemma2

prompt = "Hello World!"

# name -> (hook_name, hook_name_out or None)
SITES = {
    "encoder_resid_pre": ("encoder_blocks.0.hook_resid_pre", None),
    "decoder_mlp_out": ("decoder_blocks.0.mlp.hook_out", None),
    "decoder_hook_z": ("decoder_blocks.0.self_attn.hook_z", None),
    "encoder_mlp_post": ("encoder_blocks.0.mlp.hook_post", None),
    "transcoder": ("decoder_blocks.1.mlp.hook_in", "decoder_blocks.1.mlp.hook_out"),
}


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    """SAELens' tolerance in float32; in bfloat16/float16 two units in the last place of the
    model's dtype (an SAE with its error term computes in float32, and its output is rounded
    back to the model's dtype, which can move a value by one unit)."""
    ulp = 0.0 if a.dtype == torch.float32 else 2 * torch.finfo(a.dtype).eps
    torch.testing.assert_close(a, b, atol=max(atol, ulp), rtol=max(1e-5, ulp))


def assert_not_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert not torch.allclose(a, b, atol=atol, rtol=1e-5)


def by_contract(sae: SAE, a: torch.Tensor) -> torch.Tensor:
    """What the package's dtype contract splices in: the SAE computes in float32, the model
    receives its own dtype."""
    return sae.decode(sae.encode(a.float())).to(a.dtype)


def get_logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and len(output) == 2:
        return output[0]
    raise ValueError(f"Unexpected output type: {type(output)}")


def out_hook(sae: SAE) -> str:
    """Where the wrapper sits: ``hook_name_out`` for a transcoder, else ``hook_name``."""
    return sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])
def model(tiny_model_dir, request) -> HookedT5Gemma2:
    """The stand-in in each dtype; the SAEs stay float32 (the package's dtype contract)."""
    return load_t5gemma2(tiny_model_dir, dtype=request.param, device=DEVICE)


@pytest.fixture(autouse=True)
def _clean(model):
    yield
    model.reset_saes()
    model.remove_all_hook_fns(including_permanent=True)


@pytest.fixture(scope="module")
def original_logits(model) -> torch.Tensor:
    return model(prompt)


def width(model: HookedT5Gemma2, hook_name: str) -> int:
    if hook_name.endswith("hook_z"):
        return model.cfg.n_heads * model.cfg.d_head
    if hook_name.endswith("mlp.hook_post"):
        return model.cfg.d_mlp
    return model.cfg.d_model


def get_hooked_sae(model: HookedT5Gemma2, act_name: str, act_name_out: str | None = None) -> SAE:
    d_in = width(model, act_name)
    metadata = SAEMetadata(model_name="stand-in", hook_name=act_name, hook_head_index=None, prepend_bos=True)
    if act_name_out is not None:
        metadata.hook_name_out = act_name_out
        cfg = TranscoderConfig(
            d_in=d_in,
            d_sae=d_in * 2,
            d_out=width(model, act_name_out),
            apply_b_dec_to_input=False,
            device=DEVICE,
            metadata=metadata,
        )
        return Transcoder(cfg)
    sae_cfg = StandardSAEConfig(
        d_in=d_in,
        d_sae=d_in * 2,
        dtype="float32",
        device=DEVICE,
        reshape_activations="hook_z" if act_name.endswith("hook_z") else "none",
        metadata=metadata,
    )
    return StandardSAE(sae_cfg)


@pytest.fixture(scope="module", params=list(SITES), ids=list(SITES))
def hooked_sae(model, request) -> SAE:
    return get_hooked_sae(model, *SITES[request.param])


@pytest.fixture(scope="module")
def list_of_hooked_saes(model) -> list[SAE]:
    return [get_hooked_sae(model, *spec) for spec in SITES.values()]


def test_model_with_no_saes_matches_original_model(model, original_logits):
    assert len(model._acts_to_saes) == 0
    logits = model(prompt)
    assert_close(original_logits, logits)


def test_model_with_saes_does_not_match_original_model(model, hooked_sae, original_logits):
    assert len(model._acts_to_saes) == 0
    model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == 1
    logits_with_saes = model(prompt)
    assert_not_close(original_logits, logits_with_saes)
    model.reset_saes()


def test_add_sae(model, hooked_sae):
    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == hooked_sae
    wrapper = get_deep_attr(model, out_hook(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == hooked_sae
    model.reset_saes()


def test_add_sae_overwrites_prev_sae(model, hooked_sae):
    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == hooked_sae
    wrapper = get_deep_attr(model, out_hook(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == hooked_sae

    second_hooked_sae = SAE.from_dict(hooked_sae.cfg.to_dict())
    model.add_sae(second_hooked_sae)
    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == second_hooked_sae
    wrapper = get_deep_attr(model, out_hook(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == second_hooked_sae
    model.reset_saes()


def test_reset_sae_removes_sae_by_default(model, hooked_sae):
    act_name = hooked_sae.cfg.metadata.hook_name
    model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == hooked_sae
    wrapper = get_deep_attr(model, out_hook(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == hooked_sae
    model._reset_sae(act_name)
    assert len(model._acts_to_saes) == 0
    assert isinstance(get_deep_attr(model, act_name), HookPoint)
    assert isinstance(get_deep_attr(model, out_hook(hooked_sae)), HookPoint)
    model.reset_saes()


def test_reset_sae_replaces_sae(model, hooked_sae):
    act_name = hooked_sae.cfg.metadata.hook_name
    second_hooked_sae = SAE.from_dict(hooked_sae.cfg.to_dict())

    model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == 1
    assert model._acts_to_saes[act_name].sae == hooked_sae
    wrapper = get_deep_attr(model, out_hook(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == hooked_sae
    model._reset_sae(act_name, _SAEWrapper(second_hooked_sae))
    assert len(model._acts_to_saes) == 1
    wrapper = get_deep_attr(model, out_hook(hooked_sae))
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.sae == second_hooked_sae
    model.reset_saes()


def test_reset_saes_removes_all_saes_by_default(model, list_of_hooked_saes):
    act_names = [hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes]
    for hooked_sae in list_of_hooked_saes:
        model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == len(act_names)
    for act_name, hooked_sae in zip(act_names, list_of_hooked_saes, strict=True):
        assert model._acts_to_saes[act_name].sae == hooked_sae
        wrapper = get_deep_attr(model, out_hook(hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == hooked_sae
    model.reset_saes()
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_hook(hooked_sae)), HookPoint)
    model.reset_saes()


def test_reset_saes_with_specific_act_names(model, list_of_hooked_saes):
    act_names = [hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes]
    for hooked_sae in list_of_hooked_saes:
        model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == len(act_names)

    model.reset_saes(act_names[0])
    assert len(model._acts_to_saes) == len(act_names) - 1
    assert act_names[0] not in model._acts_to_saes
    assert isinstance(get_deep_attr(model, act_names[0]), HookPoint)
    for act_name in act_names[1:]:
        assert act_name in model._acts_to_saes
    model.reset_saes()


def test_saes_context_manager_removes_saes_after(model, list_of_hooked_saes):
    act_names = [hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes]
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_hook(hooked_sae)), HookPoint)
    with model.saes(saes=list_of_hooked_saes):
        for act_name, hooked_sae in zip(act_names, list_of_hooked_saes, strict=True):
            assert model._acts_to_saes[act_name].sae == hooked_sae
            wrapper = get_deep_attr(model, out_hook(hooked_sae))
            assert isinstance(wrapper, _SAEWrapper)
            assert wrapper.sae == hooked_sae
        model.forward(prompt)
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_hook(hooked_sae)), HookPoint)
    model.reset_saes()


def test_saes_context_manager_restores_previous_sae_state(model, list_of_hooked_saes):
    act_names = [hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes]
    prev_hooked_saes = list_of_hooked_saes
    for prev_hooked_sae in prev_hooked_saes:
        model.add_sae(prev_hooked_sae)
        wrapper = get_deep_attr(model, out_hook(prev_hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == prev_hooked_sae
    assert len(model._acts_to_saes) == len(prev_hooked_saes)

    hooked_saes = [get_hooked_sae(model, *spec) for spec in SITES.values()]
    with model.saes(saes=hooked_saes):
        for act_name, hooked_sae in zip(act_names, hooked_saes, strict=True):
            assert model._acts_to_saes[act_name].sae == hooked_sae
            wrapper = get_deep_attr(model, out_hook(hooked_sae))
            assert isinstance(wrapper, _SAEWrapper)
            assert wrapper.sae == hooked_sae
        model.forward(prompt)

    assert len(model._acts_to_saes) == len(prev_hooked_saes)
    for prev_hooked_sae in prev_hooked_saes:
        wrapper = get_deep_attr(model, out_hook(prev_hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == prev_hooked_sae
    model.reset_saes()


def test_saes_context_manager_run_with_cache(model, list_of_hooked_saes):
    act_names = [hooked_sae.cfg.metadata.hook_name for hooked_sae in list_of_hooked_saes]
    assert len(model._acts_to_saes) == 0
    with model.saes(saes=list_of_hooked_saes):
        for act_name, hooked_sae in zip(act_names, list_of_hooked_saes, strict=True):
            assert model._acts_to_saes[act_name].sae == hooked_sae
            wrapper = get_deep_attr(model, out_hook(hooked_sae))
            assert isinstance(wrapper, _SAEWrapper)
            assert wrapper.sae == hooked_sae
        model.run_with_cache(prompt)
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_hook(hooked_sae)), HookPoint)
    model.reset_saes()


def test_run_with_saes(model, list_of_hooked_saes, original_logits):
    assert len(model._acts_to_saes) == 0
    logits_with_saes = model.run_with_saes(prompt, saes=list_of_hooked_saes)
    assert_not_close(logits_with_saes, original_logits)
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_hook(hooked_sae)), HookPoint)
    model.reset_saes()


def test_run_with_cache(model, list_of_hooked_saes, original_logits):
    for hooked_sae in list_of_hooked_saes:
        model.add_sae(hooked_sae)
    assert len(model._acts_to_saes) == len(list_of_hooked_saes)
    logits_with_saes, cache = model.run_with_cache(prompt)
    assert_not_close(logits_with_saes, original_logits)
    assert isinstance(cache, ActivationCache)
    for hooked_sae in list_of_hooked_saes:
        assert out_hook(hooked_sae) + ".hook_sae_acts_post" in cache
        wrapper = get_deep_attr(model, out_hook(hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == hooked_sae
    model.reset_saes()


def test_run_with_cache_with_saes(model, list_of_hooked_saes, original_logits):
    logits_with_saes, cache = model.run_with_cache_with_saes(prompt, saes=list_of_hooked_saes)
    assert_not_close(logits_with_saes, original_logits)
    assert isinstance(cache, ActivationCache)
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert out_hook(hooked_sae) + ".hook_sae_acts_post" in cache
        assert isinstance(get_deep_attr(model, out_hook(hooked_sae)), HookPoint)
    model.reset_saes()


def test_run_with_hooks(model, list_of_hooked_saes, original_logits):
    c = Counter()
    for hooked_sae in list_of_hooked_saes:
        model.add_sae(hooked_sae)
    logits_with_saes = model.run_with_hooks(
        prompt,
        fwd_hooks=[(out_hook(sae) + ".hook_sae_acts_post", c.inc) for sae in list_of_hooked_saes],
    )
    assert_not_close(logits_with_saes, original_logits)
    for hooked_sae in list_of_hooked_saes:
        wrapper = get_deep_attr(model, out_hook(hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.sae == hooked_sae
    assert c.count == len(list_of_hooked_saes)
    model.reset_saes()
    model.remove_all_hook_fns(including_permanent=True)


def test_run_with_hooks_with_saes(model, list_of_hooked_saes, original_logits):
    c = Counter()
    logits_with_saes = model.run_with_hooks_with_saes(
        prompt,
        saes=list_of_hooked_saes,
        fwd_hooks=[(out_hook(sae) + ".hook_sae_acts_post", c.inc) for sae in list_of_hooked_saes],
    )
    assert_not_close(logits_with_saes, original_logits)
    assert c.count == len(list_of_hooked_saes)
    assert len(model._acts_to_saes) == 0
    for hooked_sae in list_of_hooked_saes:
        assert isinstance(get_deep_attr(model, out_hook(hooked_sae)), HookPoint)
    model.reset_saes()
    model.remove_all_hook_fns(including_permanent=True)


def test_model_with_use_error_term_saes_matches_original_model(model, hooked_sae, original_logits):
    assert len(model._acts_to_saes) == 0
    model.add_sae(hooked_sae, use_error_term=True)
    assert len(model._acts_to_saes) == 1
    logits_with_saes = model(prompt)
    model.reset_saes()
    assert_close(original_logits, logits_with_saes, atol=1e-4)


def test_add_sae_with_use_error_term(model, hooked_sae):
    act_name = out_hook(hooked_sae)
    model.add_sae(hooked_sae, use_error_term=True)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is True

    model.add_sae(hooked_sae, use_error_term=False)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is False

    model.add_sae(hooked_sae, use_error_term=None)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is False
    model.reset_saes()


def test_add_sae_respects_sae_use_error_term_setting(model, hooked_sae):
    act_name = out_hook(hooked_sae)
    hooked_sae._use_error_term = True
    model.add_sae(hooked_sae, use_error_term=None)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is True
    model.reset_saes()

    model.add_sae(hooked_sae, use_error_term=False)
    wrapper = get_deep_attr(model, act_name)
    assert isinstance(wrapper, _SAEWrapper)
    assert wrapper.use_error_term is False
    model.reset_saes()
    hooked_sae._use_error_term = False


def test_saes_context_manager_with_use_error_term(model, hooked_sae):
    original_use_error_term = hooked_sae.use_error_term
    with model.saes(saes=[hooked_sae], use_error_term=True):
        wrapper = get_deep_attr(model, out_hook(hooked_sae))
        assert isinstance(wrapper, _SAEWrapper)
        assert wrapper.use_error_term is True
    assert hooked_sae.use_error_term == original_use_error_term
    assert len(model._acts_to_saes) == 0


def test_run_with_saes_with_use_error_term(model, hooked_sae):
    original_use_error_term = hooked_sae.use_error_term
    model.run_with_saes(prompt, saes=[hooked_sae], use_error_term=True)
    assert hooked_sae.use_error_term == original_use_error_term
    assert len(model._acts_to_saes) == 0


def test_run_with_cache_with_saes_with_use_error_term(model, hooked_sae):
    original_use_error_term = hooked_sae.use_error_term
    _, cache = model.run_with_cache_with_saes(prompt, saes=[hooked_sae], use_error_term=True)
    assert hooked_sae.use_error_term == original_use_error_term
    assert len(model._acts_to_saes) == 0
    assert out_hook(hooked_sae) + ".hook_sae_acts_post" in cache


def test_use_error_term_restoration_after_exception(model, hooked_sae):
    original_use_error_term = hooked_sae.use_error_term
    with (
        pytest.raises(RuntimeError, match="Test exception"),
        model.saes(saes=[hooked_sae], use_error_term=True),
    ):
        raise RuntimeError("Test exception")
    assert hooked_sae.use_error_term == original_use_error_term
    assert len(model._acts_to_saes) == 0


def test_add_sae_with_use_error_term_true(model, hooked_sae):
    output_without_sae = get_logits(model(prompt))
    model.add_sae(hooked_sae, use_error_term=True)
    output_with_sae = get_logits(model(prompt))
    assert_close(output_without_sae, output_with_sae, atol=1e-4)
    model.reset_saes()


def test_run_with_saes_use_error_term_true(model, hooked_sae):
    output_without_sae = get_logits(model(prompt))
    output_with_sae = get_logits(model.run_with_saes(prompt, saes=[hooked_sae], use_error_term=True))
    assert_close(output_without_sae, output_with_sae, atol=1e-4)


def test_run_with_cache_with_saes_use_error_term_true(model, hooked_sae):
    output_without_sae, _ = model.run_with_cache(prompt)
    output_with_sae, cache_with_sae = model.run_with_cache_with_saes(
        prompt, saes=[hooked_sae], use_error_term=True
    )
    assert_close(get_logits(output_without_sae), get_logits(output_with_sae), atol=1e-4)
    assert out_hook(hooked_sae) + ".hook_sae_acts_post" in cache_with_sae


def test_add_sae_with_use_error_term_false(model, hooked_sae):
    output_without_sae = get_logits(model(prompt))
    model.add_sae(hooked_sae, use_error_term=False)
    output_with_sae = get_logits(model(prompt))
    assert_not_close(output_without_sae, output_with_sae, atol=1e-5)
    model.reset_saes()


def test_run_with_saes_use_error_term_false(model, hooked_sae):
    output_without_sae = get_logits(model(prompt))
    output_with_sae = get_logits(model.run_with_saes(prompt, saes=[hooked_sae], use_error_term=False))
    assert_not_close(output_without_sae, output_with_sae, atol=1e-4)


def test_run_with_cache_with_saes_use_error_term_false(model, hooked_sae):
    output_without_sae, cache_without_sae = model.run_with_cache(prompt)
    output_with_sae, cache_with_sae = model.run_with_cache_with_saes(
        prompt, saes=[hooked_sae], use_error_term=False
    )
    assert_not_close(get_logits(output_without_sae), get_logits(output_with_sae), atol=1e-4)
    assert out_hook(hooked_sae) + ".hook_sae_acts_post" in cache_with_sae
    assert_not_close(
        cache_without_sae[out_hook(hooked_sae)],
        cache_with_sae[out_hook(hooked_sae) + ".hook_sae_output"],
        atol=1e-5,
    )


def test_HookedSAETransformer_works_with_hook_z_saes(model):
    sae = get_hooked_sae(model, "encoder_blocks.1.attn.hook_z")
    logits_sans_sae = model(prompt)
    logits, cache = model.run_with_cache_with_saes(prompt, saes=[sae], use_error_term=False)
    assert_not_close(logits, logits_sans_sae, atol=1e-4)
    n = model.to_tokens(prompt).shape[1]
    expected_shape = (1, n, model.cfg.n_heads, model.cfg.d_head)  # due to hook_z reshaping
    assert cache[sae.cfg.metadata.hook_name + ".hook_sae_output"].shape == expected_shape


def test_HookedSAETransformer_adds_hook_in_to_mlp(model):
    _, cache = model.run_with_cache(prompt)
    n = model.to_tokens(prompt).shape[1]
    for stack in ("encoder", "decoder"):
        for layer in range(model.cfg.n_layers):
            assert f"{stack}_blocks.{layer}.mlp.hook_in" in cache
            assert cache[f"{stack}_blocks.{layer}.mlp.hook_in"].shape == (1, n, model.cfg.d_model)


# ============================================================================
# Transcoder tests (SAELens': blocks.0.mlp.hook_in -> blocks.0.hook_mlp_out)
# ============================================================================


def get_transcoder(model: HookedT5Gemma2, layer: int = 0, stack: str = "encoder") -> Transcoder:
    cfg = TranscoderConfig(
        d_in=model.cfg.d_model,
        d_sae=model.cfg.d_model * 2,
        d_out=model.cfg.d_model,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            hook_name=f"{stack}_blocks.{layer}.mlp.hook_in",
            hook_name_out=f"{stack}_blocks.{layer}.mlp.hook_out",
        ),
    )
    return Transcoder(cfg)


@pytest.fixture(scope="module")
def transcoder(model) -> Transcoder:
    return get_transcoder(model)


def test_add_transcoder_changes_output(model, transcoder, original_logits):
    model.add_sae(transcoder)
    assert len(model._acts_to_saes) == 1
    logits_with_transcoder = model(prompt)
    assert_not_close(original_logits, logits_with_transcoder)
    model.reset_saes()


def test_transcoder_with_error_term_preserves_output(model, transcoder, original_logits):
    model.add_sae(transcoder, use_error_term=True)
    assert len(model._acts_to_saes) == 1
    logits_with_transcoder = model(prompt)
    model.reset_saes()
    assert_close(original_logits, logits_with_transcoder, atol=1e-4)


def test_transcoder_reset_removes_transcoder(model, transcoder):
    act_name = transcoder.cfg.metadata.hook_name
    model.add_sae(transcoder)
    assert len(model._acts_to_saes) == 1
    assert act_name in model._acts_to_saes
    model.reset_saes()
    assert len(model._acts_to_saes) == 0
    assert isinstance(get_deep_attr(model, act_name), HookPoint)
    assert get_deep_attr(model, act_name).fwd_hooks == []  # the capture hook is gone too


def test_transcoder_context_manager(model, transcoder, original_logits):
    act_name = transcoder.cfg.metadata.hook_name
    assert len(model._acts_to_saes) == 0
    with model.saes(saes=[transcoder]):
        assert len(model._acts_to_saes) == 1
        assert act_name in model._acts_to_saes
        logits_with_transcoder = model(prompt)
        assert_not_close(original_logits, logits_with_transcoder)
    assert len(model._acts_to_saes) == 0
    assert isinstance(get_deep_attr(model, act_name), HookPoint)


def test_transcoder_context_manager_with_error_term(model, transcoder, original_logits):
    with model.saes(saes=[transcoder], use_error_term=True):
        logits_with_transcoder = model(prompt)
        assert_close(original_logits, logits_with_transcoder, atol=1e-4)
    assert len(model._acts_to_saes) == 0


def test_transcoder_run_with_cache(model, transcoder, original_logits):
    output_hook = transcoder.cfg.metadata.hook_name_out
    logits_with_transcoder, cache = model.run_with_cache_with_saes(prompt, saes=[transcoder])
    assert_not_close(original_logits, logits_with_transcoder)
    assert isinstance(cache, ActivationCache)
    assert output_hook + ".hook_sae_acts_post" in cache
    assert len(model._acts_to_saes) == 0


def test_mixed_sae_and_transcoder(model, transcoder, original_logits):
    sae = get_hooked_sae(model, "encoder_blocks.0.hook_resid_pre")
    model.add_sae(sae)
    model.add_sae(transcoder)
    assert len(model._acts_to_saes) == 2
    assert sae.cfg.metadata.hook_name in model._acts_to_saes
    assert transcoder.cfg.metadata.hook_name in model._acts_to_saes
    logits = model(prompt)
    assert_not_close(original_logits, logits)
    model.reset_saes()
    assert len(model._acts_to_saes) == 0


def test_run_with_saes_with_transcoder(model, transcoder, original_logits):
    logits = model.run_with_saes(prompt, saes=[transcoder])
    assert_not_close(original_logits, logits)
    assert len(model._acts_to_saes) == 0


@pytest.mark.parametrize("use_error_term", [False, True])
def test_transcoder_gradients_flow(model, transcoder, use_error_term):
    model.add_sae(transcoder, use_error_term=use_error_term)
    output = model(prompt)
    output.sum().backward()
    assert transcoder.W_enc.grad is not None and transcoder.W_dec.grad is not None
    assert transcoder.W_enc.grad.abs().sum() > 0
    assert transcoder.W_dec.grad.abs().sum() > 0
    transcoder.zero_grad()
    model.reset_saes()


def test_multiple_chained_transcoders_get_gradients(model):
    transcoders = [
        get_transcoder(model, layer, stack) for stack in ("encoder", "decoder") for layer in range(2)
    ]
    for tc in transcoders:
        model.add_sae(tc)
    assert len(model._acts_to_saes) == 4
    model(prompt).sum().backward()
    for i, tc in enumerate(transcoders):
        assert tc.W_enc.grad is not None and tc.W_enc.grad.abs().sum() > 0, f"Transcoder {i} W_enc"
        assert tc.W_dec.grad is not None and tc.W_dec.grad.abs().sum() > 0, f"Transcoder {i} W_dec"
    model.reset_saes()


def test_multiple_saes_get_gradients(model):
    hook_names = [
        "encoder_blocks.0.mlp.hook_out",
        "encoder_blocks.1.mlp.hook_out",
        "decoder_blocks.1.hook_resid_pre",
    ]
    saes = [
        StandardSAE(
            StandardSAEConfig(
                d_in=model.cfg.d_model, d_sae=model.cfg.d_model * 2, metadata=SAEMetadata(hook_name=h)
            )
        )
        for h in hook_names
    ]
    for sae in saes:
        model.add_sae(sae)
    assert len(model._acts_to_saes) == 3
    model(prompt).sum().backward()
    for i, sae in enumerate(saes):
        assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0, f"SAE {i} W_enc"
        assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0, f"SAE {i} W_dec"
    model.reset_saes()


# ============================================================================
# Not in SAELens: exclude_special_tokens, reset_saes_end, transcoder numbers, keywords
# ============================================================================

# A packed row with BOS, EOS and PAD on both sides of the prefix_lm split (p = 6 of 12).
TOKENS = torch.tensor(
    [[2, 40, 41, 1, 42, 43, 44, 2, 45, 1, 0, 46], [2, 50, 0, 51, 52, 53, 1, 54, 2, 55, 56, 57]]
)


def strong_sae(model: HookedT5Gemma2, hook_name: str) -> StandardSAE:
    torch.manual_seed(3)
    sae = get_hooked_sae(model, hook_name)
    with torch.no_grad():
        sae.b_enc.uniform_(0.1, 0.3)
        sae.W_dec.mul_(5.0)
    return sae


def expected_bypass(model: HookedT5Gemma2, tokens: torch.Tensor, stack: str, ids: list[int]) -> torch.Tensor:
    """Positions that keep the original activation: SAELens' batch mask on the covered positions,
    the decoder's BOS-only state (it read BOS, special) and every position the stack does not compute."""
    batch_mask = HookedSAETransformer._compute_exclusion_mask(model, tokens, ids)
    bypass = batch_mask | ~model.covered_mask(tokens, stack)
    if stack == "decoder":
        p = model.split_point(tokens.shape[1])
        bypass[:, p - 1] = model.hf_model.config.decoder.bos_token_id in ids
    return bypass


@pytest.mark.parametrize(
    "hook_name", ["encoder_blocks.0.hook_resid_post", "decoder_blocks.0.self_attn.hook_z"]
)
@pytest.mark.parametrize("exclude", [True, [1, 2]])
def test_exclude_special_tokens_bypasses_the_sae_at_special_positions(model, hook_name, exclude):
    sae = strong_sae(model, hook_name)
    stack = hook_name.split("_")[0]
    ids = [0, 1, 2] if exclude is True else exclude
    with torch.no_grad():
        _, clean = model.run_with_cache(TOKENS, names_filter=[hook_name])
        logits, cache = model.run_with_cache_with_saes(
            TOKENS, saes=[sae], exclude_special_tokens=exclude, names_filter=[f"{hook_name}.hook_sae_output"]
        )
        x = clean[hook_name]
        recon = by_contract(sae, x)
        bypass = expected_bypass(model, TOKENS, stack, ids)
        expected = torch.where(bypass[:, :, None, None] if x.ndim == 4 else bypass[:, :, None], x, recon)
        by_hand = model.run_with_hooks(TOKENS, fwd_hooks=[(hook_name, lambda a, hook: torch.where(
            bypass[:, :, None, None] if a.ndim == 4 else bypass[:, :, None], a, by_contract(sae, a)))])  # fmt: skip
        plain = model.run_with_saes(TOKENS, saes=[sae])
    assert bypass.sum() >= 9 and (~bypass).sum() >= 6  # both kinds of positions are exercised
    torch.testing.assert_close(cache[f"{hook_name}.hook_sae_output"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-3)
    assert model._splice_state()["mask_handles"] == []  # no mask hooks left once the SAE is gone


def test_exclude_special_tokens_in_generate_and_with_explicit_decoder_ids(model):
    sae = strong_sae(model, "decoder_blocks.1.hook_resid_pre")
    every_id = list(range(model.cfg.d_vocab))
    with torch.no_grad():
        clean = model.generate(TOKENS, max_new_tokens=6)
        bypassed = model.run_with_saes(TOKENS, saes=[sae], exclude_special_tokens=every_id)
        with model.saes([sae], exclude_special_tokens=every_id):
            gen_bypassed = model.generate(TOKENS, max_new_tokens=6)
            explicit = model(TOKENS, decoder_input_ids=TOKENS[:, :5])
        with model.saes([sae]):
            gen_spliced = model.generate(TOKENS, max_new_tokens=6)
        explicit_clean = model(TOKENS, decoder_input_ids=TOKENS[:, :5])
    assert torch.equal(gen_bypassed, clean)  # every decoder step read an excluded id
    assert not torch.equal(gen_spliced, clean)
    torch.testing.assert_close(bypassed, model(TOKENS), rtol=0, atol=0)
    torch.testing.assert_close(explicit, explicit_clean, rtol=0, atol=0)


def test_reset_saes_end_false_keeps_saes_attached(model):
    sae, tc = strong_sae(model, "encoder_blocks.1.hook_resid_post"), get_transcoder(model, 1, "decoder")
    with torch.no_grad():
        first = model.run_with_saes(TOKENS, saes=[sae, tc], reset_saes_end=False, exclude_special_tokens=True)
        assert set(model._acts_to_saes) == {
            "encoder_blocks.1.hook_resid_post",
            "decoder_blocks.1.mlp.hook_in",
        }
        assert model._acts_to_saes["encoder_blocks.1.hook_resid_post"].exclude_special_tokens is True
        again = model(TOKENS)
        _, cache = model.run_with_cache_with_saes(TOKENS, saes=[], reset_saes_end=False)
    assert torch.equal(first, again)
    assert "decoder_blocks.1.mlp.hook_out.hook_sae_acts_post" in cache


@pytest.mark.parametrize("use_error_term", [False, True])
def test_transcoder_output_equals_hand_computation(model, use_error_term):
    tc = get_transcoder(model, 1, "decoder")
    with torch.no_grad():
        tc.b_enc.uniform_(0.0, 0.2)
    seen = {}

    def read(x, hook):
        seen["x"] = x

    def write(y, hook):
        recon = tc.decode(tc.encode(seen["x"].float()))
        return (recon + (y.float() - recon) if use_error_term else recon).to(y.dtype)

    with torch.no_grad():
        spliced = model.run_with_saes(TOKENS, saes=[tc], use_error_term=use_error_term)
        by_hand = model.run_with_hooks(
            TOKENS,
            fwd_hooks=[("decoder_blocks.1.mlp.hook_in", read), ("decoder_blocks.1.mlp.hook_out", write)],
        )
        clean = model(TOKENS)
    torch.testing.assert_close(spliced, by_hand, rtol=1e-5, atol=1e-5)
    assert torch.allclose(spliced, clean, atol=1e-4) is use_error_term


def test_transcoder_refusals(model):
    cross = get_transcoder(model)
    cross.cfg.metadata.hook_name_out = "decoder_blocks.0.mlp.hook_out"
    with pytest.raises(ValueError, match=r"^Transcoder reads encoder_blocks.0.mlp.hook_in \(encoder\) and writes "
                       r"decoder_blocks.0.mlp.hook_out \(decoder\): both hooks must be in the same stack.$"):  # fmt: skip
        model.add_sae(cross)
    wide = get_transcoder(model)
    wide.cfg.metadata.hook_name_out = "encoder_blocks.0.mlp.hook_post"
    with pytest.raises(ValueError, match=r"^SAE d_out=64 does not fit hook encoder_blocks.0.mlp.hook_post"):
        model.add_sae(wide)
    assert model._acts_to_saes == {}


def test_unknown_keyword_raises_through_run_with_saes(model):
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['bogus_keyword'\]"):
        model.run_with_saes(prompt, saes=[get_transcoder(model)], bogus_keyword=123)
    assert model._acts_to_saes == {}
