"""``train`` under interruption, resume, a second writer and hostile input (issue 22).

Offline, on the tiny 2-layer random T5Gemma 2 and a local text file, through the real
SAELens runners and the CLI (``cli.main``, and one real subprocess). Covers:

- Ctrl-C (SIGINT) and SIGTERM during training: exit 130/143 with one line, a complete SAELens
  checkpoint in ``OUT/checkpoints/<runner>/<samples seen>`` (single- and multi-hook runners);
  ``--resume`` continues it with SAELens' ``resume_from_checkpoint`` and ends at the SAE an
  uninterrupted run with the same seed trains, within a stated tolerance;
- a checkpoint cut short (no record) is passed over; a resume with other settings is refused
  naming them; a fresh run refuses to bury an interrupted one's checkpoints;
- a second ``train`` into a locked ``--out`` fails at once naming the lock;
- input bounds checked before any model loads (a model folder without weights proves it):
  context size, data of special tokens only, non-finite and out-of-range numbers, an output
  path through a file, a ``{"text": 5}`` row.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from sae_lens_t5gemma.cli.main import main
from sae_lens_t5gemma.outputs import lock_path
from sae_lens_t5gemma.stand_in import synthetic as synthetic

pytestmark = pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted")

HOOK = "encoder.1.attn_out"
STEPS, BATCH = 60, 256
STOP_AT = 25  # the step during which the signal arrives


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train.txt: 20 stand-in sentences, shuffled 15 times (300 lines)."""
    folder = tmp_path_factory.mktemp("data")
    texts, rng, lines = synthetic.stand_in_texts()[:20], random.Random(0), []
    for _ in range(15):
        block = texts[:]
        rng.shuffle(block)
        lines += block
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    return folder / "train.txt"


@pytest.fixture(scope="module")
def weightless_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's config and tokenizer without its weights: loading the model fails."""
    folder = tmp_path_factory.mktemp("weightless")
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)
    return folder


def argv(model: Path, data: Path, out: Path, *extra: str, hooks: tuple[str, ...] = (HOOK,)) -> list[str]:
    hook_args = [a for h in hooks for a in ("--hook", h)]
    return [
        "train", str(model), *hook_args, "--dataset", str(data), "--architecture", "topk", "-k", "8",
        "--d-sae", "64", "--training-tokens", str(STEPS * BATCH), "--context-size", "32",
        "--train-batch-size-tokens", str(BATCH), "--store-batch-size-prompts", "8", "--lr", "3e-3",
        "--n-eval-batches", "1", "--out", str(out), "--device", "cpu", "--model-dtype", "float32",
        "--concat-sequences", "--seed", "7", *extra,
    ]  # fmt: skip


def signal_during_step(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process during the ``step``-th SAE step (counting every SAE's)."""
    from sae_lens.training.sae_trainer import SAETrainer

    base, calls = SAETrainer.step, [0]

    def step_and_signal(self, batch):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signum)
        return base(self, batch)

    monkeypatch.setattr(SAETrainer, "step", step_and_signal)


def ours(stderr: str) -> list[str]:
    """The package's lines in stderr, without SAELens' progress bars (tqdm writes there too)."""
    lines = (ln.strip() for ln in stderr.replace("\r", "\n").splitlines())
    return [
        ln for ln in lines if ln.startswith(("interrupted:", "terminated", "error:", "SIGINT:", "SIGTERM:"))
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in SAE.load_from_disk(folder).state_dict().items()}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((a[k] - b[k]).norm() / b[k].norm()) for k in b}


