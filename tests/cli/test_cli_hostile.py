"""The CLI's one-line errors and exit codes (2 bad input, 1 otherwise, 130 on Ctrl-C, 143 on SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from hostile import PY, ROOT, _good, _refused, _save, _tree  # noqa: F401

from sae_lens_t5gemma.cli import main as cli
from sae_lens_t5gemma.loading import convert as convert
from sae_lens_t5gemma.stand_in import synthetic as synthetic

# ------------------------------------------------------------------------------ the CLI


def _main_with(monkeypatch, capsys, exc: BaseException | None, argv: list[str], signal_self: bool = False):
    def boom(*a, **k):
        if signal_self:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise exc

    monkeypatch.setattr(convert, "convert_snapshot", boom)
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_cli_interrupts(monkeypatch, capsys, tmp_path):
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "out")]
    code, err = _main_with(monkeypatch, capsys, KeyboardInterrupt(), argv)
    assert code == 130
    assert err == (
        f"interrupted: convert stopped; {tmp_path / 'out'} is as it was before the run "
        "(the staged output was removed). Rerun the same command.\n"
    )
    from sae_lens.training._interruption import InterruptedException

    code, err = _main_with(monkeypatch, capsys, InterruptedException(), argv)
    assert code == 130 and err.count("\n") == 1 and err.startswith("interrupted: convert stopped")
    code, err = _main_with(monkeypatch, capsys, None, argv, signal_self=True)
    assert code == 143 and err.startswith("terminated (SIGTERM): convert stopped;") and err.count("\n") == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize(
    ("exc", "line", "code"),
    [
        (PermissionError(13, "Permission denied", "/ro/out"), "error: /ro/out: Permission denied (PermissionError)", 1),
        (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device (OSError)", 1),
        (RuntimeError("PytorchStreamReader failed\nreading zip archive"),
         "error: RuntimeError: PytorchStreamReader failed reading zip archive", 1),
        (NotImplementedError("no"), "error: NotImplementedError: no", 1),
        (RecursionError("maximum recursion depth exceeded"), "error: input nested too deeply (RecursionError)", 1),
        (json.JSONDecodeError("Expecting value", "x", 0), "error: Expecting value: line 1 column 1 (char 0)", 2),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
         "error: not UTF-8 text (invalid start byte at byte 0)", 2),
    ],
)  # fmt: skip
def test_cli_error_lines(monkeypatch, capsys, tmp_path, exc, line, code):
    got, err = _main_with(monkeypatch, capsys, exc, ["convert", "a", "b"])
    assert (got, err) == (code, line + "\n")


def test_cli_convert_read_only_out(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    src = tmp_path / "src"
    _save(synthetic.mindchain_checkpoint("encoder", 0, 8, 16), src / "encoder", "sae_encoder_00.pt")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["convert", str(src), str(ro / "out"), "--no-progress"]) == 1
    finally:
        ro.chmod(0o700)
    assert capsys.readouterr().err.startswith(
        f"error: {ro / '.out.lock'}: Permission denied (PermissionError)"
    )
