"""Every code block of README.md and docs/*.md runs as written, on the offline stand-in.

The blocks are read from the pages themselves (no copies here). Per page, in document order
and in one scratch folder:

- each ```python block runs in one namespace shared by the page's blocks;
- each ```bash block whose first command is ``sae-lens-t5gemma`` runs command by command
  through ``cli.main`` (every line of such a block must be a ``sae-lens-t5gemma`` command), with
  ``--stand-in`` added where the subcommand has that flag;
- each ```bash block whose first command is ``torchrun ... -m sae_lens_t5gemma_cli`` runs as a
  real ``torchrun`` job (``python -m torch.distributed.run``, on 127.0.0.1, with a timeout);
- other bash blocks (``make``, ``pip``) are set-up, not this package's commands, and are not run.

Everything runs inside a throwaway hub cache served offline that holds the stand-ins under the
real repo ids (T5Gemma 2 270m, the 36 mindchain SAEs, Gemma 3 270m and Gemma Scope 2), and the
scratch folder holds the files the pages name as the user's own: ``my_texts.txt`` (one
document per line) and ``my_texts.jsonl`` (a ``text`` field), built from the stand-in corpus.

A block may opt out with ``<!-- not run: REASON -->`` on the line before its fence; the reason
is required (see ``NOT_RUN``). The README's load, hook, features and steer blocks also run with
the model in bfloat16 and float16 (``SAE_LENS_T5GEMMA_DTYPE``); the SAEs stay float32.
"""

from __future__ import annotations

import json
import linecache
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sae_lens_t5gemma.model import dtypes as dtypes
from sae_lens_t5gemma.stand_in import synthetic as synthetic

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = "sae-lens-t5gemma"
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]*\S[^>]*) -->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\s*$", re.S | re.M)
# The README sections whose blocks also run in bfloat16 and float16.
LOW_PRECISION_SECTIONS = ("## Load", "## Hook", "## Features of a prompt", "## Steer")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def is_cli(self) -> bool:
        return self.lang == "bash" and next(iter(commands(self.body)), "").startswith(CLI)

    @property
    def is_torchrun(self) -> bool:
        return self.lang == "bash" and next(iter(commands(self.body)), "").startswith("torchrun ")


def blocks(page: Path) -> list[Block]:
    """The page's fenced code blocks, in order, each with the opt-out reason above it (if any)."""
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = NOT_RUN.search(before)
        found.append(
            Block(
                page,
                text.count("\n", 0, m.start()) + 1,
                m["lang"],
                m["body"],
                skip and skip["reason"].strip(),
            )
        )
    return found