# ----------------------------------------------------------------- interrupt and resume


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(argv(tiny_model_dir, data, out)) == 0
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_train_keeps_a_checkpoint_and_resume_ends_at_the_uninterrupted_sae(
    tiny_model_dir, data, uninterrupted, tmp_path, monkeypatch, capsys, signum
):
    out = tmp_path / "out"
    signal_during_step(monkeypatch, STOP_AT, signum)
    assert main(argv(tiny_model_dir, data, out)) == 128 + signum
    err = ours(capsys.readouterr().err)
    ckpt = out / "checkpoints" / HOOK / str(STOP_AT * BATCH)
    word = "interrupted:" if signum == signal.SIGINT else "terminated (SIGTERM):"
    assert len(err) == 2 and err[1] == (
        f"{word} train stopped; {HOOK} stopped after {STOP_AT * BATCH:,} of {STEPS * BATCH:,} tokens; checkpoint "
        f"{ckpt} (SAEs finished earlier stay in {out}). The same command with --resume (TrainConfig.resume=True) "
        "continues from it."
    )
    assert err[0] == (
        f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (signal again to stop at once, "
        "without it)"
    )
    # SAELens' checkpoint, whole: the SAE, Adam and counters, the store's position, the runner config.
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "activation_scaler.json", "activations_store_state.safetensors", "cfg.json", "runner_cfg.json",
        "sae_weights.safetensors", "sparsity.safetensors", "t5gemma2_checkpoint.json", "trainer_state.pt",
    ]  # fmt: skip
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert (state["n_training_steps"], state["n_training_samples"]) == (STOP_AT, STOP_AT * BATCH)
    assert not (out / HOOK).exists() and not lock_path(out).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    # A fresh run does not bury the checkpoint; a resume with other settings is refused.
    monkeypatch.undo()
    assert main(argv(tiny_model_dir, data, out)) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: Output folder {str(out)!r} holds a checkpoint of an interrupted run ({ckpt}); pass --resume to "
        "continue it, overwrite to start over, or choose another --out"
    )
    assert main([*argv(tiny_model_dir, data, out, "--resume"), "-k", "6"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume: checkpoint {ckpt} comes from a run with other settings or data: k 8.0 there, 6.0 here"
    )
    # A checkpoint cut short (no record) is passed over, though it claims more samples.
    torn = out / "checkpoints" / HOOK / str(50 * BATCH)
    torn.mkdir()
    (torn / "sae_weights.safetensors").write_bytes(b"half")

    assert main(argv(tiny_model_dir, data, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"resume   {HOOK}: from {ckpt}" in printed
    resumed, whole = weights(out / HOOK), weights(uninterrupted / HOOK)
    # The resumed run starts from the same weights, Adam state, counters and data position; it
    # differs only in the activations SAELens' mixing buffer held at the stop (lost: SAELens
    # saves the dataset position, not the buffer) and the shuffles after it. Measured (SIGINT and
    # SIGTERM alike): every latent's decoder direction within cosine 0.983 of the uninterrupted
    # run's (mean 0.995), weights within 9.9% (W_dec) and 8.4% (W_enc); another seed: mean
    # cosine 0.02, weights 140% apart (test below).
    cosine = torch.nn.functional.cosine_similarity(resumed["W_dec"], whole["W_dec"], dim=1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.99, (cosine.min(), cosine.mean())
    diff = relative_difference(resumed, whole)
    assert 0 < max(diff.values()) < 0.15, diff
    meta = json.loads((out / HOOK / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "encoder_blocks.1.attn.hook_out"


def test_two_runs_with_one_seed_agree_and_another_seed_differs(tiny_model_dir, data, uninterrupted, tmp_path):
    """The scale of the tolerance above: same seed, the same SAE bit for bit; another seed, another SAE."""
    assert main(argv(tiny_model_dir, data, tmp_path / "again")) == 0
    assert (
        max(relative_difference(weights(tmp_path / "again" / HOOK), weights(uninterrupted / HOOK)).values())
        == 0
    )
    seed = argv(tiny_model_dir, data, tmp_path / "seed")
    seed[seed.index("--seed") + 1] = "8"
    assert main(seed) == 0
    other, whole = weights(tmp_path / "seed" / HOOK), weights(uninterrupted / HOOK)
    assert torch.nn.functional.cosine_similarity(other["W_dec"], whole["W_dec"], dim=1).mean() < 0.2
    diff = relative_difference(other, whole)
    assert min(diff["W_dec"], diff["W_enc"]) > 1.0, diff


def test_multi_hook_run_stops_between_steps_and_resumes(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    """Two hooks, one MultiSAETrainingRunner: the signal lands between the two SAEs' steps of one
    training step; the checkpoint waits for the second, so both SAEs and counters agree."""
    hooks = ("encoder.0.attn_out", HOOK)
    assert main(argv(tiny_model_dir, data, tmp_path / "whole", hooks=hooks)) == 0
    out = tmp_path / "out"
    signal_during_step(monkeypatch, 2 * STOP_AT + 1, signal.SIGINT)  # the first SAE's step of step 26
    assert main(argv(tiny_model_dir, data, out, hooks=hooks)) == 130
    ckpt = out / "checkpoints" / "multi-encoder" / str((STOP_AT + 1) * BATCH)
    assert ours(capsys.readouterr().err)[-1].startswith(
        f"interrupted: train stopped; {', '.join(hooks)} stopped after {(STOP_AT + 1) * BATCH:,} of "
        f"{STEPS * BATCH:,} tokens; checkpoint {ckpt} "
    )
    for sae_id in hooks:
        state = torch.load(ckpt / sae_id / "trainer_state.pt", weights_only=False)
        assert (state["n_training_steps"], state["n_training_samples"]) == (
            STOP_AT + 1,
            (STOP_AT + 1) * BATCH,
        )
    monkeypatch.undo()
    assert main(argv(tiny_model_dir, data, out, "--resume", hooks=hooks)) == 0
    for sae_id in hooks:
        resumed, whole = weights(out / sae_id), weights(tmp_path / "whole" / sae_id)
        cosine = torch.nn.functional.cosine_similarity(resumed["W_dec"], whole["W_dec"], dim=1)
        # Measured: min cosine 0.996 / 0.887, mean 0.999 / 0.995, weights within 5.2% / 9.8%
        # (encoder.0 / encoder.1); another seed: mean cosine 0.02.
        assert cosine.min() > 0.85 and cosine.mean() > 0.99, (sae_id, cosine.min(), cosine.mean())
        assert 0 < max(relative_difference(resumed, whole).values()) < 0.15


def test_a_signal_in_a_runners_last_step_stops_before_the_next_runner(
    tiny_model_dir, data, tmp_path, monkeypatch, capsys
):
    """One runner per hook: a signal in the first runner's last step lets it finish (its SAE is
    saved and evaluated), then the run stops; --resume keeps it and trains the second."""
    hooks, out = ("encoder.0.attn_out", HOOK), tmp_path / "out"
    signal_during_step(monkeypatch, STEPS, signal.SIGINT)
    assert main(argv(tiny_model_dir, data, out, "--no-multi-hook", hooks=hooks)) == 130
    assert ours(capsys.readouterr().err)[-1] == (
        "interrupted: train stopped; encoder.0.attn_out finished as the signal came, and the run stopped before its "
        f"next runner; the finished SAEs are in {out}: the same command with --resume continues with the rest."
    )
    assert (out / hooks[0] / "eval_metrics.json").is_file() and not (out / HOOK).exists()
    first = (out / hooks[0] / "sae_weights.safetensors").read_bytes()
    monkeypatch.undo()
    assert main(argv(tiny_model_dir, data, out, "--no-multi-hook", "--resume", hooks=hooks)) == 0
    printed = capsys.readouterr().out
    assert f"resume   {hooks[0]}: finished, kept" in printed and f"resume   {HOOK}: from the start" in printed
    assert (out / hooks[0] / "sae_weights.safetensors").read_bytes() == first
    assert (out / HOOK / "eval_metrics.json").is_file()


def test_resume_keeps_finished_saes_and_refuses_when_there_is_nothing(
    tiny_model_dir, data, uninterrupted, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main(argv(tiny_model_dir, data, out, "--resume")) == 2
    assert ours(capsys.readouterr().err) == [
        f"error: --resume: {str(out)!r} holds no finished SAE and no checkpoint under {str(out / 'checkpoints')!r} "
        "for this run; run without --resume"
    ]
    shutil.copytree(uninterrupted, out)
    assert main([*argv(tiny_model_dir, data, out, "--resume"), "--lr", "1e-3"]) == 2
    assert ours(capsys.readouterr().err) == [
        f"error: --resume: SAE {str(out / HOOK)!r} was trained by another run: lr 0.003 there, 0.001 here"
    ]
    before = (out / HOOK / "sae_weights.safetensors").read_bytes()
    assert main(argv(tiny_model_dir, data, out, "--resume")) == 0
    assert f"resume   {HOOK}: finished, kept" in capsys.readouterr().out
    assert (out / HOOK / "sae_weights.safetensors").read_bytes() == before


# ------------------------------------------------------------- a real process, the lock


def test_a_running_train_holds_its_out_and_stops_on_sigterm_with_a_checkpoint(
    tiny_model_dir, data, tmp_path, capsys
):
    """A CLI subprocess, told SIGTERM after its first periodic checkpoint: exit 143, one line, a
    whole checkpoint. While it runs, a second train into the same --out fails at once."""
    out, log = tmp_path / "out", tmp_path / "train.log"
    cmd = argv(tiny_model_dir, data, out, "--n-checkpoints", "7")
    cmd[cmd.index("--training-tokens") + 1] = str(400 * BATCH)  # long enough to be stopped mid-run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sae_lens_t5gemma.cli.main", *cmd], stderr=fh, stdout=fh, env=env
        )
    try:
        first = out / "checkpoints" / HOOK / str(51 * BATCH)  # SAELens' first threshold: 1/8 of the run
        deadline = time.monotonic() + 120
        while not (first / "t5gemma2_checkpoint.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)

        t = time.perf_counter()
        assert main(argv(tiny_model_dir, data, out)) == 2
        assert time.perf_counter() - t < 5
        lock = lock_path(out)
        info = json.loads(lock.read_text())
        assert ours(capsys.readouterr().err) == [
            f"error: {out}: another train is writing this folder (pid {proc.pid} on {info['host']}, since "
            f"{info['started']}); lock file {lock}. If that process is gone, remove the lock file."
        ]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
        proc.wait()
    lines = ours(log.read_text())
    assert lines[0].startswith("SIGTERM: finishing this step, then saving a checkpoint")
    assert lines[1].startswith(f"terminated (SIGTERM): train stopped; {HOOK} stopped after ")
    saved = [p for p in (out / "checkpoints" / HOOK).iterdir() if p.name != first.name]
    assert len(saved) == 1 and int(saved[0].name) > 51 * BATCH  # the interruption's, beside the periodic one
    record = json.loads((saved[0] / "t5gemma2_checkpoint.json").read_text())
    assert record["n_training_samples"] == int(saved[0].name) and record["sae_ids"] == [HOOK]
    assert lines[1].endswith(f"checkpoint {saved[0]} (SAEs finished earlier stay in {out}). The same command with "
                             "--resume (TrainConfig.resume=True) continues from it.")  # fmt: skip
    assert not lock_path(out).exists()


# ------------------------------------------------------------------------ input bounds


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_data")
    (folder / "special.jsonl").write_text(
        "".join(json.dumps({"tokens": [2, 1, 0, 1] * 10}) + "\n" for _ in range(5))
    )
    (folder / "special.txt").write_text("<bos><eos><pad>\n" * 5)
    (folder / "text5.jsonl").write_text(
        json.dumps({"text": "a fine row"}) + "\n" + json.dumps({"text": 5}) + "\n"
    )
    (folder / "mixed.jsonl").write_text(
        json.dumps({"tokens": list(range(3, 40))}) + "\n" + json.dumps({"text": "x"}) + "\n"
    )
    (folder / "short.jsonl").write_text(
        json.dumps({"tokens": list(range(3, 40))}) + "\n" + json.dumps({"tokens": [5, 6]}) + "\n"
    )
    (folder / "afile").write_text("not a folder")
    return {p.stem if p.suffix != ".txt" else "special_txt": p for p in folder.iterdir()}


@pytest.mark.parametrize(
    "extra, dataset, message",
    [
        (["--context-size", "1"], None, "context_size must be at least 2, got 1 (each row starts with BOS, which "
         "exclude_special_tokens drops, and prefix_lm splits the row in two)"),
        (["--context-size", "3", "--hook", "decoder.1.attn_out"], None, "context_size=3 (p = context_size // 2): the "
         "encoder's SAEs would train on position 0 only, which holds BOS in every row and exclude_special_tokens "
         "drops; use a context_size of at least 4 or prefix_len >= 2"),
        (["--training-tokens", "inf"], None, "argument --training-tokens: not a token count: 'inf' (e.g. 2000000, 2e6, 2M)"),
        (["--training-tokens", "nan"], None, "argument --training-tokens: not a token count: 'nan' (e.g. 2000000, 2e6, 2M)"),
        (["--training-tokens", "1e400"], None, "argument --training-tokens: not a token count: '1e400' (e.g. 2000000, 2e6, 2M)"),
        (["--training-tokens", "-5"], None, "training_tokens must be a positive integer, got -5"),
        (["--lr", "nan"], None, "lr must be a finite number, got nan"),
        (["--lr", "inf"], None, "lr must be a finite number, got inf"),
        (["--lr", "0"], None, "lr must be positive, got 0.0"),
        (["-k", "inf"], None, "k must be a finite number, got inf"),
        (["--architecture", "standard", "--l1", "nan"], None, "l1 must be a finite number, got nan"),
        (["--d-sae", "-3"], None, "d_sae must be a positive integer, got -3"),
        (["--train-batch-size-tokens", "0"], None, "train_batch_size_tokens must be a positive integer, got 0"),
        (["--store-batch-size-prompts", "0"], None, "store_batch_size_prompts must be a positive integer, got 0"),
        (["--eval-every-n-steps", "0"], None, "eval_every_n_steps must be a positive integer, got 0"),
        (["--n-eval-batches", "-1"], None, "n_eval_batches must be a positive integer, got -1"),
        (["--n-checkpoints", "-1"], None, "n_checkpoints must be a whole number >= 0, got -1"),
        (["--seed", "-1"], None, "seed must be a whole number in [0, 2**32), got -1"),
        (["--prefix-len", "0", "--hook", "decoder.1.attn_out"], None, "prefix_len must be a whole number in "
         "[1, context_size - 1] = [1, 31], got 0 (SAELens' seqpos_slice is fixed per run, so a random split cannot train)"),
        (["--max-memory", "nan"], None, "max_memory must be a byte count or a size like '1.5GiB', got 'nan'"),
        (["--architecture", "matryoshka", "--matryoshka-widths", "8,x"], None, "--matryoshka-widths '8,x': expected "
         "whole numbers separated by commas, e.g. 1024,4096,16384"),
        (["--resume", "--overwrite"], None, "resume and overwrite exclude each other: resume continues the run in "
         "out, overwrite starts it over"),
        ([], "special", "Dataset [{special!r}]: the first 5 documents hold only special tokens (ids [0, 1, 2]: "
         "bos/eos/pad...), which exclude_special_tokens drops, so there is nothing to train on"),
        ([], "special_txt", "Dataset [{special_txt!r}]: the first 5 documents hold only special tokens (ids [0, 1, 2]: "
         "bos/eos/pad...), which exclude_special_tokens drops, so there is nothing to train on"),
        ([], "text5", "Dataset file {text5!r} line 2: 'text' must be a string, got 5"),
        ([], "mixed", "Dataset file {mixed!r} line 2: no 'tokens' field, which the dataset's first row has and "
         "SAELens reads from every row"),
        ([], "short", "Dataset file {short!r} line 2: 2 token ids, fewer than context_size=32 (SAELens cuts "
         "pretokenized rows to the context, never packs them)"),
        (["--out", "{afile}/sub"], None, "Output path '{afile}/sub' lies inside {afile!r}, which is a file, not a folder"),
        (["--out", "{afile}"], None, "Output path {afile!r} exists and is not a folder"),
    ],
)  # fmt: skip
def test_bad_input_fails_in_one_line_before_the_model_loads(
    weightless_model, data, bad_data, tmp_path, capsys, extra, dataset, message
):
    """Each hung or failed only after loading (or training) before; now: exit 2, one line."""
    names = {k: str(v) for k, v in bad_data.items()}
    extra = [a.format(**names) for a in extra]
    cmd = argv(weightless_model, bad_data[dataset] if dataset else data, tmp_path / "out")
    t = time.perf_counter()
    try:
        code = main([*cmd, *extra])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    assert time.perf_counter() - t < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message.format(**names)), err
    assert not (tmp_path / "out").exists() and bad_data["afile"].read_text() == "not a folder"
