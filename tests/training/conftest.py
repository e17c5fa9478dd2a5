"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
from torchrun_jobs import documents, interleaved

from sae_lens_t5gemma import training


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist_data")
    docs = documents()
    sharded = training.write_text_dataset(docs, folder / "sharded.jsonl")
    reference = training.write_text_dataset(interleaved(docs, 2), folder / "reference.jsonl")
    return sharded, reference