def commands(body: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def run_cli(command: str) -> None:
    """One ``sae-lens-t5gemma ...`` line through ``cli.main``, offline (``--stand-in`` where it exists)."""
    from sae_lens_t5gemma.cli.main import build_parser, main

    argv = shlex.split(command)
    assert argv[0] == CLI, f"not a {CLI} command: {command}"
    argv = argv[1:]
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command")  # noqa: SLF001
    options = sub.choices[argv[0]]._option_string_actions  # noqa: SLF001
    if "--stand-in" in options and "--stand-in" not in argv:
        argv.append("--stand-in")
    rc = main(argv)
    assert rc == 0, f"`{command}` (run as {argv}) exited {rc}"


def run_torchrun(command: str) -> None:
    """One ``torchrun ... -m sae_lens_t5gemma_cli ...`` line as a real job: ``python -m
    torch.distributed.run`` on 127.0.0.1 (a free port), the hub settings passed in the environment."""
    import socket
    import subprocess
    import sys

    argv = shlex.split(command)
    assert argv[0] == "torchrun" and "sae_lens_t5gemma_cli" in argv, f"not a torchrun train job: {command}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]
    done = subprocess.run([*cmd, *argv[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"


def write_user_files(folder: Path) -> None:
    """The files the pages call the user's own: documents of four stand-in sentences each."""
    texts = synthetic.stand_in_texts()
    docs = [" ".join(texts[i : i + 4]) for i in range(0, len(texts) - 3, 2)] * 3
    (folder / "my_texts.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (folder / "my_texts.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8"
    )


def run_blocks(selected: list[Block], namespace: dict) -> list[Block]:
    """Run the blocks in order; returns those that ran."""
    ran = []
    for block in selected:
        if block.skip_reason is not None:
            continue
        if block.lang == "python":
            filename = f"<{block.where}>"
            source = "\n" * block.line + block.body  # tracebacks give the page's own line numbers
            # nnsight reads the body of a ``with trace`` block back from its source: register it.
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            code = compile(source, filename, "exec")
            exec(code, namespace)  # noqa: S102 (the page's own code)
        elif block.is_cli:
            for command in commands(block.body):
                run_cli(command)
        elif block.is_torchrun:
            for command in commands(block.body):
                run_torchrun(command)
        else:
            continue
        ran.append(block)
    return ran


@pytest.fixture(scope="session")
def docs_hub(tmp_path_factory) -> Path:
    """A hub cache with every stand-in the pages use: T5Gemma 2, mindchain, Gemma 3, Gemma Scope 2."""
    cache = tmp_path_factory.mktemp("docs_hub")
    synthetic.write_stand_in_hub(cache)
    synthetic.write_gemma3_stand_in_hub(cache)
    return cache


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_user_files(tmp_path)
    return tmp_path


def test_every_page_is_collected_and_holds_no_stray_code():
    assert {p.name for p in PAGES} >= {"README.md", "conventions.md", "loading.md", "training.md"}
    for page in PAGES:
        for block in blocks(page):
            if block.lang == "bash" and block.is_cli:
                assert all(c.startswith(CLI + " ") for c in commands(block.body)), (
                    f"{block.where}: a {CLI} block holds another command; put set-up in its own block"
                )
            assert block.lang in ("python", "bash", "text", "json", ""), (
                f"{block.where}: fence '{block.lang}'"
            )
            assert block.lang != "" or block.skip_reason is None, f"{block.where}: plain fences are not run"
    reasons = [b for p in PAGES for b in blocks(p) if b.skip_reason is not None]
    assert len(reasons) <= 3, (
        f"opt-outs are for the few blocks that cannot run here: {[b.where for b in reasons]}"
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_blocks_run_as_written(page, docs_hub, scratch, capsys):
    if page.name == "recipes.md":
        pytest.importorskip("nnsight")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    with synthetic.offline_hub(docs_hub):
        ran = run_blocks(blocks(page), namespace)
    runnable = [b for b in blocks(page) if b.lang == "python" or b.is_cli or b.is_torchrun]
    assert len(ran) == len([b for b in runnable if b.skip_reason is None])
    CHECKS.get(page.name, lambda ns, out: None)(namespace, capsys.readouterr().out)


def readme_sections(text: str, headings: tuple[str, ...]) -> list[Block]:
    """The README's python blocks under the sections that start with ``headings``."""
    out = []
    for block in blocks(ROOT / "README.md"):
        lines = text.splitlines()[: block.line]
        heading = next((ln for ln in reversed(lines) if ln.startswith("## ")), "")
        if block.lang == "python" and heading.startswith(headings):
            out.append(block)
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_readme_analysis_blocks_in_low_precision(docs_hub, scratch, monkeypatch, capsys, dtype):
    monkeypatch.setenv(dtypes.DTYPE_ENV, dtype)
    selected = readme_sections((ROOT / "README.md").read_text(), LOW_PRECISION_SECTIONS)
    assert len(selected) == len(LOW_PRECISION_SECTIONS)
    namespace: dict = {}
    with synthetic.offline_hub(docs_hub):
        run_blocks(selected, namespace)
    assert namespace["model"].cfg.dtype == getattr(torch, dtype) and namespace["sae"].cfg.dtype == "float32"
    check_readme(namespace, capsys.readouterr().out)


# ---------------------------------------------------------------- what some pages must show
def check_readme(ns: dict, printed: str) -> None:
    model, tokens = ns["model"], ns["tokens"]
    # "unchanged outputs": the error term gives back the model's own logits, to its rounding.
    clean = model(tokens)
    tol = max(1e-5, 2 * torch.finfo(clean.dtype).eps)
    torch.testing.assert_close(ns["logits"], clean, atol=tol, rtol=tol)
    summary = ns["steering"].summary()
    assert summary["hook_name"] == "encoder_blocks.5.attn.hook_out" and summary["runs"] > 0
    assert len(ns["rows"]) == 5 and printed.count("\n") >= 6  # top features and the generated text


def check_recipes(ns: dict, printed: str) -> None:
    # The nnsight block asserts its activations equal HookedT5Gemma2's; here, that it read the decoder.
    assert (
        ns["acts"].shape[-1] == ns["model"].cfg.d_model and ns["acts"].shape[:2] == ns["features"].shape[:2]
    )
    assert ns["z"].shape[-1] == ns["model"].cfg.n_heads * ns["model"].cfg.d_head
    assert [s.cfg.metadata.hook_name for s in ns["saes"]] == [
        "encoder_blocks.1.attn.hook_out",
        "decoder_blocks.1.self_attn.hook_out",
    ]
    assert ns["bridge"].acts_to_saes == {}  # run_with_cache_with_saes removed them again
    # The bridge's decoder read the tokens as they are: T5Gemma 2 has no decoder_start_token_id.
    assert getattr(ns["bridge"].original_model.config, "decoder_start_token_id", None) is None
    assert (ns["on_bridge"][ns["names"][1]] > 0).any()


CHECKS = {"README.md": check_readme, "recipes.md": check_recipes}
