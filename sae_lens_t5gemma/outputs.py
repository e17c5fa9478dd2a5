"""Output folders shared by the commands that write them: the exclusive write lock.

A lock file ``.<OUT>.lock`` beside ``OUT`` holds the writer's pid, host and start time; a
second writer fails at once naming it, and a lock left by a dead process is cleared with a
warning. ``convert`` and ``train`` hold it while they write ``OUT``.

The rest keeps an output folder to one run's files (``dashboard``, ``compare``, the
Neuronpedia export):

- :func:`atomic_write`: a file is written whole or not at all, through a temp file created
  exclusively under a random name beside it; a symlink at the target is refused, never
  written through (:class:`OutputPathError`).
- :func:`owned_outputs`: the lock, plus a manifest (:data:`OUTPUTS_MANIFEST`) of what the
  last run wrote. When a run ends, what earlier runs wrote and this one did not (old pages,
  a ``batch-1.json`` of a wider SAE) is removed; files the package did not write, or that
  changed since, are never touched. A journal (:data:`OUTPUTS_JOURNAL`) records each file
  before it is written, so even a killed run's files are cleaned by the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


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


# ------------------------------------------------------------------------- atomic writes


class OutputPathError(FileExistsError):
    """An output path the package will not write through (a symlink); the message names it."""


def _no_symlink(path: Path) -> None:
    if path.is_symlink():
        raise OutputPathError(
            f"{path}: is a symlink (to {os.readlink(path)}); the package does not write through links. "
            "Remove it or choose another output folder"
        )


def atomic_write(path: str | Path, data: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Write a file whole or not at all, never through a symlink.

    The bytes go to a temp file created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``) under
    a random name in the target's folder, are flushed to disk, and the temp file is renamed
    over ``path``. A failed write (disk full, an exception in ``data``) removes the temp file
    and leaves ``path`` as it was.

    Args:
        path: the file to write; its folder must exist.
        data: text (written as UTF-8), bytes, or a function that writes to a binary file object.

    Raises:
        OutputPathError: ``path`` is a symlink.
    """
    path = Path(path)
    _no_symlink(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            elif isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        _no_symlink(path)  # again: a link made while we wrote is refused, not replaced
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def refuse_symlinks(folder: str | Path) -> None:
    """Refuse a folder that is, or directly holds, a symlink (checked before a writer that
    follows links, such as one writing fixed temp names, is let into it).

    Raises:
        OutputPathError: naming the first link.
    """
    folder = Path(folder)
    _no_symlink(folder)
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            _no_symlink(p)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ a run's own files only

OUTPUTS_MANIFEST = ".sae_lens_t5gemma_outputs.json"
"""The file in an output folder listing what the last run wrote there (path -> sha256)."""
OUTPUTS_JOURNAL = ".sae_lens_t5gemma_outputs.journal"
"""Paths a run is about to write, one per line, appended before each write; merged into the
manifest when the run ends. Left behind by a killed run, it tells the next run what to clean."""

_LOCAL = threading.local()  # .runs: the runs this thread has open, innermost last


def _active() -> list[OutputRun]:
    if not hasattr(_LOCAL, "runs"):
        _LOCAL.runs = []
    return _LOCAL.runs


def _rel_ok(rel: object) -> bool:
    return isinstance(rel, str) and bool(rel) and not rel.startswith("/") and ".." not in rel.split("/")


class OutputRun:
    """The files one run writes into an output folder (see :func:`owned_outputs`)."""

    def __init__(self, root: Path, command: str):
        self.root = root
        self.command = command
        self.previous: dict[str, str | None] = {}
        """Files earlier runs wrote (path relative to ``root`` -> sha256, None where a killed
        run claimed it without finishing)."""
        self.written: dict[str, str] = {}
        """Files this run wrote (or adopted) -> sha256."""
        self.removed: list[Path] = []
        """Files of earlier runs that this run removed when it finished."""
        self._journal = root / OUTPUTS_JOURNAL

    def _rel(self, path: str | Path) -> str:
        # Lexically first (a symlinked subfolder is then refused by name, not resolved away).
        rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))).as_posix()
        if rel.startswith("../"):
            full = Path(path).parent.resolve() / Path(path).name
            try:
                rel = full.relative_to(self.root.resolve()).as_posix()
            except ValueError:
                raise ValueError(f"{path} is outside the output folder {self.root}") from None
        if not _rel_ok(rel) or rel in (OUTPUTS_MANIFEST, OUTPUTS_JOURNAL):
            raise ValueError(f"{path}: not a file name this run can write in {self.root}")
        return rel

    def _prepare(self, rel: str) -> Path:
        """Make the folders of ``rel`` (refusing symlinked ones) and journal it."""
        folder = self.root
        for part in rel.split("/")[:-1]:
            folder = folder / part
            _no_symlink(folder)
            folder.mkdir(exist_ok=True)
        if rel not in self.written and rel not in self.previous:
            _no_symlink(self._journal)
            fd = os.open(
                self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644
            )
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(rel + "\n")
        return self.root / rel

    def write(self, path: str | Path, data: str | bytes | Callable[[BinaryIO], None]) -> Path:
        """:func:`atomic_write` a file inside the folder and record it as this run's."""
        rel = self._rel(path)
        target = self._prepare(rel)
        atomic_write(target, data)
        self.written[rel] = (
            hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()
            if isinstance(data, (str, bytes))
            else sha256_file(target)
        )
        return target

    def claim(self, path: str | Path) -> Path:
        """Journal a file that another writer is about to write here (adopt it once written)."""
        return self._prepare(self._rel(path))

    def adopt(self, path: str | Path) -> None:
        """Record a file another writer wrote here as this run's (nothing if it is absent)."""
        rel = self._rel(path)
        target = self.root / rel
        _no_symlink(target)
        if target.is_file():
            self.written[rel] = sha256_file(target)

    def _remove_stale(self) -> None:
        root = self.root.resolve()
        for rel, digest in sorted(self.previous.items()):
            if rel in self.written or not _rel_ok(rel):
                continue
            p = self.root / rel
            if p.is_symlink() or not p.is_file() or root not in p.resolve().parents:
                continue
            if digest is not None and sha256_file(p) != digest:
                warnings.warn(
                    f"{p}: written by an earlier {self.command} run and changed since; left in place",
                    stacklevel=4,
                )
                continue
            p.unlink()
            self.removed.append(p)
            parent = p.parent
            while parent != self.root and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def _save(self, files: dict[str, str | None]) -> None:
        manifest = {"written_by": f"sae-lens-t5gemma {self.command}", "files": dict(sorted(files.items()))}
        atomic_write(self.root / OUTPUTS_MANIFEST, json.dumps(manifest, indent=1))
        with contextlib.suppress(FileNotFoundError):
            self._journal.unlink()

    def _load(self) -> None:
        manifest, journal = self.root / OUTPUTS_MANIFEST, self._journal
        _no_symlink(manifest)
        _no_symlink(journal)
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
                files = data.get("files", {}) if isinstance(data, dict) else {}
            except (OSError, ValueError):
                files = {}
                warnings.warn(f"{manifest}: unreadable; earlier runs' files are left in place", stacklevel=4)
            if isinstance(files, dict):
                self.previous.update(
                    {k: v for k, v in files.items() if _rel_ok(k) and (v is None or isinstance(v, str))}
                )
        if journal.is_file():
            for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
                if _rel_ok(line):
                    self.previous.setdefault(line, None)


