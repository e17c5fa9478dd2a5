"""``sae-lens-t5gemma``: a thin command line over the library.

This module assembles the parser from one module per product (:mod:`~sae_lens_t5gemma.cli.loading`:
list, inspect, convert; :mod:`~sae_lens_t5gemma.cli.training`: train;
:mod:`~sae_lens_t5gemma.cli.comparison`: compare, diagnose; :mod:`~sae_lens_t5gemma.cli.dashboard`:
dashboard, find-features; :mod:`~sae_lens_t5gemma.cli.demo`: demo), runs the chosen command, and
turns errors and interruptions into one line and an exit code. The options several commands share,
and the naming rules, live in :mod:`~sae_lens_t5gemma.cli.options`.

Each subcommand parses its arguments and calls one library function, which the tests call
directly. Heavy imports (torch, SAELens) happen inside each subcommand's ``run``, and the console
entry (``sae_lens_t5gemma_cli``) imports the package without registering it with SAELens, so
``--help``, ``list`` and argument errors answer at once. :func:`main` registers before running any
command not marked ``light``.
"""

from __future__ import annotations

import argparse
import sys

from sae_lens_t5gemma.cli import comparison, dashboard, demo, loading, training
from sae_lens_t5gemma.cli.options import HelpFormatter

# In the order ``--help`` lists them.
COMMAND_MODULES = (loading, training, comparison, dashboard, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-t5gemma",
        description="T5Gemma 2 for SAELens: list, inspect and convert the mindchain SAEs; train, compare, "
        "diagnose, dashboard, find-features, demo. --device defaults to auto (cuda if available, else cpu) "
        "on every command.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _interrupted_line(args: argparse.Namespace, e: BaseException | None = None) -> str:
    """What an interruption leaves behind, per subcommand, and how to go on."""
    command = getattr(args, "command", "?")
    if command == "convert":
        return (
            f"interrupted: convert stopped; {args.out_dir} is as it was before the run "
            "(the staged output was removed). Rerun the same command."
        )
    if command == "train":
        describe = getattr(e, "describe", None)  # training.TrainingInterrupted: what was saved
        if describe is not None:
            return f"interrupted: train stopped; {describe()}"
        from pathlib import Path

        out = Path(args.out or training.SHOWN_DEFAULTS["out"])
        kept = (out / "checkpoints").is_dir() or any(out.glob("*/eval_metrics.json"))
        return "interrupted: train stopped outside the training loop; " + (
            f"the finished SAEs and checkpoints in {out} are kept: the same command with --resume continues."
            if kept
            else f"nothing was saved in {out}: rerun the same command."
        )
    return f"interrupted: {command} stopped before finishing; rerun the same command."


def _error_line(e: BaseException) -> str:
    """One line for an error, naming the file where the exception knows it."""
    if isinstance(e, KeyError):
        text = f"missing key {e}"
    elif isinstance(e, RecursionError):
        text = "input nested too deeply (RecursionError)"
    else:
        text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError):
        if e.filename is not None and e.strerror:
            text = f"{e.filename}: {e.strerror}" + (
                f" (and {e.filename2})" if e.filename2 is not None else ""
            )
        if e.errno is not None and not isinstance(e, (FileNotFoundError, FileExistsError)):
            text = f"{text} ({type(e).__name__})"
    elif isinstance(e, UnicodeDecodeError):
        text = f"not UTF-8 text ({e.reason} at byte {e.start})"
    elif isinstance(e, (RuntimeError, NotImplementedError)) and type(e).__name__ not in text:
        text = f"{type(e).__name__}: {text}"
    if isinstance(e, ValueError) and not isinstance(e, UnicodeDecodeError):
        return text  # the package's own messages (a multi-line list of invalid files stays readable)
    # Others (the last words of torch, the OS, ...) become one line.
    one = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    return one if len(one) <= 1000 else one[:1000] + " ..."


def _rank() -> int | None:
    """This process's rank under ``torchrun`` (None in one process, or if torchrun's variables are unreadable)."""
    import os

    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except (KeyError, ValueError):
        return None


def _job_line(e: BaseException, line: str) -> str:
    """Under ``torchrun``: a rank's own error names the rank; a rank stopped by another's failure
    says so in one line (the failing rank reports the real error, once)."""
    rank = _rank()
    if rank is None:
        return line
    from sae_lens_t5gemma.training import distributed

    peer = distributed.peer_failure_line(e, distributed.from_environment())
    return peer if peer is not None else f"rank {rank}: {line}"


def _leave_together(e: BaseException) -> None:
    """Under ``torchrun``, after a stop every rank agreed on (a checkpoint saved, or a runner
    finished), every rank waits for the others before it exits: torchrun stops the whole job as
    soon as one rank exits with a failure code (an interrupted run's 130/143). After a stop of
    this rank alone there is nobody to wait for: torchrun takes the others down."""
    agreed = getattr(e, "checkpoint", None) is not None or getattr(e, "finished", False)
    if _rank() is None or not agreed:
        return
    import contextlib

    from sae_lens_t5gemma.training import distributed

    with contextlib.suppress(RuntimeError):  # another rank is gone already
        distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Errors end in one ``error: ...`` line (exit 2 for bad input, 1 otherwise), Ctrl-C
    (or SAELens' ``InterruptedException``) in one line and exit 130, SIGTERM in 143 (also
    when ``train`` stops on it after saving a checkpoint).
    """
    import signal
    import threading

    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if not getattr(args, "light", False):
            from sae_lens_t5gemma.loading.registration import register

            register()  # idempotent; the console entry defers it from import to here
        args.func(args)
    except (KeyboardInterrupt, _Terminated) as e:
        # train raises TrainingInterrupted (a KeyboardInterrupt) with the signal that stopped it.
        signum = getattr(e, "signum", signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
        line = _interrupted_line(args, e)
        if signum == signal.SIGTERM:
            line = line.replace("interrupted:", "terminated (SIGTERM):", 1)
        if not _rank():  # under torchrun, rank 0 speaks for the job (every rank saved its part)
            print(line, file=sys.stderr)
        _leave_together(e)
        return 128 + signum
    except (
        ValueError,
        LookupError,
        OSError,
        RuntimeError,
        NotImplementedError,
        RecursionError,
        UnicodeDecodeError,
        MemoryError,
    ) as e:
        # Bad input or a failing system call: one clear line, no traceback.
        print(f"error: {_job_line(e, _error_line(e))}", file=sys.stderr)
        bad_input = isinstance(e, (ValueError, LookupError, FileNotFoundError, FileExistsError))
        return 2 if bad_input else 1
    except Exception as e:
        # SAELens' runners turn SIGINT/SIGTERM into their InterruptedException.
        if type(e).__name__ == "InterruptedException":
            print(_interrupted_line(args), file=sys.stderr)
            return 130
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
