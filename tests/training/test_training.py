"""Training SAEs on T5Gemma 2 with SAELens' own runners (sae_lens_t5gemma.training, CLI ``train``).

Offline, on the tiny 2-layer random T5Gemma 2 and a local text dataset of a few thousand
tokens (the embedded corpus, shuffled and repeated). Covers:

- every input error is raised before any model is loaded (a model folder holding only
  ``config.json`` proves it: loading its weights would fail differently);
- the presets (mindchain recipe, recommended) as SAELens runner configs;
- ``LanguageModelSAETrainingRunner`` in every architecture: held-out reconstruction MSE falls
  well below the initial SAE's; the saved architecture and metadata are right;
- ``MultiSAETrainingRunner``: one SAE per hook, and every harvesting forward pass serves all hooks;
- ``CacheActivationsRunner``: the cache holds the model's activations for its token ids, and
  training from it reads no activations from the model;
- in-training and final evals carry CE-loss and KL scores;
- save -> load round trips (weights equal, T5Gemma 2 metadata survives), a local release
  loaded by name through ``SAE.from_pretrained``;
- the ``train`` CLI trains from a local text file and its SAE loads by name.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from sae_lens import SAE
from safetensors.torch import load_file

from sae_lens_t5gemma import training
from sae_lens_t5gemma.cli.main import main
from sae_lens_t5gemma.model.hooked import load_t5gemma2
from sae_lens_t5gemma.stand_in import synthetic as synthetic
from sae_lens_t5gemma.training import sae_lens_seams

# The tiny corpus is read many times over: SAELens says so at each new epoch.
pytestmark = [
    pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted"),
    pytest.mark.auto_branch,
]

HOOK = "encoder.1.attn_out"
HOOK_NAME = "encoder_blocks.1.attn.hook_out"
CONTEXT, STORE_BATCH, BATCH_TOKENS = 32, 8, 256


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path | list[str]]:
    """train.txt / train.jsonl (20 sentences shuffled 15 times) and 5 held-out sentences."""
    folder = tmp_path_factory.mktemp("data")
    texts = synthetic.stand_in_texts()
    train_texts, held_out = texts[:20], texts[20:]
    rng, lines = random.Random(0), []
    for _ in range(15):
        block = train_texts[:]
        rng.shuffle(block)
        lines += block
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    training.write_text_dataset(lines, folder / "train.jsonl")
    return {"txt": folder / "train.txt", "jsonl": folder / "train.jsonl", "held_out": held_out}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_t5gemma2(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def held_out(model, data) -> dict[str, torch.Tensor]:
    """Held-out activations (sentences never trained on) at every hook the tests train."""
    hooks = [HOOK_NAME, "encoder_blocks.0.attn.hook_out", "decoder_blocks.1.self_attn.hook_out"]
    return training.collect_activations(model, data["held_out"], hooks)


@pytest.fixture(scope="module")
def config_only_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A model folder with config.json but no weights: any attempt to load the model fails."""
    folder = tmp_path_factory.mktemp("config_only")
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    return folder


def small(model_dir: Path, dataset: Path, out: Path, **overrides) -> training.TrainConfig:
    """A run of 100 SAE steps of 256 tokens on the tiny model."""
    values = dict(
        model=str(model_dir), hooks=[HOOK], dataset=str(dataset), out=str(out), architecture="topk", k=8,
        d_sae=128, training_tokens=100 * BATCH_TOKENS, train_batch_size_tokens=BATCH_TOKENS, context_size=CONTEXT,
        store_batch_size_prompts=STORE_BATCH, lr=3e-3, eval_every_n_steps=1000, n_eval_batches=1,
        eval_batch_size_prompts=4, n_batches_for_norm_estimate=10, model_dtype="float32",
        # The stand-in sentences are shorter than a context: pack them (one document per row would skip all).
        disable_concat_sequences=False,
    )  # fmt: skip
    values.update(overrides)
    return training.TrainConfig(**values)