@contextlib.contextmanager
def owned_outputs(out: str | Path, command: str) -> Iterator[OutputRun]:
    """Lock an output folder for one run, and leave in it only that run's files.

    Every file the run writes goes through :meth:`OutputRun.write` (atomic, never through a
    symlink) or is adopted with :meth:`OutputRun.adopt`. When the block ends normally, the
    files that earlier runs wrote here (listed in :data:`OUTPUTS_MANIFEST`) and this run did
    not are removed, unless they changed since (those are left with a warning), and the
    manifest is rewritten. Files the package did not write are never touched. If the block
    fails, nothing is removed and the manifest lists the earlier files and this run's, so the
    next run cleans up.

    Nested: inside a run on the same folder or a folder above it (in this thread), the outer
    run is returned and no second lock is taken; the outer run finishes the folder.

    Raises:
        OutputLockedError: another process is writing the folder.
        OutputPathError: the manifest or journal is a symlink.
        FileExistsError: ``out`` is a dangling symlink or not a folder.
    """
    out = Path(out)
    resolved = out.resolve()
    for run in reversed(_active()):
        if resolved == run.root.resolve() or run.root.resolve() in resolved.parents:
            yield run
            return
    if out.is_symlink() and not out.exists():
        raise FileExistsError(
            f"{out}: is a symlink to {os.readlink(out)}, which does not exist; remove the link or choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    with output_lock(out, command):
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        run = OutputRun(out, command)
        run._load()
        _active().append(run)
        try:
            yield run
        except BaseException:
            with contextlib.suppress(OSError):
                if run.written or run.previous:
                    run._save({**run.previous, **run.written})
                elif created:  # failed before writing anything: leave no trace
                    with contextlib.suppress(FileNotFoundError):
                        run._journal.unlink()
                    out.rmdir()
            raise
        finally:
            _active().remove(run)
        run._remove_stale()
        run._save(dict(run.written))
