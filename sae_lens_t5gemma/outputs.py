"""Output folders shared by the commands that write them: the exclusive write lock.

A lock file ``.<OUT>.lock`` beside ``OUT`` holds the writer's pid, host and start time; a
second writer fails at once naming it, and a lock left by a dead process is cleared with a
warning. ``convert`` and ``train`` hold it while they write ``OUT``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputLockedError(FileExistsError):
    """Another process holds the lock on an output folder; the message names its pid."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def lock_path(out: Path) -> Path:
    """The lock file of an output folder: ``.<name>.lock`` beside it."""
    return out.parent / f".{out.name}.lock"


def _read_lock(lock: Path) -> dict[str, Any]:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def output_lock(
    out: str | Path, command: str = "convert", error: type[OutputLockedError] = OutputLockedError
) -> Iterator[Path]:
    """Hold the exclusive write lock on ``out`` for a block.

    The lock is a file created with ``O_EXCL`` holding this process's pid, host and start
    time. A lock whose pid is dead (on this host) is stale: it is removed with a warning.

    Args:
        out: the output folder (it need not exist; the lock lies beside it).
        command: who writes, for the message (``another <command> is writing this folder``).
        error: the exception class raised when the folder is locked.

    Raises:
        OutputLockedError: (or ``error``) a live process holds the lock; the message names its pid.
    """
    out = Path(out)
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read_lock(lock)
            pid = info.get("pid")
            same_host = info.get("host") in (None, me["host"])
            if attempt == 0 and isinstance(pid, int) and same_host and not _pid_alive(pid):
                warnings.warn(f"{lock}: removing a stale lock of process {pid}, which is gone", stacklevel=3)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            holder = (
                f"pid {pid} on {info.get('host')}, since {info.get('started')}" if pid else "unknown holder"
            )
            raise error(
                f"{out}: another {command} is writing this folder ({holder}); lock file {lock}. "
                "If that process is gone, remove the lock file."
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _read_lock(lock).get("pid") == os.getpid():
                lock.unlink()
