"""The command line's names (issue 20): every subcommand's options walked and checked against the
naming rules of :mod:`sae_lens_t5gemma.cli.options`.

- each option's ``dest`` is the config field or library parameter it sets (``TrainConfig``,
  ``StatsConfig``, ``compare``/``standard_pairs``, ``diagnose_release``, ``run_dashboard``, ...),
  and its flag is that name with dashes, but for a short list of names the command line shares
  across commands (``--dataset``, ``--model``, ``--out``, ``--stand-in``, ``--concat-sequences``);
- one corpus flag (``--dataset``), one ``-k/--top-k``, no old spelling left;
- ``--device`` defaults to ``auto`` everywhere; every default shows in ``--help`` and equals the
  library's own default;
- ``train``'s flags land in the TrainConfig fields of their names (parsed, not trained).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest
import torch

from sae_lens_t5gemma.analysis.diagnose import diagnose_release
from sae_lens_t5gemma.analysis.stats_state import StatsConfig
from sae_lens_t5gemma.cli import training as train_cli
from sae_lens_t5gemma.cli.main import build_parser
from sae_lens_t5gemma.cli.options import default_text, resolve_device
from sae_lens_t5gemma.comparison.suite import compare, standard_pairs
from sae_lens_t5gemma.dashboard.pages import run_dashboard, run_find_features
from sae_lens_t5gemma.loading.convert import convert_snapshot
from sae_lens_t5gemma.loading.inspection import describe_sae
from sae_lens_t5gemma.training import PRESETS, TrainConfig, run_training


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _parameters(*targets: object) -> dict[str, object]:
    """Name -> default (``inspect.Parameter.empty`` where none) of functions and dataclasses."""
    names: dict[str, object] = {}
    for t in targets:
        if dataclasses.is_dataclass(t):
            for f in dataclasses.fields(t):
                names[f.name] = f.default
        else:
            names.update({n: p.default for n, p in inspect.signature(t).parameters.items()})
    return names


SUBCOMMANDS = _subcommands()

# What each command's options set.
TARGETS = {
    "train": (TrainConfig, run_training),
    "compare": (compare, standard_pairs),
    "diagnose": (diagnose_release,),
    "dashboard": (StatsConfig, run_dashboard),
    "find-features": (run_find_features,),
    "inspect": (describe_sae,),
    "convert": (convert_snapshot,),
}
# Command-line names that one library function spells otherwise, so that the command line
# keeps one name per concept across its commands: dest -> the parameter it sets.
SHARED_NAMES = {
    "compare": {"dataset": "texts", "out": "out_dir", "stand_in": "synthetic", "concat_sequences": "pack"},
    "diagnose": {"dataset": "texts", "stand_in": "synthetic"},
    "train": {"concat_sequences": "disable_concat_sequences"},
}
# Flags spelled otherwise than their dest: ``--model`` on every command, ``--with/--without`` files.
SPELLINGS = {"model_name": "--model", "with_file": "--with", "without_file": "--without"}
OLD_SPELLINGS = {
    "--k", "--texts", "--tokens", "--one-pass-per-hook", "--pack", "--batch-tokens", "--store-batch",
    "--eval-every", "--eval-batches", "--checkpoints", "--no-pack",
}  # fmt: skip


def test_every_command_is_covered():
    assert set(SUBCOMMANDS) == {*TARGETS, "list", "demo"}


@pytest.mark.parametrize("command", sorted(TARGETS))
def test_each_flag_sets_the_field_of_its_name(command):
    names = _parameters(*TARGETS[command])
    shared = SHARED_NAMES.get(command, {})
    for action in _options(SUBCOMMANDS[command]):
        target = shared.get(action.dest, action.dest)
        assert target in names, f"{command} {action.option_strings}: sets no field or parameter {target!r}"
        expected = SPELLINGS.get(action.dest, "--" + action.dest.replace("_", "-"))
        if isinstance(action, argparse._AppendAction) and expected.endswith("s"):
            expected = expected[:-1]  # repeatable: --hook adds to hooks
        if action.dest == "k":
            expected = "-k"
        assert expected in action.option_strings, f"{command}: {action.option_strings} for {action.dest!r}"
        if isinstance(action, argparse.BooleanOptionalAction):
            assert action.option_strings == [expected, "--no-" + expected[2:]]


@pytest.mark.parametrize("command", sorted(TARGETS))
def test_cli_defaults_are_the_library_defaults(command):
    """A default the command line shows is the one the library would use (``--device auto`` aside)."""
    names = _parameters(*TARGETS[command])
    shared = SHARED_NAMES.get(command, {})
    checked = 0
    for action in SUBCOMMANDS[command]._actions:
        target = shared.get(action.dest, action.dest)
        library = names.get(target, inspect.Parameter.empty)
        if action.default is None or action.dest == "device" or library in (inspect.Parameter.empty, None):
            continue
        if library is dataclasses.MISSING:
            continue
        value = list(library) if isinstance(library, tuple) else library
        assert action.default == value, (
            f"{command} {action.dest}: CLI {action.default!r}, library {library!r}"
        )
        checked += 1
    assert checked >= {"compare": 10, "dashboard": 6, "convert": 2, "diagnose": 4, "find-features": 1}.get(
        command, 0
    )


def test_no_old_spelling_and_one_k():
    for command, p in SUBCOMMANDS.items():
        for action in _options(p):
            assert not OLD_SPELLINGS & set(action.option_strings), (command, action.option_strings)
            if {"-k", "--top-k"} & set(action.option_strings):
                assert action.option_strings == ["-k", "--top-k"], (command, action.option_strings)
    with_k = {c for c, p in SUBCOMMANDS.items() if any("-k" in a.option_strings for a in _options(p))}
    assert with_k == {"train", "dashboard", "find-features"}


def test_one_corpus_flag():
    for command in ("train", "compare", "diagnose", "dashboard"):
        assert any("--dataset" in a.option_strings for a in _options(SUBCOMMANDS[command])), command


def test_device_defaults_to_auto_everywhere():
    with_device = {}
    for command, p in SUBCOMMANDS.items():
        for action in _options(p):
            if action.dest == "device":
                with_device[command] = action.default
    assert with_device == dict.fromkeys(set(SUBCOMMANDS) - {"list", "convert"}, "auto")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_defaults_show_in_help(command):
    p = SUBCOMMANDS[command]
    formatter = p._get_formatter()
    for action in _options(p) + [a for a in p._actions if not a.option_strings and a.default is not None]:
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction) or action.required:
            continue  # plain on/off flags are off unless given
        text = formatter._get_help_string(action)
        assert "default" in text, f"{command} {action.option_strings or action.dest}: {text!r}"
        shown = default_text(action)
        if shown is not None and "%(default)" not in text and "(default:" in text and command != "train":
            assert f"(default: {shown.replace('%', '%%')})" in text or "default:" in action.help, (
                command,
                text,
            )
    p.format_help()  # the whole page renders


def test_train_help_shows_each_presets_values():
    p = SUBCOMMANDS["train"]
    by_dest = {a.dest: a for a in _options(p)}
    formatter = p._get_formatter()
    recommended, mindchain = PRESETS["recommended"](), PRESETS["mindchain"]()
    help_d_sae = formatter._get_help_string(by_dest["d_sae"])
    assert help_d_sae.endswith(
        f"(default: {recommended['d_sae']} with --preset recommended, {mindchain['d_sae']} with --preset mindchain)"
    )
    assert formatter._get_help_string(by_dest["concat_sequences"]).endswith(
        "(default: --no-concat-sequences)"
    )
    assert formatter._get_help_string(by_dest["multi_hook"]).endswith("(default: --multi-hook)")
    assert formatter._get_help_string(by_dest["seed"]).endswith(f"(default: {TrainConfig.seed})")
    assert "--no-autocast" not in formatter._get_help_string(by_dest["autocast"])


def test_train_help_defaults_are_the_presets():
    """``train --help`` shows SHOWN_DEFAULTS (the parser does not import TrainConfig): each entry is what
    TrainConfig.from_preset gives for every preset, and every field option left at None has one."""
    for preset in train_cli.PRESETS:
        try:
            values = TrainConfig.from_preset(preset, model="-", dataset="-").to_dict()
        except ValueError:  # the preset sets no hooks
            values = {
                **TrainConfig.from_preset(preset, model="-", dataset="-", hooks=["-"]).to_dict(),
                "hooks": None,
            }
        for field, shown in train_cli.SHOWN_DEFAULTS.items():
            assert (shown[preset] if isinstance(shown, dict) else shown) == values[field], (preset, field)
    explained = {"model", "dataset", "preset", "cache_dir", "max_memory", "matryoshka_widths", "model_dtype",
                 "prefix_len", "device"}  # fmt: skip
    for action in _options(SUBCOMMANDS["train"]):
        field = train_cli.NEGATED.get(action.dest, action.dest)
        if action.default is None and action.nargs != 0 or isinstance(action, argparse.BooleanOptionalAction):
            assert field in train_cli.SHOWN_DEFAULTS or field in explained, field


def _train_config(*argv: str) -> TrainConfig:
    a = build_parser().parse_args(["train", "m", "--dataset", "d.txt", "--hook", "encoder.1.attn_out", *argv])
    return TrainConfig.from_preset(a.preset, **train_cli.config_fields(a))


def test_train_flags_land_in_their_fields():
    cfg = _train_config(
        "--training-tokens", "12.8k", "-k", "8", "--train-batch-size-tokens", "256",
        "--store-batch-size-prompts", "4", "--eval-every-n-steps", "50", "--n-eval-batches", "2",
        "--n-checkpoints", "3", "--no-multi-hook", "--concat-sequences", "--model-dtype", "float16",
        "--matryoshka-widths", "64,128", "--device", "cpu", "--seed", "7", "--resume",
    )  # fmt: skip
    assert (cfg.training_tokens, cfg.k, cfg.train_batch_size_tokens, cfg.store_batch_size_prompts) == (
        12800,
        8,
        256,
        4,
    )
    assert (cfg.eval_every_n_steps, cfg.n_eval_batches, cfg.n_checkpoints) == (50, 2, 3)
    assert (cfg.multi_hook, cfg.disable_concat_sequences, cfg.model_dtype) == (False, False, "float16")
    assert (cfg.matryoshka_widths, cfg.device, cfg.seed, cfg.resume) == ([64, 128], "cpu", 7, True)
    assert (cfg.model, cfg.hooks, cfg.dataset, cfg.preset) == (
        "m",
        ["encoder.1.attn_out"],
        "d.txt",
        "recommended",
    )
    # Left out: the preset's values (and TrainConfig's), not the command line's.
    plain = _train_config("--preset", "mindchain")
    mindchain = PRESETS["mindchain"]()
    assert (plain.d_sae, plain.lr, plain.training_tokens) == (
        mindchain["d_sae"],
        mindchain["lr"],
        mindchain["training_tokens"],
    )
    assert (plain.multi_hook, plain.disable_concat_sequences, plain.overwrite, plain.out) == (
        True,
        True,
        False,
        "out/saes",
    )
    assert plain.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _train_config("--no-concat-sequences").disable_concat_sequences is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--training-tokens", "nan"], "argument --training-tokens: not a token count: 'nan'"),
        (["--tokens", "5"], "unrecognized arguments: --tokens 5"),
        (["--pack"], "unrecognized arguments: --pack"),
        (["--one-pass-per-hook"], "unrecognized arguments: --one-pass-per-hook"),
        (["--eval-every", "5"], "unrecognized arguments: --eval-every 5"),  # no abbreviations
    ],
)
def test_train_refuses_old_and_bad_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "m", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
