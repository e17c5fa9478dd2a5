"""The README's Python snippets run as written, on the offline stand-in, in every dtype.

The blocks under "Load the mindchain SAEs", "Hook T5Gemma 2" and "Steer and analyse" are
taken from ``README.md`` itself (no copies) and executed in order in one namespace, inside the
synthetic stand-in hub, with ``SAE_LENS_T5GEMMA_DTYPE`` set to float32, bfloat16 and float16
(the documented way to change every entry point's default). The SAEs stay float32.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sae_lens_t5gemma.model import dtypes as dtypes

from sae_lens_t5gemma.stand_in import synthetic as synthetic

README = Path(__file__).resolve().parents[2] / "README.md"
SECTIONS = ("## Load the mindchain SAEs", "## Hook T5Gemma 2", "## Steer and analyse")


def python_blocks(text: str, heading: str) -> list[str]:
    """The ```python blocks of the section that starts with ``heading`` (up to the next ``## ``)."""
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    section = text[start : end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_sections_hold_code():
    text = README.read_text()
    assert [len(python_blocks(text, h)) for h in SECTIONS] == [1, 1, 1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_readme_snippets_run_in_every_dtype(hub_cache, monkeypatch, capsys, dtype):
    monkeypatch.setenv(dtypes.DTYPE_ENV, dtype)
    text = README.read_text()
    code = "\n".join(block for h in SECTIONS for block in python_blocks(text, h))
    namespace: dict = {}
    with synthetic.offline_hub(hub_cache):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (the README's own code)
    model, sae, tokens = namespace["model"], namespace["sae"], namespace["tokens"]
    assert model.cfg.dtype == getattr(torch, dtype) and sae.cfg.dtype == "float32"
    # "unchanged outputs": the error term gives back the model's own logits, to its rounding.
    clean = model(tokens)
    tol = max(1e-5, 2 * torch.finfo(clean.dtype).eps)
    torch.testing.assert_close(namespace["logits"], clean, atol=tol, rtol=tol)
    assert "encoder_blocks.5.attn.hook_out.hook_sae_acts_post" in namespace["cache"]
    summary = namespace["report"].summary()
    assert summary["hook_name"] == "encoder_blocks.5.attn.hook_out" and summary["runs"] > 0
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 2  # top features and the generated text were printed
