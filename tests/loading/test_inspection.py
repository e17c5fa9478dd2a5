"""Spec -> SAE in one place (``loading.inspection.load_sae_spec``): each spec kind loads
(``RELEASE:SAE_ID`` through SAELens, a SAELens folder, a mindchain ``.pt``) with the same
weights, and a folder holding NaN is refused by it and by the commands that use it (the
comparison's ``load_sae`` and the dashboard's ``find-features``), naming file and tensor."""

from __future__ import annotations

import math

import pytest
import torch
from huggingface_hub import hf_hub_download
from sae_lens import SAE

from sae_lens_t5gemma.loading.inspection import load_sae_spec
from sae_lens_t5gemma.loading.release_yaml import RegistrationError
from sae_lens_t5gemma.model.sizes import MINDCHAIN_REPO
from sae_lens_t5gemma.stand_in import synthetic as synthetic

RELEASE = "t5gemma2-270m-attn_out"


def _weights(sae: SAE) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in sae.state_dict().items()}


def test_each_spec_kind_loads_the_same_sae(hub_cache, tmp_path):
    by_release, source = load_sae_spec(f"{RELEASE}:encoder/layer_5")
    assert source == f"{RELEASE}:encoder/layer_5"
    pt = hf_hub_download(MINDCHAIN_REPO, synthetic.mindchain_filename("encoder", 5))
    by_file, source = load_sae_spec(pt)
    assert source.endswith("sae_encoder_05.pt")
    by_release.save_model(tmp_path / "folder")
    by_folder, source = load_sae_spec(tmp_path / "folder")
    assert source == str((tmp_path / "folder").resolve())
    for other in (by_file, by_folder):
        assert (
            other.cfg.metadata.hook_name
            == by_release.cfg.metadata.hook_name
            == "encoder_blocks.5.attn.hook_out"
        )
        for name, t in _weights(by_release).items():
            torch.testing.assert_close(_weights(other)[name], t, rtol=0, atol=0)


def test_bad_specs_are_named(hub_cache, tmp_path):
    with pytest.raises(ValueError, match=r"expected RELEASE:SAE_ID, a SAELens folder or a mindchain \.pt"):
        load_sae_spec("no-such-thing")
    with pytest.raises(ValueError, match=r"SAE id 'encoder/layer_99' is not in release .* Valid ids \(36\)"):
        load_sae_spec(f"{RELEASE}:encoder/layer_99")
    with pytest.raises(FileNotFoundError, match="neither a mindchain .pt file nor a SAELens folder"):
        load_sae_spec(tmp_path)


@pytest.fixture
def nan_folder(hub_cache, tmp_path):
    sae, _ = load_sae_spec(f"{RELEASE}:decoder/layer_3")
    with torch.no_grad():
        sae.W_dec.view(-1)[[1, 2, 3]] = math.nan
    sae.save_model(tmp_path / "nan")
    return tmp_path / "nan"


def _refusal(nan_folder) -> str:
    n = 256 * 64
    return f"{nan_folder / 'sae_weights.safetensors'}: tensor W_dec holds 3 NaN and 0 Inf values (of {n})"


def test_a_nan_folder_is_refused_by_every_path(nan_folder, tmp_path):
    from sae_lens_t5gemma.comparison.models import load_sae as compare_load_sae
    from sae_lens_t5gemma.dashboard.pages import run_find_features

    with pytest.raises(RegistrationError) as e:
        load_sae_spec(nan_folder)
    assert str(e.value) == _refusal(nan_folder)
    with pytest.raises(RegistrationError) as e:
        compare_load_sae(str(nan_folder), "cpu")
    assert str(e.value) == _refusal(nan_folder)
    (tmp_path / "with.txt").write_text("a cat sat\n")
    (tmp_path / "without.txt").write_text("a dog ran\n")
    with pytest.raises(RegistrationError) as e:
        run_find_features(str(nan_folder), tmp_path / "with.txt", tmp_path / "without.txt")
    assert str(e.value) == _refusal(nan_folder)
