"""The T5Gemma 2 family (270m, 1b, 4b): the size table, the stand-ins, the refusals, and the work on each.

Covers:

- ``sizes.SIZES``: hub ids, the Gemma 3 origins TransformerLens knows, the Gemma Scope 2
  releases SAELens names (checked against SAELens' own YAML), and the real dimensions
  (checked against TransformerLens' official Gemma 3 recipes);
- ``gemma_scope.gemma3_tl_config`` on the real Gemma 3 configs of 270M, 1B and 4B equals
  TransformerLens' own config key by key; fields the recipe cannot represent are refused;
- ``synthetic.t5gemma2_config(size=...)``: the stand-in keeps every structural field of the
  real size and shrinks the rest; the default stand-in is unchanged;
- the load-path check: a T5Gemma 2 text-config field the package does not handle is refused
  by name (wrapping and ``load_t5gemma2``);
- on the 270m, 1b and 4b stand-ins: hooks equal transformers' activations at every module site,
  logits equal; an SAE trains through SAELens' runner and ``evaluate_sae`` scores it;
- stand-in hubs for 1b and 4b under the real ids: T5Gemma 2, Gemma 3 (TransformerLens with the
  size's RoPE scaling, equal to transformers) and a Gemma Scope 2 SAE loaded by release name.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from sae_lens_t5gemma import training
from sae_lens_t5gemma._compat import read_gemma_scope_shapes_from_cache
from sae_lens_t5gemma.analysis.evaluation import evaluate_sae
from sae_lens_t5gemma.loading import gemma_scope as gemma_scope
from sae_lens_t5gemma.model import sites as sites
from sae_lens_t5gemma.model import sizes as sizes
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2, load_t5gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic

# The sizes with a structure other than the default stand-in's.
BIG = ("1b", "4b")


# ------------------------------------------------------------------------------- the table


def test_table_ids_and_releases_match_sae_lens_and_transformer_lens():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

    releases = get_pretrained_saes_directory()  # SAELens' own pretrained_saes.yaml
    assert list(sizes.SIZES) == ["270m", "1b", "4b"]
    assert [s.t5gemma2_id for s in sizes.SIZES.values()] == [
        "google/t5gemma-2-270m-270m",
        "google/t5gemma-2-1b-1b",
        "google/t5gemma-2-4b-4b",
    ]
    assert [s.gemma3_id for s in sizes.SIZES.values()] == [
        "google/gemma-3-270m",
        "google/gemma-3-1b-pt",
        "google/gemma-3-4b-pt",
    ]
    for spec in sizes.SIZES.values():
        assert spec.gemma3_id in OFFICIAL_MODEL_NAMES
        assert set(spec.gemma_scope_releases) == {"attn_out", "resid_post", "mlp_out"}
        for site, release in spec.gemma_scope_releases.items():
            entry = releases[release]
            # Gemma Scope 2 was trained on exactly this Gemma 3 checkpoint, in this repo.
            assert (entry.model, entry.repo_id, entry.conversion_func) == (
                spec.gemma3_id,
                spec.gemma_scope_repo,
                "gemma_3",
            )
            n_layers = spec.gemma3_text.num_hidden_layers
            layers = {int(sae_id.split("_")[1]) for sae_id in entry.saes_map}
            assert layers == set(range(n_layers)), release  # every layer, as "-all" says
            assert all(path.startswith(f"{site}_all/") for path in entry.saes_map.values())
    assert dict(synthetic.GEMMA_SCOPE_RELEASES) == dict(sizes.SIZES["270m"].gemma_scope_releases)
    with pytest.raises(
        ValueError, match=r"Unknown T5Gemma 2 size '2b': expected one of \['1b', '270m', '4b'\]"
    ):
        sizes.get_size("2b")


@pytest.mark.parametrize("size", list(sizes.SIZES))
def test_real_dims_equal_transformer_lens_recipe(size):
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    spec = sizes.SIZES[size]
    tl = convert_hf_model_config(spec.gemma3_id)
    g3 = spec.gemma3_text
    assert (g3.hidden_size, g3.intermediate_size, g3.num_hidden_layers) == (
        tl["d_model"],
        tl["d_mlp"],
        tl["n_layers"],
    )
    assert (g3.num_attention_heads, g3.num_key_value_heads, g3.head_dim) == (
        tl["n_heads"],
        tl["n_key_value_heads"],
        tl["d_head"],
    )
    assert (g3.sliding_window, g3.vocab_size, g3.rms_norm_eps) == (
        tl["window_size"],
        tl["d_vocab"],
        tl["eps"],
    )
    assert (g3.rope_theta_full, g3.rope_theta_sliding) == (tl["rotary_base"], tl["rotary_base_local"])
    assert (g3.rope_linear_factor_full or 1.0) == tl.get("rotary_scaling_factor", 1.0)
    assert [t == "full_attention" for t in g3.layer_types] == [t == "global" for t in tl["attn_types"]]
    assert g3.query_pre_attn_scalar**0.5 == 16.0 == tl["d_head"] ** 0.5  # TL scales by d_head
    # T5Gemma 2 keeps Gemma 3's text dimensions; it differs in RoPE scaling (270m: the hub
    # config; 1b: a guess) and 4b's vocabulary (a guess), see docs/family.md.
    t5 = spec.t5gemma2_text
    assert t5.rope_linear_factor_full == 8.0
    assert t5.vocab_size == 262144
    same = {"rope_linear_factor_full", "vocab_size"}
    for field in sizes.TextDims.__dataclass_fields__:
        if field not in same:
            assert getattr(t5, field) == getattr(g3, field), field
    assert (spec.vision.hidden_size, spec.vision.num_hidden_layers, spec.vision.mm_tokens_per_image) == (
        1152,
        27,
        256,
    )
    assert (
        spec.vision.image_size // spec.vision.patch_size
    ) ** 2 == 4096  # 64 x 64 patches, pooled 4x4 to 256


# ------------------------------------------------------------ Gemma 3 through TransformerLens


@pytest.mark.parametrize("size", list(sizes.SIZES))
def test_gemma3_tl_config_equals_transformer_lens_own_key_by_key(size):
    from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_model_config
    from transformers import Gemma3TextConfig

    spec = sizes.SIZES[size]
    real = Gemma3TextConfig(**spec.gemma3_text.config_kwargs())  # the real dims, no weights
    ours = gemma_scope.gemma3_tl_config_dict(real, spec.gemma3_id)
    theirs = convert_hf_model_config(spec.gemma3_id)
    for key, value in theirs.items():
        assert ours[key] == value, key
    assert set(ours) - set(theirs) == {"attn_scale"} and ours["attn_scale"] == 16.0
    built = gemma_scope.gemma3_tl_config(real, model_name=spec.gemma3_id).to_dict()
    assert built == get_pretrained_model_config(spec.gemma3_id, device="cpu").to_dict()
    assert built["rotary_scaling_factor"] == {"270m": 1.0, "1b": 1.0, "4b": 8.0}[size]
    assert built["original_architecture"] == {"4b": "Gemma3ForConditionalGeneration"}.get(
        size, "Gemma3ForCausalLM"
    )


def test_gemma3_tl_config_reads_a_multimodal_config_and_a_local_folder_name():
    from transformers import Gemma3Config, Gemma3TextConfig

    spec = sizes.SIZES["4b"]
    text = Gemma3TextConfig(**spec.gemma3_text.config_kwargs())
    multimodal = Gemma3Config(text_config=text.to_dict())
    assert gemma_scope.gemma3_tl_config_dict(multimodal, spec.gemma3_id) == gemma_scope.gemma3_tl_config_dict(
        text, spec.gemma3_id
    )
    # A local folder: the 270M recipe as a template, but every dimension and the scaling from the config.
    local = gemma_scope.gemma3_tl_config_dict(text, "/models/gemma-3-4b")
    assert (
        local["d_model"],
        local["n_key_value_heads"],
        local["window_size"],
        local["rotary_scaling_factor"],
    ) == (
        2560,
        4,
        1024,
        8.0,
    )
    assert (
        local["original_architecture"] == "Gemma3ForCausalLM"
        and local["tokenizer_name"] == "/models/gemma-3-4b"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            r"config\.rope_parameters\['full_attention'\]\['rope_type'\] = 'yarn' is not handled by sae_lens_t5gemma: "
            r"expected one of \('default', 'linear'\)",
        ),
        (
            dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
            r"config\.rope_parameters\['sliding_attention'\]\['rope_type'\] = 'linear' is not handled",
        ),
        (dict(attn_logit_softcapping=50.0), r"config\.attn_logit_softcapping = 50\.0 is not handled by sae_lens_t5gemma: expected None"),
        (dict(final_logit_softcapping=30.0), r"config\.final_logit_softcapping = 30\.0 is not handled"),
        (dict(attention_bias=True), r"config\.attention_bias = True is not handled by sae_lens_t5gemma: expected False"),
        (dict(use_bidirectional_attention=True), r"config\.use_bidirectional_attention = True is not handled"),
        (dict(hidden_activation="gelu"), r"config\.hidden_activation = 'gelu' is not handled"),
        (dict(some_new_field=3), r"config\.some_new_field = 3 is not handled by sae_lens_t5gemma: unknown field"),
    ],
)  # fmt: skip
def test_gemma3_tl_config_refuses_what_the_recipe_cannot_represent(change, message):
    from transformers import Gemma3TextConfig

    spec = sizes.SIZES["4b"]
    cfg = Gemma3TextConfig(**(spec.gemma3_text.config_kwargs() | change))
    with pytest.raises(ValueError, match=r"^google/gemma-3-4b-pt: Gemma 3 " + message):
        gemma_scope.gemma3_tl_config(cfg, model_name=spec.gemma3_id)


# ----------------------------------------------------------------------------- stand-ins


@pytest.mark.parametrize("size, n_layers", [("270m", 6), ("1b", 8), ("4b", 10)])
def test_stand_in_keeps_the_structure_and_shrinks_the_rest(size, n_layers):
    spec = sizes.SIZES[size]
    cfg = synthetic.t5gemma2_config(size=size)
    real = synthetic.t5gemma2_config(real_dims=True, size=size)
    for stack in (cfg.encoder.text_config, cfg.decoder):
        assert stack.num_hidden_layers == n_layers
        real_types = real.decoder.layer_types
        assert stack.layer_types == real_types[:6] + real_types[len(real_types) - (n_layers - 6) :]
        assert stack.layer_types[-1] == real.decoder.layer_types[-1]  # ends as the real stack ends
        for field in ("num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                      "rope_parameters", "query_pre_attn_scalar", "attn_logit_softcapping",
                      "final_logit_softcapping", "rms_norm_eps", "hidden_activation"):  # fmt: skip
            assert getattr(stack, field) == getattr(real.decoder, field), field
        assert (stack.hidden_size, stack.intermediate_size) == spec.stand_in_widths
        assert (stack.vocab_size, stack.max_position_embeddings) == (512, 2048)
    t = real.encoder.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.max_position_embeddings) == (
        spec.t5gemma2_text.hidden_size,
        spec.t5gemma2_text.num_hidden_layers,
        spec.t5gemma2_text.vocab_size,
        spec.t5gemma2_text.max_position_embeddings,
    )
    assert t.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}


def test_default_stand_in_is_unchanged():
    cfg = synthetic.t5gemma2_config()
    t = cfg.decoder
    assert (t.hidden_size, t.num_hidden_layers, t.head_dim, t.sliding_window, t.vocab_size) == (
        64,
        2,
        16,
        8,
        512,
    )
    assert t.layer_types == ["sliding_attention", "full_attention"]
    assert t.rope_parameters["full_attention"]["rope_type"] == "default"
    real = synthetic.t5gemma2_config(real_dims=True).decoder
    assert (real.hidden_size, real.num_hidden_layers, real.head_dim) == (640, 18, 256)


def test_gemma3_stand_in_takes_gemma3s_own_rope_and_refuses_other_shapes():
    t5 = synthetic.build_t5gemma2(size="1b")
    g3 = synthetic.gemma3_from_t5gemma2_encoder(t5, "1b")
    # T5Gemma 2 scales RoPE on full layers; Gemma 3 1B does not.
    assert t5.config.decoder.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert g3.config.rope_parameters["full_attention"] == {"rope_type": "default", "rope_theta": 1e6}
    assert g3.config.layer_types == t5.config.encoder.text_config.layer_types
    torch.testing.assert_close(
        g3.model.layers[3].self_attn.q_proj.weight,
        t5.model.encoder.text_model.layers[3].self_attn.q_proj.weight,
    )
    with pytest.raises(
        ValueError,
        match=r"size='4b'\): the T5Gemma 2 encoder's hidden_size is 72, the 4b Gemma 3 stand-in's is 80",
    ):
        synthetic.gemma3_from_t5gemma2_encoder(t5, "4b")


# --------------------------------------------------------------------- the load-path check


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention_bias=True), r"T5Gemma 2 config encoder\.text_config\.attention_bias = True is not handled by sae_lens_t5gemma: expected False \(hook_z splits"),
        (dict(final_logit_softcapping=30.0), r"encoder\.text_config\.final_logit_softcapping = 30\.0 is not handled"),
        (dict(hidden_activation="relu"), r"encoder\.text_config\.hidden_activation = 'relu' is not handled"),
        (dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
         r"encoder\.text_config\.rope_parameters\['full_attention'\]\['rope_type'\] = 'dynamic' is not handled"),
    ],
)  # fmt: skip
def test_wrapping_refuses_unhandled_text_fields(overrides, message):
    model = synthetic.build_t5gemma2(**overrides)
    with pytest.raises(ValueError, match=message):
        HookedT5Gemma2(model)


# The text fields of google/t5gemma-2-270m-270m's config as a public printout shows them
# (transformers 5.0.0.dev0; docs/family.md [HF270]), legacy generic fields included.
HF270_TEXT = dict(
    _sliding_window_pattern=6, add_cross_attention=False, attention_bias=False, attention_dropout=0.0,
    attn_logit_softcapping=None, bos_token_id=2, chunk_size_feed_forward=0, cross_attention_hidden_size=None,
    decoder_start_token_id=None, dropout_rate=0.0, eos_token_id=1, final_logit_softcapping=None,
    finetuning_task=None, head_dim=256, hidden_activation="gelu_pytorch_tanh", hidden_size=640,
    initializer_range=0.02, intermediate_size=2048, is_decoder=False,
    layer_types=list(sizes.gemma3_layer_types(18)), max_position_embeddings=32768, num_attention_heads=4,
    num_hidden_layers=18, num_key_value_heads=1, pad_token_id=0, prefix=None, query_pre_attn_scalar=256,
    rms_norm_eps=1e-06, rope_parameters={"full_attention": {"factor": 8.0, "rope_theta": 1000000, "rope_type": "linear"},
                                         "sliding_attention": {"rope_theta": 10000, "rope_type": "default"}},
    sep_token_id=None, sliding_window=512, task_specific_params=None, tie_word_embeddings=True,
    tokenizer_class=None, use_bidirectional_attention=False, use_cache=True, vocab_size=262144,
)  # fmt: skip


def test_the_released_270m_config_passes_and_equals_the_table():
    from transformers import T5Gemma2Config

    cfg = T5Gemma2Config(encoder=dict(text_config=HF270_TEXT), decoder=dict(HF270_TEXT))
    sizes.check_text_config(cfg)
    text = cfg.encoder.text_config
    for field, value in sizes.SIZES["270m"].t5gemma2_text.config_kwargs().items():
        assert getattr(text, field) == value, field


def test_load_path_refuses_an_unknown_field(tmp_path):
    model = synthetic.build_t5gemma2()
    model.save_pretrained(tmp_path)
    synthetic.build_tokenizer(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder"]["sinks_per_head"] = 4  # a field a future T5Gemma could add
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"^T5Gemma 2 config decoder\.sinks_per_head = 4 is not handled by sae_lens_t5gemma: unknown field",
    ):
        load_t5gemma2(tmp_path, dtype=torch.float32)
    model.config.decoder.hidden_size = 32  # one residual width for both stacks
    with pytest.raises(
        ValueError, match="encoder.text_config.hidden_size = 64 differs from decoder.hidden_size = 32"
    ):
        HookedT5Gemma2(model)


# ------------------------------------------------------------------- the work, on every stand-in


@pytest.fixture(scope="module")
def stand_in_dirs(tmp_path_factory) -> dict[str, Path]:
    return {
        s: synthetic.save_stand_in_model(tmp_path_factory.mktemp(f"stand_in_{s}"), size=s)
        for s in sizes.SIZES
    }


@pytest.mark.parametrize("size", list(sizes.SIZES))
def test_hooks_equal_transformers_on_size_stand_in(size, stand_in_dirs):
    model = load_t5gemma2(stand_in_dirs[size], dtype=torch.float32, convention="reconstruct")
    dims = sizes.SIZES[size].stand_in_text()
    n_layers, n_heads, d_head = dims.num_hidden_layers, dims.num_attention_heads, dims.head_dim
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head) == (n_layers, n_heads, d_head)
    # Long enough that the encoder's sliding window (half the window each side) cuts in.
    n = dims.sliding_window // 2 + 8
    tokens = torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(2))
    module_sites = [s for s in sites.all_sites(n_layers) if s.kind.hf_io != "internal"]
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for s in module_sites:
        module = model.hf_model.get_submodule(s.hf_module)
        if s.kind.hf_io == "output":
            hook = module.register_forward_hook(
                lambda m, a, o, k=s.hook_name: acts.__setitem__(k, o.detach().clone())
            )
        else:
            hook = module.register_forward_pre_hook(
                lambda m, a, k=s.hook_name: acts.__setitem__(k, a[0].detach().clone())
            )
        handles.append(hook)
    with torch.no_grad():
        ref_logits = model.hf_model(input_ids=tokens, decoder_input_ids=tokens).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[s.hook_name for s in module_sites])
    assert len(cache.keys()) == len(acts) == len(module_sites)
    for name, x in acts.items():
        if name.endswith("hook_z"):
            x = x.view(1, n, n_heads, d_head)
        assert torch.equal(cache[name], x), name
    assert cache[f"encoder_blocks.{n_layers - 1}.attn.hook_z"].shape == (1, n, n_heads, d_head)
    assert torch.equal(logits, ref_logits)


# Layer 1 keeps the harvest short (every layer and site is checked against transformers above).
@pytest.mark.parametrize("size", list(sizes.SIZES))
@pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted")
def test_training_and_evaluate_sae_on_size_stand_in(size, stand_in_dirs, tmp_path):
    hook, hook_name = "encoder.1.attn_out", "encoder_blocks.1.attn.hook_out"
    model = load_t5gemma2(stand_in_dirs[size], dtype=torch.float32)
    texts = synthetic.stand_in_texts()
    lines = [t for _ in range(12) for t in random.Random(0).sample(texts[:20], 20)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cfg = training.TrainConfig(
        model=str(stand_in_dirs[size]), hooks=[hook], dataset=str(tmp_path / "train.txt"), out=str(tmp_path / "out"),
        architecture="topk", k=8, d_sae=128, training_tokens=60 * 256, train_batch_size_tokens=256, context_size=32,
        store_batch_size_prompts=8, lr=3e-3, eval_every_n_steps=1000, n_eval_batches=1, eval_batch_size_prompts=4,
        n_batches_for_norm_estimate=5, model_dtype="float32", disable_concat_sequences=False,
    )  # fmt: skip
    result = training.train(cfg, model=model, keep_initial=True)
    sae = result.saes[hook]
    d_model = sizes.SIZES[size].stand_in_widths[0]
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name) == (d_model, 128, hook_name)
    held_out = training.collect_activations(model, texts[20:], [hook_name])[hook_name]
    before = training.reconstruction_mse(result.initial_saes[hook], held_out)
    after = training.reconstruction_mse(sae, held_out)
    assert after < 0.6 * before, (before, after)

    batch = model.to_tokens(texts[20:28], truncate=True)
    metrics = evaluate_sae(model, sae, [batch[:, :24]])
    assert metrics["l0"] == 8.0  # top-k, at every covered token
    assert 0.0 < metrics["explained_variance"] <= 1.0
    assert metrics["n_tokens"] > 0 and metrics["n_predictions"] > 0
    assert all(
        math.isfinite(metrics[k]) for k in ("ce_loss_with_sae", "ce_loss_without_sae", "kl_div_with_sae")
    )
    assert metrics["kl_div_with_sae"] >= 0.0


# ------------------------------------------------------------- stand-in hubs under the real ids


@pytest.mark.parametrize("size", BIG)
def test_stand_in_hubs_under_real_ids(size, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = sizes.SIZES[size]
    synthetic.write_stand_in_hub(tmp_path, size=size)
    synthetic.write_gemma3_stand_in_hub(tmp_path, size=size)
    read_gemma_scope_shapes_from_cache()
    dims = spec.stand_in_text("gemma3")
    with synthetic.offline_hub(tmp_path):
        t5 = load_t5gemma2(spec.t5gemma2_id, dtype=torch.float32)
        assert (t5.cfg.model_name, t5.cfg.d_model, t5.cfg.n_layers) == (
            spec.t5gemma2_id,
            dims.hidden_size,
            dims.num_hidden_layers,
        )
        tl = gemma_scope.load_gemma3(spec.gemma3_id)
        hf = AutoModelForCausalLM.from_pretrained(spec.gemma3_id, dtype=torch.float32).eval()
        sae = SAE.from_pretrained(
            release=spec.gemma_scope_releases["attn_out"], sae_id="layer_1_width_16k_l0_small", device="cpu"
        )
    assert tl.cfg.rotary_scaling_factor == {"1b": 1.0, "4b": 8.0}[size]
    assert (tl.cfg.d_model, tl.cfg.n_layers, tl.cfg.window_size) == (
        dims.hidden_size,
        dims.num_hidden_layers,
        dims.sliding_window,
    )
    # The Gemma 3 stand-in holds the T5Gemma 2 stand-in's encoder weights.
    torch.testing.assert_close(
        hf.model.layers[1].mlp.up_proj.weight,
        t5.hf_model.model.encoder.text_model.layers[1].mlp.up_proj.weight,
    )
    tokens = tl.to_tokens(synthetic.stand_in_texts()[:2])
    with torch.no_grad():
        torch.testing.assert_close(tl(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    assert (sae.cfg.d_in, sae.cfg.metadata.hook_name) == (
        dims.num_attention_heads * dims.head_dim,
        "blocks.1.attn.hook_z",
    )
    assert sae.cfg.metadata.model_name == spec.gemma3_id
