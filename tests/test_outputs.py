"""Output folders of ``dashboard``, ``compare`` and the Neuronpedia export (issue 22).

Covers: atomic writes (exclusive random temp names, nothing left on failure, a symlink at the
target refused and its target untouched); a folder holding one run's files only (an earlier
run's pages, ``batch-1.json`` of a wider SAE and plots removed; files the package did not
write, or that changed since, kept; a killed run's files cleaned by the next run); the lock
(a second writer fails at once, before any work); a symlink in ``stats/`` refused; strict
Neuronpedia JSON (Inf/NaN refused naming feature and field, and rejected by
``validate_batch``); NaN features reported as non-finite, not dead; arguments of
``dashboard``, ``compare`` and ``find-features`` checked before any work, with one-line
errors; bad UTF-8 in ``--texts``/``--with`` named by file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sae_lens_t5gemma.outputs as outputs_module
from sae_lens_t5gemma.analysis import feature_stats as F
from sae_lens_t5gemma.analysis import stats_state as S
from sae_lens_t5gemma.cli import main as cli
from sae_lens_t5gemma.comparison import models as M
from sae_lens_t5gemma.comparison import suite as C
from sae_lens_t5gemma.dashboard import neuronpedia as N
from sae_lens_t5gemma.dashboard import pages as D
from sae_lens_t5gemma.dashboard.checks import nonfinite_features
from sae_lens_t5gemma.outputs import (
    OUTPUTS_JOURNAL,
    OUTPUTS_MANIFEST,
    OutputLockedError,
    OutputPathError,
    atomic_write,
    lock_path,
    owned_outputs,
)
from sae_lens_t5gemma.stand_in import synthetic as synthetic

TEXTS = synthetic.stand_in_texts()
CFG = S.StatsConfig(top_k=4, n_samples=4, left=3, right=2, context_size=24, batch_size=8, chunk_rows=16)
DEC = "decoder_blocks.1.self_attn.hook_out"


def make_sae(d_sae: int = 32, seed: int = 0, bias: float = -0.08):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=64, d_sae=d_sae, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = DEC
    cfg.metadata.model_name = "tiny"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.fill_(bias)
    return sae


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from sae_lens_t5gemma.model.hooked import load_t5gemma2

    return load_t5gemma2(tiny_model_dir)


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()
    )


# ------------------------------------------------------------------------ atomic writes


def test_atomic_write_refuses_a_symlink_and_leaves_nothing_on_failure(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "page.html").symlink_to(victim)
    with pytest.raises(OutputPathError) as e:
        atomic_write(out / "page.html", "overwritten")
    assert str(e.value) == (
        f"{out / 'page.html'}: is a symlink (to {victim}); the package does not write through links. "
        "Remove it or choose another output folder"
    )
    assert victim.read_text() == "keep me"
    atomic_write(out / "a.json", "old")

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(out / "a.json", broken)
    assert (out / "a.json").read_text() == "old"  # the earlier file, whole
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "page.html"]  # no temp file left


def test_temp_names_are_random_and_exclusive(tmp_path, monkeypatch):
    seen = []
    real_open = os.open

    def spy(path, flags, *args):
        if str(path).endswith(".tmp"):
            seen.append((Path(path).name, flags))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", spy)
    for _ in range(3):
        atomic_write(tmp_path / "stats.json", "{}")
    names = [n for n, _ in seen]
    assert len(set(names)) == 3 and all(n.startswith(".stats.json.") for n in names)
    assert all(f & os.O_EXCL and f & os.O_CREAT and f & os.O_NOFOLLOW for _, f in seen)


# ------------------------------------------------------------------- one run's files only


def test_a_run_removes_what_earlier_runs_wrote_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    with owned_outputs(out, "dashboard") as run:
        for name in ("index.html", "feature_1.html", "feature_298.html", "neuronpedia/batch-1.json"):
            run.write(out / name, name)
    (out / "notes.txt").write_text("mine")  # not the package's
    (out / "feature_1.html").write_text("edited by hand")  # changed since the package wrote it
    with (
        pytest.warns(
            UserWarning, match="feature_1.html: written by an earlier dashboard run and changed since"
        ),
        owned_outputs(out, "dashboard") as run,
    ):
        run.write(out / "index.html", "new index")
        run.write(out / "feature_2.html", "2")
    assert _files(out) == [OUTPUTS_MANIFEST, "feature_1.html", "feature_2.html", "index.html", "notes.txt"]
    assert sorted(p.name for p in run.removed) == ["batch-1.json", "feature_298.html"]
    assert json.loads((out / OUTPUTS_MANIFEST).read_text())["files"].keys() == {
        "feature_2.html",
        "index.html",
    }


def test_a_killed_runs_files_are_cleaned_by_the_next_run(tmp_path):
    """The journal lists each file before it is written: a run killed with -9 leaves it behind."""
    out = tmp_path / "out"
    # The module alone (no package import, which registers into SAELens): a fast child process.
    script = (
        "import importlib.util, os\nfrom pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('outputs', {outputs_module.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"out = Path({str(out)!r})\n"
        "with m.owned_outputs(out, 'compare') as run:\n"
        "    run.write(out / 'old_plot.png', b'png')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    assert (out / "old_plot.png").exists() and (out / OUTPUTS_JOURNAL).read_text() == "old_plot.png\n"
    with pytest.warns(UserWarning, match="removing a stale lock"), owned_outputs(out, "compare") as run:
        run.write(out / "report.md", "# new")
    assert _files(out) == [OUTPUTS_MANIFEST, "report.md"]


def test_a_failed_run_removes_nothing_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    with owned_outputs(out, "compare") as run:
        run.write(out / "a.png", b"a")
    with pytest.raises(RuntimeError), owned_outputs(out, "compare") as run:
        run.write(out / "b.png", b"b")
        raise RuntimeError("evaluation failed")
    assert _files(out) == [OUTPUTS_MANIFEST, "a.png", "b.png"]  # nothing removed on failure
    with owned_outputs(out, "compare") as run:
        run.write(out / "c.png", b"c")
    assert _files(out) == [OUTPUTS_MANIFEST, "c.png"]
    # A run that fails before writing anything into a new folder leaves no folder behind.
    with pytest.raises(ValueError), owned_outputs(tmp_path / "new", "compare"):
        raise ValueError("bad pair")
    assert not (tmp_path / "new").exists()


def test_a_manifest_cannot_point_outside_the_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    import hashlib

    digest = hashlib.sha256(b"x").hexdigest()
    files = {"../outside.txt": digest, str(outside): digest}
    (out / OUTPUTS_MANIFEST).write_text(json.dumps({"files": files}))
    with owned_outputs(out, "compare") as run:
        run.write(out / "a.png", b"a")
    assert outside.read_text() == "x"


# ------------------------------------------------------------------------------ dashboard


def _dashboard_argv(tmp_path: Path, tiny_model_dir: Path, sae_dir: Path, *extra: str) -> list[str]:
    data = tmp_path / "corpus.txt"
    if not data.exists():
        data.write_text("\n".join(TEXTS[:16]) + "\n")
    return ["dashboard", str(sae_dir), "--dataset", str(data), "--model", str(tiny_model_dir), "--out",
            str(tmp_path / "d"), "--context-size", "24", "--top-k", "3", *extra]  # fmt: skip


def test_dashboard_overwrite_leaves_only_this_runs_files(tmp_path, tiny_model_dir, capsys):
    """The issue's case: a 300-wide SAE's export (batch-0..2) and pages, then a 32-wide SAE with
    --overwrite: no batch-1.json with indices up to 299 beside the 32-wide SAE, no old page."""
    make_sae(300, seed=1, bias=1.0).save_model(tmp_path / "wide")  # every feature fires
    make_sae(32, seed=2).save_model(tmp_path / "narrow")
    assert (
        cli.main(_dashboard_argv(tmp_path, tiny_model_dir, tmp_path / "wide", "--features", "7", "250")) == 0
    )
    out = tmp_path / "d"
    first = json.loads((out / "neuronpedia" / "batch-1.json").read_text())
    assert max(f["feature_index"] for f in first["features"]) > 128
    (out / "my_notes.md").write_text("not the package's")
    argv = _dashboard_argv(
        tmp_path, tiny_model_dir, tmp_path / "narrow", "--features", "2", "5", "--overwrite"
    )
    assert cli.main(argv) == 0, capsys.readouterr().err
    top = sorted(p.name for p in out.iterdir() if p.is_file())
    assert top == [OUTPUTS_MANIFEST, "feature_2.html", "feature_5.html", "index.html", "my_notes.md"]
    assert sorted(p.name for p in (out / "neuronpedia").iterdir()) == [
        "batch-0.json", "run_settings.json", "skipped_indexes.json", "t5gemma2.json"
    ]  # fmt: skip
    batch = json.loads((out / "neuronpedia" / "batch-0.json").read_text())
    assert max(f["feature_index"] for f in batch["features"]) < 32
    # --no-neuronpedia: the earlier export goes too (it would describe another run).
    argv = _dashboard_argv(tmp_path, tiny_model_dir, tmp_path / "narrow", "--features", "2", "--overwrite",
                           "--no-neuronpedia")  # fmt: skip
    assert cli.main(argv) == 0
    assert not (out / "neuronpedia").exists() and not (out / "feature_5.html").exists()
    assert (out / "my_notes.md").read_text() == "not the package's"


def test_dashboard_refuses_a_symlink_in_its_stats_folder(tmp_path, tiny_model_dir, capsys):
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    make_sae(32).save_model(tmp_path / "sae")
    stats = tmp_path / "d" / "stats"
    stats.mkdir(parents=True)
    (stats / "stats.json.tmp").symlink_to(victim)
    assert cli.main(_dashboard_argv(tmp_path, tiny_model_dir, tmp_path / "sae")) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {stats / 'stats.json.tmp'}: is a symlink (to {victim}); the package does not write through "
        "links. Remove it or choose another output folder\n"
    )
    assert victim.read_text() == "precious"
    assert _files(stats) == ["stats.json.tmp"]


def test_second_dashboard_into_a_locked_folder_fails_at_once(tmp_path, tiny_model_dir, capsys):
    make_sae(32).save_model(tmp_path / "sae")
    out = tmp_path / "d"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(out).write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "then"})
        )
        t = time.perf_counter()
        with pytest.raises(OutputLockedError) as e:
            D.run_dashboard(
                str(tmp_path / "sae"), out, tmp_path / "nothing.txt", model_name=str(tiny_model_dir)
            )
        assert time.perf_counter() - t < 1
        assert str(e.value) == (
            f"{out}: another dashboard is writing this folder (pid {holder.pid} on {os.uname().nodename}, "
            f"since then); lock file {lock_path(out)}. If that process is gone, remove the lock file."
        )
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--features", "999"], "error: Feature 999 out of range: SAE {sae} has 32 features (0-31)\n"),
        (["--features", "-1"], "error: Feature -1: feature indices are integers >= 0\n"),
        (["--n-features", "0"], "error: n_features (--n-features) must be a positive integer, got 0\n"),
        (["--max-rows", "-5"], "error: max_rows (--max-rows) must be a positive integer, got -5\n"),
    ],
)
def test_dashboard_arguments_fail_before_the_corpus_pass(tmp_path, tiny_model_dir, capsys, monkeypatch, extra,
                                                         message):  # fmt: skip
    make_sae(32).save_model(tmp_path / "sae")

    def no_pass(*a, **k):
        raise AssertionError("the corpus pass ran")

    monkeypatch.setattr(F, "corpus_stats", no_pass)
    assert cli.main(_dashboard_argv(tmp_path, tiny_model_dir, tmp_path / "sae", *extra)) == 2
    assert capsys.readouterr().err == message.format(sae=tmp_path / "sae")
    assert not (tmp_path / "d").exists()


# -------------------------------------------------------------------- non-finite values


@pytest.fixture(scope="module")
def broken_stats(model):
    """Statistics of an SAE whose feature 3 is +Inf and feature 5 NaN wherever the decoder reads."""
    sae = make_sae(32, seed=4)
    with torch.no_grad():
        sae.b_enc[3] = float("inf")
        sae.b_enc[5] = float("nan")
    return sae, F.corpus_stats(model, {"dec": sae}, texts=TEXTS[:8], config=CFG, progress=False)


def test_neuronpedia_export_refuses_inf_and_nan_naming_feature_and_field(model, broken_stats, tmp_path):
    sae, stats = broken_stats
    assert nonfinite_features(stats, "dec") == [3, 5]
    with pytest.raises(N.NonFiniteError) as e:
        N.export_neuronpedia(model, sae, stats, tmp_path / "np", key="dec")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        "Neuronpedia export of 'dec': feature 3 field activations.values holds non-finite activations (max inf, "
    )
    assert "2 such features: [3, 5]" in message
    assert not (tmp_path / "np").exists()  # refused before anything is written
    with pytest.raises(N.NonFiniteError, match="feature 5 field activations.values .*max nan"):
        N.export_neuronpedia(model, sae, stats, tmp_path / "np", key="dec", features=[0, 5])
    # Finite features export as strict JSON.
    (path,) = N.export_neuronpedia(model, sae, stats, tmp_path / "np", key="dec", features=[0, 1])
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    N.validate_batch(json.loads(text))


def test_validator_rejects_infinity_and_nan(model, broken_stats, tmp_path):
    sae, stats = broken_stats
    density = stats.density("dec")
    density[[3, 5]] = -1
    densest = int(density.argmax())  # the densest finite feature
    (path,) = N.export_neuronpedia(model, sae, stats, tmp_path, key="dec", features=[densest])
    text = path.read_text()
    batch = json.loads(text)
    batch["features"][0]["activations"][0]["values"][1] = float("inf")
    # What the export wrote before: `Infinity`, which JavaScript's JSON.parse rejects.
    reread = json.loads(json.dumps(batch))
    with pytest.raises(ValueError) as e:
        N.validate_batch(reread)
    assert str(e.value) == (
        "batch.features[0].activations[0].values[1]: inf is not a finite number (strict JSON has no NaN/Infinity)"
    )
    batch = json.loads(text)
    batch["features"][0]["pos_values"][0] = float("nan")
    with pytest.raises(ValueError, match=r"^batch.features\[0\].pos_values\[0\]: nan is not a finite number"):
        N.validate_batch(batch)


def test_nan_features_are_reported_non_finite_not_dead(model, broken_stats, tmp_path):
    sae, stats = broken_stats
    assert float(stats.density("dec")[5]) == 0.0  # a NaN never fires...
    dead = int((stats.density("dec") == 0).sum())
    index = D.write_dashboard(model, sae, stats, tmp_path / "d", [0], key="dec", progress=False).read_text()
    assert f"<td>{dead - 1} of 32 features never fired</td>" in index  # ...but is not dead
    assert "<b>2 features with NaN/Inf activations</b> (broken, not dead): 3, 5" in index


def test_dashboard_refuses_a_non_finite_sae_before_any_page(model, tmp_path, tiny_model_dir, capsys):
    """A SAELens folder with a NaN weight is refused when it loads (naming the file and the
    tensor), before the corpus pass and before any page: the export never sees NaN activations
    from it. (NaN/Inf activations from finite weights: the export's own tests above.)"""
    sae = make_sae(32, seed=4)
    with torch.no_grad():
        sae.b_enc[5] = float("nan")
    sae.save_model(tmp_path / "sae")
    assert cli.main(_dashboard_argv(tmp_path, tiny_model_dir, tmp_path / "sae")) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert (
        err.startswith("error: ")
        and "sae_weights.safetensors: tensor b_enc holds 1 NaN and 0 Inf values" in err
    )
    assert not list((tmp_path / "d").glob("*.html"))


# -------------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def gemma_hub(hub_cache):
    synthetic.write_gemma3_stand_in_hub(hub_cache)
    return hub_cache


def _compare_argv(out: Path, *extra: str) -> list[str]:
    return ["compare", "--pair", "t5gemma2-270m-attn_out:encoder/layer_1", "--context-size", "16",
            "--n-batches", "1", "--out", str(out), *extra]  # fmt: skip


def test_compare_into_a_used_folder_keeps_only_this_runs_files(gemma_hub, tmp_path, capsys):
    out = tmp_path / "out"
    transfer = (
        f"sae=gemma-scope-2-270m-pt-res-all:layer_1_width_16k_l0_small,model={synthetic.T5GEMMA2_MODEL},"
    )
    transfer += "hook=encoder_blocks.1.hook_resid_post"
    assert cli.main(_compare_argv(out, "--pair", transfer, "--convention", "reconstruct")) == 0
    first = set(_files(out))
    assert {"transfer_by_layer.png", "norm_ratio_by_layer.png"} <= first
    (out / "draft.md").write_text("mine")
    assert cli.main(_compare_argv(out)) == 0, capsys.readouterr().err
    second = set(_files(out))
    assert not second & {
        "transfer_by_layer.png",
        "norm_ratio_by_layer.png",
        "transfer_encoder_vs_decoder.png",
    }
    data = json.loads((out / "results.json").read_text())
    assert [r["sae"] for r in data["rows"]] == ["t5gemma2-270m-attn_out:encoder/layer_1"]
    written = set(json.loads((out / OUTPUTS_MANIFEST).read_text())["files"])
    assert second == written | {OUTPUTS_MANIFEST, "draft.md"}
    assert not list(tmp_path.glob(".*lock"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "error: batch_size (--batch-size) must be an integer >= 1, got 0\n"),
        (["--n-batches", "-1"], "error: n_batches (--n-batches) must be an integer >= 1, got -1\n"),
        (["--context-size", "1"], "error: context_size (--context-size) must be an integer >= 2, got 1\n"),
        (["--context-size", "0"], "error: context_size (--context-size) must be an integer >= 2, got 0\n"),
        (
            ["--prefix-len", "16"],
            "error: prefix_len (--prefix-len) must be below context_size (16) to leave a "
            "continuation, got 16\n",
        ),  # fmt: skip
        (
            ["--dense-threshold", "nan"],
            "error: dense_threshold (--dense-threshold) must be a fraction in [0, 1], got nan\n",
        ),  # fmt: skip
        (["--min-fires", "0"], "error: min_fires (--min-fires) must be an integer >= 1, got 0\n"),
        (["--layers", "-2"], "error: layers (--layers): -2 is not a layer index (an integer >= 0).\n"),
    ],
)
def test_compare_numbers_are_checked_up_front(tmp_path, capsys, monkeypatch, extra, message):
    def no_hub(*a, **k):
        raise AssertionError("the stand-in hub was built")

    monkeypatch.setattr(M, "stand_in_hub", no_hub)
    assert cli.main([*_compare_argv(tmp_path / "out", "--stand-in"), *extra]) == 2
    assert capsys.readouterr().err == message
    assert not (tmp_path / "out").exists()