def assert_evals(metrics: dict) -> None:
    flat = training.flatten_metrics(metrics)
    for key in (
        "ce_loss_score",
        "ce_loss_without_sae",
        "kl_div_score",
        "kl_div_with_sae",
        "explained_variance",
        "l0",
    ):
        assert key in flat and math.isfinite(flat[key]), key
    assert flat["kl_div_with_sae"] >= 0 and flat["n_predictions"] > 0


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(hooks=["encoder.7.attn_out"]), ValueError, "Unknown T5Gemma 2 hook name 'encoder.7.attn_out' (the model has 2 layers"),
        (dict(hooks=["decoder.*.attn_outt"]), ValueError, "Hook pattern 'decoder.*.attn_outt' matches no site"),
        (dict(hooks=[]), ValueError, "No hooks given"),
        (dict(dataset="missing/train.txt"), FileNotFoundError, "Dataset file 'missing/train.txt' does not exist"),
        (dict(d_sae=0), ValueError, "d_sae must be a positive integer, got 0"),
        (dict(architecture="gated"), ValueError, "Unknown architecture 'gated'"),
        (dict(k=None), ValueError, "architecture 'topk' needs k"),
        (dict(architecture="standard", k=None), ValueError, "architecture 'standard' needs l1"),
        (dict(k=500), ValueError, "k must be in (0, d_sae=128], got 500"),
        (dict(training_tokens=100), ValueError, "training_tokens (100) is smaller than one SAE batch"),
        (dict(n_batches_in_buffer=2), ValueError, "n_batches_in_buffer x context_size = 2 x 32 tokens is smaller than one SAE batch (256 tokens)"),
        (dict(release_name="gpt2-small-res-jb"), ValueError, "Release name 'gpt2-small-res-jb' is taken"),
        (dict(release_name="bad name"), ValueError, "Release name 'bad name': use letters"),
        (dict(architecture="matryoshka", matryoshka_widths=[64, 32, 128]), ValueError, "matryoshka_widths must increase"),
    ],
)  # fmt: skip
def test_bad_config_fails_before_the_model_loads(
    config_only_model, data, tmp_path, overrides, error, message
):
    dataset = overrides.pop("dataset", data["txt"])
    cfg = small(config_only_model, dataset, tmp_path / "out", **overrides)
    with pytest.raises(error) as info:
        training.train(cfg)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_dataset_and_model_fail_before_the_model_loads(config_only_model, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' line 1: expected a JSON object with a 'text' field"):
        training.train(small(config_only_model, bad, tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"Model folder '.*nowhere' has no config.json"):
        training.train(small(tmp_path / "nowhere", data["txt"], tmp_path / "out"))
    # A Hugging Face dataset that cannot be reached (the tests are offline) is named in the error.
    with pytest.raises(ValueError, match=r"Cannot load the Hugging Face dataset 'someone/no-such-dataset'"):
        training.train(small(config_only_model, "someone/no-such-dataset", tmp_path / "out"))  # type: ignore[arg-type]


def test_presets_build_sae_lens_configs(tiny_model_dir, tmp_path):
    from sae_lens import BatchTopKTrainingSAEConfig, StandardTrainingSAEConfig

    # Documents longer than the presets' rows (one document per row is their default).
    long_docs = training.write_text_dataset(
        [" ".join(synthetic.stand_in_texts())] * 4, tmp_path / "long.jsonl"
    )
    mind = training.TrainConfig.from_preset("mindchain", model=str(tiny_model_dir), dataset=str(long_docs))
    plan = training.plan_training(mind)
    assert [s.friendly for s in plan.sites] == [
        "encoder.0.attn_out",
        "encoder.1.attn_out",
        "decoder.0.attn_out",
        "decoder.1.attn_out",
    ]
    run = training.build_runner_config(plan, plan.sites[0])
    assert isinstance(run.sae, StandardTrainingSAEConfig)
    assert (run.sae.d_sae, run.sae.l1_coefficient, run.lr, run.train_batch_size_tokens) == (
        4096,
        0.01,
        1e-4,
        2 * 128,
    )
    # The card's loop feeds raw o_proj outputs: no input normalisation.
    assert run.sae.apply_b_dec_to_input is False and run.sae.normalize_activations == "none"
    assert run.seqpos_slice == (None, 64)  # both stacks: the encoder SAEs train on the prefix
    assert run.disable_concat_sequences is True
    assert run.n_batches_in_buffer * run.context_size >= run.train_batch_size_tokens
    assert (
        run.training_tokens == 1_000_000
        and run.sae.metadata.hf_hook_name == "model.encoder.text_model.layers.0.self_attn.o_proj.output"
    )

    rec = training.TrainConfig.from_preset(
        "recommended", model=str(tiny_model_dir), hooks=["decoder.*.attn_out"], dataset=str(long_docs)
    )
    plan = training.plan_training(rec)
    multi = training.build_multi_runner_config(plan)
    assert set(multi.saes) == {"decoder.0.attn_out", "decoder.1.attn_out"}
    sae_cfg = multi.saes["decoder.1.attn_out"]
    assert isinstance(sae_cfg, BatchTopKTrainingSAEConfig) and (sae_cfg.k, sae_cfg.d_sae) == (40, 16384)
    assert multi.hook_names["decoder.1.attn_out"] == "decoder_blocks.1.self_attn.hook_out"
    assert multi.n_batches_in_buffer * multi.context_size >= multi.train_batch_size_tokens
    assert multi.lr_decay_steps == int(0.2 * 100_000_000 // 4096)
    # Switching architecture drops the preset's sparsity knob that no longer applies.
    with pytest.raises(ValueError, match="architecture 'standard' needs l1"):
        training.plan_training(
            training.TrainConfig.from_preset(
                "recommended",
                model=str(tiny_model_dir),
                hooks=[HOOK],
                dataset=str(long_docs),
                architecture="standard",
            )
        )
    with pytest.raises(ValueError, match="Missing hooks"):
        training.TrainConfig.from_preset("recommended", model=str(tiny_model_dir), dataset=str(long_docs))
    # wandb is off unless asked for (SAELens' eval branch then runs against a disabled wandb run).
    assert rec.wandb is False and multi.logger.log_weights_to_wandb is False


# ------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "architecture, sparsity, saved_as",
    [
        ("standard", dict(l1=1.0), "standard"),
        ("topk", dict(k=8), "topk"),
        ("batchtopk", dict(k=8), "jumprelu"),
        ("jumprelu", dict(k=8), "jumprelu"),
        ("matryoshka", dict(k=8, matryoshka_widths=[16, 64, 128]), "jumprelu"),
    ],
)
def test_every_architecture_lowers_held_out_mse(
    model, tiny_model_dir, data, held_out, tmp_path, architecture, sparsity, saved_as
):
    cfg = small(
        tiny_model_dir, data["txt"], tmp_path / "out", architecture=architecture, **{"k": None, **sparsity}
    )
    result = training.train(cfg, model=model, keep_initial=True)

    acts = held_out[HOOK_NAME]
    before = training.reconstruction_mse(result.initial_saes[HOOK], acts)
    after = training.reconstruction_mse(result.saes[HOOK], acts)
    assert after < 0.5 * before, (before, after)
    sae = result.saes[HOOK]
    assert sae.cfg.architecture() == saved_as
    assert sae.cfg.metadata.training_architecture == training.ARCHITECTURES[architecture]
    assert sae.cfg.normalize_activations == "none"  # the training-time scaling is folded in
    if architecture == "topk":
        assert (sae.encode(acts) != 0).sum(-1).eq(8).all()
    assert_evals(result.eval_metrics[HOOK])


def test_multi_hook_run_trains_one_sae_per_hook_from_shared_passes(
    model, tiny_model_dir, data, held_out, tmp_path
):
    calls: list[list[str]] = []
    original = model.run_with_cache

    def recording(*args, **kwargs):
        calls.append(list(kwargs.get("names_filter") or []))
        return original(*args, **kwargs)

    cfg = small(
        tiny_model_dir,
        data["jsonl"],
        tmp_path / "out",
        hooks=["encoder.*.attn_out", "decoder.1.attn_out"],
        training_tokens=60 * BATCH_TOKENS,
        eval_every_n_steps=30,
    )
    # Count the rows every SAE training step receives, and the all-zero ones among them.
    from sae_lens.saes.sae import TrainingSAE

    fed: Counter = Counter()
    train_step = TrainingSAE.training_forward_pass

    def counting(self, step_input):
        fed[self.cfg.metadata.hook_name, "rows"] += step_input.sae_in.shape[0]
        fed[self.cfg.metadata.hook_name, "zero"] += int((step_input.sae_in == 0).all(-1).sum())
        return train_step(self, step_input)

    model.run_with_cache = recording
    TrainingSAE.training_forward_pass = counting
    try:
        result = training.train(cfg, model=model, keep_initial=True)
    finally:
        del model.run_with_cache
        TrainingSAE.training_forward_pass = train_step

    ids = ["encoder.0.attn_out", "encoder.1.attn_out", "decoder.1.attn_out"]
    assert list(result.paths) == ids
    hook_names = ["encoder_blocks.0.attn.hook_out", HOOK_NAME, "decoder_blocks.1.self_attn.hook_out"]
    # prefix_lm: the encoder SAEs train on positions < p, the decoder SAE on positions >= p. No
    # SAE ever sees a row its stack did not compute (those are zeros in the position contract).
    for hook in hook_names:
        assert fed[hook, "rows"] == cfg.training_tokens, hook
        assert fed[hook, "zero"] == 0, hook
    # One runner per stack (one seqpos_slice each): every encoder harvesting pass asks for both
    # encoder hooks at once; the decoder runner harvests its hook alone. The evals are single-hook
    # calls too: two in-training (steps 30 and 60) and one final per SAE, one batch each.
    enc_shared = [c for c in calls if sorted(c) == sorted(hook_names[:2])]
    assert len(enc_shared) >= cfg.training_tokens // (STORE_BATCH * CONTEXT)
    singles = Counter(tuple(c) for c in calls if c not in enc_shared)
    assert {k: v for k, v in singles.items() if k != (hook_names[2],)} == {(h,): 3 for h in hook_names[:2]}
    assert singles[(hook_names[2],)] >= cfg.training_tokens // (STORE_BATCH * CONTEXT) + 3
    assert [list(entry) for entry in result.eval_history] == [ids[:2], ids[:2], ids[2:], ids[2:]]
    for entry in result.eval_history:
        for metrics in entry.values():
            assert_evals(metrics)
    meta = SAE.load_from_disk(tmp_path / "out" / "decoder.1.attn_out").cfg.metadata
    assert (list(meta.seqpos_slice), meta.t5gemma2_convention, meta.t5gemma2_prefix_len) == (
        [16, None],
        "prefix_lm",
        16,
    )
    assert list(SAE.load_from_disk(tmp_path / "out" / "encoder.0.attn_out").cfg.metadata.seqpos_slice) == [
        None,
        16,
    ]
    for sae_id, hook in zip(ids, hook_names, strict=True):
        sae = SAE.load_from_disk(tmp_path / "out" / sae_id)
        assert sae.cfg.metadata.hook_name == hook and sae.cfg.metadata.t5gemma2_site == sae_id
        before = training.reconstruction_mse(result.initial_saes[sae_id], held_out[hook])
        assert training.reconstruction_mse(result.saes[sae_id], held_out[hook]) < 0.6 * before
        assert_evals(result.eval_metrics[sae_id])
    assert (
        json.loads((tmp_path / "out" / "runner_cfg.json").read_text())["hook_names"]  # the encoder's runner
        == dict(zip(ids[:2], hook_names[:2], strict=True))
    )


def test_cache_activations_then_train_from_the_cache(model, tiny_model_dir, data, held_out, tmp_path):
    cfg = small(tiny_model_dir, data["txt"], tmp_path / "out", training_tokens=50 * BATCH_TOKENS)
    paths = training.cache_activations(cfg, tmp_path / "cache", model=model)
    cached = datasets.load_from_disk(str(paths[HOOK]))
    assert cached.num_rows == cfg.training_tokens // CONTEXT
    assert cached.features[HOOK_NAME].shape == (CONTEXT, 64)
    # A cached row is the model's activation for that row's tokens; an encoder-only run lets
    # the encoder read the whole row (prefix_len = context).
    row = cached.with_format("torch")[3]
    model.prefix_len = CONTEXT
    try:
        _, cache = model.run_with_cache(row["token_ids"].long()[None], names_filter=[HOOK_NAME])
    finally:
        model.prefix_len = None
    torch.testing.assert_close(row[HOOK_NAME], cache[HOOK_NAME][0], atol=1e-5, rtol=1e-4)

    calls: list[list[str]] = []
    original = model.run_with_cache
    model.run_with_cache = lambda *a, **kw: calls.append(kw.get("names_filter")) or original(*a, **kw)
    try:
        result = training.train_from_cache(cfg, tmp_path / "cache", model=model, keep_initial=True)
    finally:
        del model.run_with_cache
    # Training read the cache: the model ran only for the final eval (one batch; the encoder read
    # whole rows in training, so reconstruction and CE/KL are two evals: issue 19, item 4).
    assert calls == [[HOOK_NAME], [HOOK_NAME]]
    before = training.reconstruction_mse(result.initial_saes[HOOK], held_out[HOOK_NAME])
    assert training.reconstruction_mse(result.saes[HOOK], held_out[HOOK_NAME]) < 0.5 * before
    meta = result.saes[HOOK].cfg.metadata
    assert meta.hook_name == HOOK_NAME and meta.dataset_path == str(data["txt"].resolve())
    with pytest.raises(FileExistsError, match="already holds"):
        training.cache_activations(cfg, tmp_path / "cache", model=model)


def test_the_cache_is_saved_shuffled_and_training_reads_it_so(model, tiny_model_dir, data, tmp_path):
    """SAELens' ``shuffle=True`` shuffles a view it never saves; the cache here is saved in the
    shuffled order (a permutation of harvest order by ``seed``), and training from it differs
    from training from the harvest order (before: bit-identical)."""
    from sae_lens_t5gemma.training.data import load_training_dataset
    from sae_lens_t5gemma.training.runner_configs import build_cache_config

    cfg = small(tiny_model_dir, data["txt"], tmp_path / "out", training_tokens=20 * BATCH_TOKENS)
    plan = training.plan_training(cfg)
    site = plan.sites[0]
    shuffled = datasets.load_from_disk(
        str(training.cache_activations(plan, tmp_path / "cache", model=model)[HOOK])
    )
    assert not (tmp_path / "cache" / f"{HOOK}.shuffling").exists()
    assert not (tmp_path / "cache" / f"{HOOK}.harvest-order").exists()
    # The same harvest, unshuffled (SAELens' runner with shuffle off).
    unshuffled_cfg = build_cache_config(plan, site, tmp_path / "harvest" / HOOK)
    unshuffled_cfg.shuffle = False
    with model.fed(cfg.convention, plan.split):
        runner = sae_lens_seams._cache_runner_class()
        runner(unshuffled_cfg, model, override_dataset=load_training_dataset(plan)).run()
    harvest = datasets.load_from_disk(str(tmp_path / "harvest" / HOOK))
    rows = lambda d: [tuple(r) for r in d["token_ids"]]  # noqa: E731
    assert sorted(rows(shuffled)) == sorted(rows(harvest)) and rows(shuffled) != rows(harvest)
    assert rows(shuffled) == rows(harvest.shuffle(seed=cfg.seed))  # the permutation SAELens drew
    a = shuffled.with_format("torch")[0][HOOK_NAME]
    b = harvest.with_format("torch")[harvest["token_ids"].index(shuffled["token_ids"][0])][HOOK_NAME]
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # activations moved with their tokens
    # Training reads the saved order: the SAE differs from one trained on the harvest order.
    one = training.train_from_cache(cfg, tmp_path / "cache", model=model).saes[HOOK]
    two = training.train_from_cache(
        replace(cfg, out=str(tmp_path / "out2")), tmp_path / "harvest", model=model
    )
    difference = (one.W_dec - two.saes[HOOK].W_dec).norm() / two.saes[HOOK].W_dec.norm()
    assert difference > 0.01, float(difference)


# ----------------------------------------------------------------- evals, save, load


@pytest.fixture(scope="module")
def trained(model, tiny_model_dir, data, tmp_path_factory):
    """One standard SAE with two in-training evals, saved and registered as a release."""
    out = tmp_path_factory.mktemp("trained") / "saes"
    cfg = small(
        tiny_model_dir, data["txt"], out, architecture="standard", k=None, l1=1.0, eval_every_n_steps=50, release_name="test-training-release"
    )  # fmt: skip
    return cfg, training.train(cfg, model=model)


def test_in_training_and_final_evals_have_ce_and_kl(trained):
    cfg, result = trained
    # SAELens evals at steps 50 and 100 of 100 (its own schedule), CE loss and KL included.
    assert len(result.eval_history) == 2
    for entry in result.eval_history:
        assert_evals(entry[HOOK])
    on_disk = json.loads((result.paths[HOOK] / "eval_metrics.json").read_text())
    assert (on_disk.pop("model_dtype"), on_disk.pop("sae_dtype")) == ("float32", "float32")
    assert set(on_disk.pop("feeds")) == {"reconstruction", "downstream"}
    assert training.flatten_metrics(on_disk) == pytest.approx(
        training.flatten_metrics(result.eval_metrics[HOOK])
    )
    summary = json.loads((result.out / "training_summary.json").read_text())
    assert summary["config"]["l1"] == 1.0 and summary["saes"][HOOK] == str(result.paths[HOOK])
    assert not (Path.cwd() / "wandb").exists()


def test_saved_sae_round_trips_with_t5gemma_metadata(trained, tiny_model_dir, tmp_path):
    cfg, result = trained
    path = result.paths[HOOK]
    sae = SAE.load_from_disk(path)
    weights = load_file(path / "sae_weights.safetensors")
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
        torch.testing.assert_close(tensor, result.saes[HOOK].state_dict()[name], rtol=0, atol=0)
    meta = sae.cfg.metadata
    assert meta.model_name == str(tiny_model_dir.resolve())
    assert meta.hook_name == HOOK_NAME
    assert meta.hf_hook_name == "model.encoder.text_model.layers.1.self_attn.o_proj.output"
    assert meta.t5gemma2_input_convention == (
        "prefix_lm, encoder-only run: the encoder read the whole row (the decoder never ran)"
    )
    assert meta.t5gemma2_prefix_len == CONTEXT and meta.t5gemma2_convention == "prefix_lm"
    assert meta.context_size == CONTEXT and meta.prepend_bos is True
    # The extra keys survive a second save -> load through SAELens alone.
    sae.save_model(tmp_path / "again")
    again = SAE.load_from_disk(tmp_path / "again")
    assert again.cfg.metadata == meta
    torch.testing.assert_close(again.W_dec, sae.W_dec, rtol=0, atol=0)
    # Training into the same folder again is refused before anything runs.
    with pytest.raises(FileExistsError, match=r"already holds SAE\(s\) \['encoder.1.attn_out'\]"):
        training.plan_training(cfg)


def test_trained_release_loads_by_name(trained):
    _, result = trained
    assert result.release == "test-training-release"
    by_name = SAE.from_pretrained(release="test-training-release", sae_id=HOOK)
    from_disk = SAE.load_from_disk(result.paths[HOOK])
    for name, tensor in from_disk.state_dict().items():
        torch.testing.assert_close(by_name.state_dict()[name], tensor, rtol=0, atol=0)
    assert by_name.cfg.metadata.hf_hook_name == from_disk.cfg.metadata.hf_hook_name
    release = yaml.safe_load(result.release_yaml.read_text())["test-training-release"]
    assert release["saes"] == [
        {"id": HOOK, "path": HOOK, "l0": pytest.approx(from_disk.cfg.metadata.l0, abs=1e-3), "variance_explained": pytest.approx(
            result.eval_metrics[HOOK]["explained_variance"], abs=1e-3)}
    ]  # fmt: skip
    # Registering again (a new process would) is idempotent.
    assert training.register_release(result.release_yaml) == "test-training-release"


# ------------------------------------------------------------------------------ CLI


def test_cli_trains_from_a_text_file_and_the_sae_loads_by_name(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "cli_out"
    argv = [
        "train", str(tiny_model_dir), "--hook", HOOK, "--dataset", str(data["txt"]), "--architecture", "topk",
        "-k", "8", "--d-sae", "64", "--training-tokens", "12.8k", "--context-size", str(CONTEXT),
        "--train-batch-size-tokens", str(BATCH_TOKENS), "--store-batch-size-prompts", str(STORE_BATCH), "--lr",
        "3e-3", "--n-eval-batches", "1",
        "--out", str(out), "--release-name", "test-cli-release", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "LanguageModelSAETrainingRunner" in printed and "KL score" in printed
    sae = SAE.from_pretrained(release="test-cli-release", sae_id=HOOK)
    assert (sae.cfg.d_sae, sae.cfg.metadata.hook_name, sae.cfg.architecture()) == (64, HOOK_NAME, "topk")
    from_disk = SAE.load_from_disk(out / HOOK)
    torch.testing.assert_close(sae.W_enc, from_disk.W_enc, rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hook", "encoder.9.attn_out"], "error: Unknown T5Gemma 2 hook name 'encoder.9.attn_out'"),
        (
            ["--hook", HOOK, "--dataset", "nothing_here.txt"],
            "error: Dataset file 'nothing_here.txt' does not exist",
        ),
        (["--hook", HOOK, "--d-sae", "0"], "error: d_sae must be a positive integer, got 0"),
        (["--hook", HOOK, "--architecture", "standard"], "error: architecture 'standard' needs l1"),
        ([], "error: Missing hooks"),
    ],
)
def test_cli_bad_input_exits_2_before_loading(config_only_model, data, tmp_path, capsys, extra, message):
    dataset = [] if "--dataset" in extra else ["--dataset", str(data["txt"])]
    assert main(["train", str(config_only_model), *dataset, "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cached_decoder_activations_cover_the_continuation_only(model, tiny_model_dir, data, tmp_path):
    """prefix_lm: a decoder hook's cache holds positions >= p only (seqpos_slice), never a zero row."""
    cfg = small(
        tiny_model_dir,
        data["txt"],
        tmp_path / "out",
        hooks=["decoder.1.attn_out"],
        training_tokens=8 * BATCH_TOKENS,
    )
    paths = training.cache_activations(cfg, tmp_path / "cache", model=model)
    cached = datasets.load_from_disk(str(paths["decoder.1.attn_out"])).with_format("torch")
    name = "decoder_blocks.1.self_attn.hook_out"
    p = CONTEXT // 2
    assert cached.features[name].shape == (CONTEXT - p, 64)
    acts = torch.stack([cached[i][name] for i in range(cached.num_rows)])
    assert acts.shape == (
        cfg.training_tokens // (CONTEXT - p),
        CONTEXT - p,
        64,
    )  # training tokens = sliced ones
    assert int((acts == 0).all(-1).sum()) == 0 and acts.abs().sum() > 0
    assert cached[0]["token_ids"].shape == (CONTEXT - p,)


# ------------------------------------------------------------------ memory of multi-hook runs


def test_lean_multi_sae_steps_drop_step_tensors_and_keep_the_logs(config_only_model, data, tmp_path):
    """SAELens' MultiSAETrainer keeps every SAE's step tensors until all have stepped; the
    lean trainer returns each output without them, with the same loss and the same log dict."""
    from sae_lens import multi_sae_training_runner as msr
    from sae_lens.registry import get_sae_training_class

    cfg = small(
        config_only_model,
        data["jsonl"],
        tmp_path / "out",
        hooks=["encoder.*.attn_out"],
        architecture="batchtopk",
    )
    rcfg = training.build_multi_runner_config(training.plan_training(cfg))
    tcfg = rcfg.to_sae_trainer_config()

    def trainer(cls):
        torch.manual_seed(0)
        saes = {n: get_sae_training_class(c.architecture())[0](c) for n, c in rcfg.saes.items()}
        return cls(cfg=tcfg, saes=saes, hook_names=rcfg.hook_names, data_provider=iter(()))

    original = msr.MultiSAETrainer
    plain = trainer(original)
    with sae_lens_seams._lean_multi_sae_steps():
        lean = trainer(msr.MultiSAETrainer)
    assert msr.MultiSAETrainer is original
    torch.manual_seed(1)
    batches = {n: torch.randn(BATCH_TOKENS, 64) for n in rcfg.saes}
    for logging_step in (False, True):
        lean._is_logging_step = lambda flag=logging_step: flag
        for name, batch in batches.items():
            full = plain.trainers[name].step(batch)
            slim = lean.trainers[name].step(batch)
            assert full.feature_acts.shape == (BATCH_TOKENS, cfg.d_sae)
            assert [t.numel() for t in (slim.sae_in, slim.sae_out, slim.feature_acts, slim.hidden_pre)] == [
                0
            ] * 4
            assert torch.equal(slim.loss, full.loss)
            if logging_step:
                n = plain.trainers[name].n_training_samples
                want = plain.trainers[name].build_train_step_log_dict(output=full, n_training_samples=n)
                got = lean.trainers[name].build_train_step_log_dict(output=slim, n_training_samples=n)
                assert got == want and got["metrics/l0"] > 0


REAL_DIMS = training.ModelDims(
    "real-dims",
    {"encoder": 18, "decoder": 18},
    {"encoder": 640, "decoder": 640},
    {"encoder": 1024, "decoder": 1024},
)


def test_store_sizing_estimates_the_peak_above_the_weights():
    """The sizing's estimate of an 18-hook runner (the 36-hook run's largest), by part, against
    the peaks measured by benchmarks/bench_training.py (worker mem36, 2026-11-21)."""
    hooks = ["encoder.*.attn_out", "decoder.*.attn_out"]
    cfg = training.TrainConfig.from_preset(
        "recommended", model="real-dims", dataset="x", hooks=hooks, d_sae=4096, max_memory="1.5GiB"
    )
    sites = tuple(training.expand_hooks(hooks, REAL_DIMS))
    plan = training.TrainingPlan(cfg, REAL_DIMS, sites, (), ("encoder", "decoder"))
    z = plan.store_sizing()
    assert (z.width, z.store_batch_size_prompts, z.n_batches_in_buffer) == (11520, 1, 48)
    # Buffer: 48 rows of 256 covered positions plus one forward's rows, 11520 floats each.
    assert z.buffer_bytes == 4 * 11520 * (48 * 256 + 256)
    # One BatchTopK step at batch 4096 x d_sae 4096: 10 such float32 tensors plus four of its input.
    assert z.step_bytes == 4 * 4096 * (10 * 4096 + 4 * 640)
    # 18 SAEs, 16 bytes per parameter (weights, gradients, two Adam moments).
    assert z.sae_state_bytes == 18 * 16 * (2 * 640 * 4096 + 2 * 4096 + 640)
    assert z.activation_bytes == max(z.estimate_bytes, z.buffer_bytes + z.step_bytes) == z.estimate_bytes
    assert z.peak_bytes == z.activation_bytes + z.sae_state_bytes
    # Measured (mem36, 2026-11-21): activation path 1.37 GiB, SAE state 1.41 GiB, peak 2.78 GiB.
    assert (round(z.estimate_bytes / 2**30, 2), round(z.sae_state_bytes / 2**30, 2)) == (1.37, 1.41)
    assert round(z.peak_bytes / 2**30, 2) == 2.78
    # At the preset's own width the SAE step outgrows the store: 2.5 GiB for one 16k-wide step
    # (measured 2.6 GiB with one hook, worker mem1).
    wide = training.TrainingPlan(replace(cfg, d_sae=16384), REAL_DIMS, sites, (), ("encoder", "decoder"))
    w = wide.store_sizing()
    assert w.activation_bytes == w.buffer_bytes + w.step_bytes > w.estimate_bytes
    assert round(w.step_bytes / 2**30, 2) == 2.54


def test_encoder_only_evals_measure_what_the_sae_trained_on(tiny_model_dir):
    """Issue 19, item 4: an encoder-only run lets the encoder read whole rows, so reconstruction
    metrics are measured on whole rows; CE/KL (which need a continuation) come from the default
    split, separately. Before, every metric came from the half-row split (61% different states)."""
    from types import SimpleNamespace

    from sae_lens import StandardSAE, StandardSAEConfig

    from sae_lens_t5gemma.analysis.evaluation import evaluate_sae
    from sae_lens_t5gemma.model.hooked import load_t5gemma2

    model = load_t5gemma2(tiny_model_dir, dtype="float32")
    tokens = model.to_tokens(synthetic.stand_in_texts()[:8], truncate=True)[:, :16]
    assert (tokens != 0).all()  # full rows
    store = SimpleNamespace(context_size=16, exclude_special_tokens=True, get_batch_tokens=lambda n: tokens)
    torch.manual_seed(0)
    cfg = StandardSAEConfig(d_in=model.cfg.d_model, d_sae=64, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "encoder_blocks.1.attn.hook_out"
    sae = StandardSAE(cfg)
    with model.fed(prefix_len=16):  # as training feeds an encoder-only run
        got = training.EvalRecorder(model, store, 1, 8).evaluate(sae)
        whole = evaluate_sae(model, sae, [tokens], compute_downstream=False)
    half = evaluate_sae(model, sae, [tokens])
    assert got["n_tokens"] == whole["n_tokens"] > half["n_tokens"]
    assert got["explained_variance"] == whole["explained_variance"] != half["explained_variance"]
    assert got["l0"] == whole["l0"]
    assert got["ce_loss_score"] == half["ce_loss_score"] and got["kl_div_score"] == half["kl_div_score"]
