"""Options that several commands share, each with one spelling and one default, and the help format.

Naming rules of the command line (``tests/cli/test_parser.py`` walks every subcommand and checks them):

- a flag that sets a config field or a library parameter is that name with dashes
  (``--training-tokens`` sets ``TrainConfig.training_tokens``); a repeatable flag is the singular
  of a plural field (``--hook`` adds to ``hooks``); a switch is ``--NAME/--no-NAME``;
- the corpus is ``--dataset`` on every command that reads one;
- ``-k/--top-k`` is the one spelling of "the top k";
- ``--device`` defaults to ``auto`` (cuda if available, else cpu) on every command;
- every option's default shows in ``--help``; an option whose default is computed says how.

Nothing here imports torch at module level: the parser is built on every start-up.
"""

from __future__ import annotations

import argparse
from typing import Any

DEVICE_AUTO = "auto"
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to each option's help, where the default is not None.

    Like :class:`argparse.ArgumentDefaultsHelpFormatter`, but lists render as the command line
    takes them, switches show the flag that is on by default, and plain on/off flags (default
    off) are left alone. An option whose default is None explains its default in its own help.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Some Pythons' BooleanOptionalAction append a raw default of their own: shown our way instead.
        text = (action.help or "").removesuffix(" (default: %(default)s)")
        if text == argparse.SUPPRESS or "default" in text:
            return text
        shown = default_text(action)
        if shown is None:
            return text
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def default_text(action: argparse.Action) -> str | None:
    """How ``--help`` shows an action's default, or None where it shows none."""
    default = action.default
    if default is None or default is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        flag = next(s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-"))
        return flag if default else "--no-" + flag[2:]
    if action.nargs == 0:  # store_true and friends: off unless given
        return None
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default)) if default else "none"
    return str(default)


def add_command(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser with the package's help format, and whole flag names only (an abbreviation
    would stop working, or change meaning, when a flag is added)."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    kwargs.setdefault("allow_abbrev", False)
    return sub.add_parser(name, **kwargs)


def add_device(p: argparse.ArgumentParser, what: str = "the model and the SAEs") -> None:
    """``--device``: the same default on every command (``auto``)."""
    p.add_argument(
        "--device",
        default=DEVICE_AUTO,
        help=f"device for {what}: cpu, cuda, cuda:1, mps, ... or auto = cuda if available, else cpu",
    )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` where torch sees a GPU, else ``cpu``; any other name unchanged."""
    if device != DEVICE_AUTO:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_dtype(
    p: argparse.ArgumentParser, default: str = "float32 on every machine, or SAE_LENS_T5GEMMA_DTYPE where set"
) -> None:
    """``--dtype``: the model's weights dtype, on every analysis command that loads a model."""
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help=f"model weights dtype (default: {default}; auto: bfloat16 where the device runs it natively); "
        "SAEs keep their own dtype",
    )


def add_stand_in(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stand-in",
        action="store_true",
        help="run offline on the embedded synthetic stand-in (tiny random models)",
    )


def add_convention(p: argparse.ArgumentParser, default: str | None = "prefix_lm") -> None:
    p.add_argument(
        "--convention",
        choices=["prefix_lm", "reconstruct"],
        default=default,
        help="how rows feed T5Gemma 2: prefix_lm (the encoder reads the first p tokens, the decoder writes "
        "the rest) or reconstruct (the decoder reads the row the encoder read: a copy task)"
        + ("" if default else " (default: the model's, prefix_lm)"),
    )


def add_prefix_len(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-len", type=int, help="the prefix_lm split p (default: half the context)")


def add_concat_sequences(p: argparse.ArgumentParser) -> None:
    """``--concat-sequences``: SAELens' name (``disable_concat_sequences``) for packing documents into rows."""
    p.add_argument(
        "--concat-sequences",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="pack documents into rows, SAELens' way; --no-concat-sequences keeps one document per row, so "
        "the bidirectional encoder never reads a later, unrelated document",
    )


def add_top_k(
    p: argparse.ArgumentParser, dest: str, what: str, default: int | None = None, type: type = int
) -> None:
    """``-k/--top-k``: the one spelling of "the top k", whatever field it sets (``dest``)."""
    p.add_argument("-k", "--top-k", dest=dest, type=type, default=default, help=what)