def test_library_compare_checks_numbers_first(tmp_path):
    with pytest.raises(ValueError, match=r"^batch_size \(--batch-size\) must be an integer >= 1, got 0$"):
        C.compare(["no-such-release:x"], out_dir=tmp_path / "out", batch_size=0)
    with pytest.raises(ValueError, match=r"^top_k \(--top-k\) must be an integer >= 1, got 0$"):
        C.compare(["no-such-release:x"], out_dir=tmp_path / "out", top_k=0)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- texts and k


def test_bad_utf8_is_named_by_file(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    good = tmp_path / "good.txt"
    good.write_text("a text\n")
    assert cli.main(["compare", "--layers", "1", "--dataset", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: Texts file {bad} is not UTF-8 text (invalid continuation byte at byte 3).\n"
    )
    for argv in (["--with", str(bad), "--without", str(good)], ["--with", str(good), "--without", str(bad)]):
        assert cli.main(["find-features", "some-sae", *argv]) == 2
        assert capsys.readouterr().err == (
            f"error: Texts file {bad} is not UTF-8 text (invalid continuation byte at byte 3).\n"
        )


def test_find_features_k_is_checked_first(tmp_path, capsys):
    assert cli.main(["find-features", "some-sae", "--with", "a", "--without", "b", "-k", "0"]) == 2
    assert capsys.readouterr().err == "error: k (-k) must be a positive integer, got 0\n"
