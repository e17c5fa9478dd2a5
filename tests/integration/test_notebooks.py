"""The notebooks in ``notebooks/`` execute offline on the embedded stand-in.

Each is run top to bottom by nbclient in a fresh kernel (``python3``, which jupyter_client
starts with the interpreter running the tests, i.e. the venv's), with the working folder
in a temporary directory; the checks read what the cells printed and wrote. Each runs in
float32, bfloat16 and float16 (``SAE_LENS_T5GEMMA_DTYPE``, which the kernel inherits), as written.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel inherits this: tiny models run fastest on one thread (no spin-waiting)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _run(name: str, cwd: Path) -> str:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", ""))
            texts.extend(str(v) for k, v in out.get("data", {}).items() if k == "text/plain")
    return "\n".join(texts)


DTYPES = ["float32", "bfloat16", "float16"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    monkeypatch.setenv("SAE_LENS_T5GEMMA_DTYPE", dtype)
    out = _run("quickstart.ipynb", tmp_path)
    assert "SYNTHETIC stand-in hub" in out
    assert "hook: encoder_blocks.5.attn.hook_out | d_in 64 | d_sae 256" in out
    assert "feature activations: (1, " in out
    assert "steering feature" in out and "steered:" in out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_compare_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    monkeypatch.setenv("SAE_LENS_T5GEMMA_DTYPE", dtype)
    out = _run("compare_with_gemma_scope.ipynb", tmp_path)
    assert "SYNTHETIC stand-in hub" in out
    folder = tmp_path / "out" / "compare_notebook"
    text = (folder / "report.md").read_text()
    assert f"models in {dtype}, SAEs in float32." in text
    assert "## Transfer: Gemma Scope 2 SAEs on T5Gemma 2" in text
    assert "## Feature-level transfer and controls" in text and "## Matched sparsity" in text
    for hook in (
        "encoder_blocks.9.attn.hook_z",
        "decoder_blocks.9.hook_mlp_out_normed",
        "blocks.9.attn.hook_z",
        "decoder_blocks.3.self_attn.hook_out",
    ):
        assert f"`{hook}`" in text
    assert "- SYNTHETIC (random stand-in weights, not the real models): Run causally" in out
    for name in ("transfer_by_layer", "transfer_encoder_vs_decoder", "norm_ratio_by_layer", "l0_sweep"):
        assert (folder / f"{name}.png").is_file()
    assert "one document per row, right-padded, padding masked" in out
