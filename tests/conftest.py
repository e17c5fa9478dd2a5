"""Shared fixtures: a throwaway Hugging Face cache with synthetic stand-ins, offline.

The environment is set before anything imports huggingface_hub, so every test runs the
real ``hf_hub_download`` / ``from_pretrained`` code paths against files laid out as the
hub's cache is, with no network.
"""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="sae_lens_t5gemma_hub_")
os.environ["HF_HUB_CACHE"] = _CACHE
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sae_lens_t5gemma.stand_in import synthetic as synthetic  # noqa: E402

# Where the device-sensitive tests (test_dtypes.py, the parity port) put models and SAEs:
# "cpu" here; benchmarks/gpu_check.py runs them with "cuda".
DEVICE = os.environ.get("SAE_LENS_T5GEMMA_TEST_DEVICE", "cpu")

# Tiny models: one thread avoids spin-waiting between two busy cores (several times faster here).
torch.set_num_threads(1)


def identity_sae(hook_name: str, d_in: int, **metadata):
    """A SAELens ``StandardSAE`` that reconstructs exactly: relu(x) - relu(-x) = x."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook_name, prepend_bos=True, **metadata)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, apply_b_dec_to_input=False, metadata=meta))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="session")
def hub_cache() -> Path:
    """The offline hub cache holding the stand-in T5Gemma 2 and 36 mindchain SAEs."""
    cache = Path(_CACHE)
    synthetic.write_stand_in_hub(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a 2-layer random T5Gemma 2 and the small tokenizer."""
    return synthetic.save_stand_in_model(tmp_path_factory.mktemp("tiny_model"))
