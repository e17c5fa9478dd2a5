"""Broken training datasets: each fails in one line naming the file, before the model loads."""

from __future__ import annotations

import pytest
from hostile import PY, ROOT, _good, _refused, _save, _tree  # noqa: F401

from sae_lens_t5gemma import training
from sae_lens_t5gemma.loading import convert as convert
from sae_lens_t5gemma.stand_in import synthetic as synthetic

# ------------------------------------------------------------------ datasets for train


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"\n\n", "is empty"),
        ("latin1.txt", "fine line\ncaf\xe9\n".encode("latin-1"), "line 2 is not UTF-8 text (invalid continuation byte at byte 3)"),
        ("no_text.jsonl", b'{"text": "ok"}\n{"body": "no text field"}\n', "line 2: expected a JSON object with a 'text' field"),
        ("bad_json.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        ("one_short_line.txt", b"A dog ran.\n", "none of the first 1 documents reaches context_size=32 tokens"),
    ],
)  # fmt: skip
def test_bad_training_datasets_fail_before_the_model_loads(tiny_model_dir, tmp_path, name, content, message):
    """Every line is checked (not only the first); a bad line names its file and line number."""
    data = tmp_path / name
    data.write_bytes(content)
    before = _tree(tmp_path)
    cfg = training.TrainConfig(
        model=str(tiny_model_dir), hooks=["encoder.1.attn_out"], dataset=str(data), out=str(tmp_path / "out"),
        architecture="topk", k=4, d_sae=32, training_tokens=512, train_batch_size_tokens=256, context_size=32,
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        training.plan_training(cfg)
    assert str(err.value).startswith(
        f"Dataset file {str(data)!r}" if "none of" not in message else "Dataset ["
    )
    assert message in str(err.value)
    assert _tree(tmp_path) == before  # nothing written
