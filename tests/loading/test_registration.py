"""Registration with SAELens: idempotent ``register()``, the three SAELens tables it fills,
``load_sae_config_from_huggingface``, clash errors that leave SAELens untouched, release
YAML files (malformed ones, all-or-nothing registration, replacing our own releases),
local releases (mindchain ``.pt`` files and SAELens folders with sparsity), and the
full listing of valid SAE ids."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from safetensors.torch import save_file

import sae_lens_t5gemma
from sae_lens_t5gemma.loading import mindchain as mindchain
from sae_lens_t5gemma.loading import registration as registration
from sae_lens_t5gemma.loading import saelens_folder as saelens_folder
from sae_lens_t5gemma.loading.registration import (
    LOCAL_LOADER,
    check_sae_id,
    register,
    register_loader,
    register_release_yaml,
    valid_sae_ids,
)
from sae_lens_t5gemma.loading.release_yaml import RegistrationError, lookup_from_yaml, release_yaml
from sae_lens_t5gemma.stand_in import synthetic as synthetic

RELEASE = "t5gemma2-270m-attn_out"


def _yaml(tmp_path, text: str, name: str = "releases.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _release_text(
    name: str, repo_id: str = "someone/some-saes", loader: str | None = None, ids=("a",)
) -> str:
    saes = [{"id": i, "path": f"{i}/sae_encoder_00.pt"} for i in ids]
    return release_yaml(name, repo_id, "google/t5gemma-2-270m-270m", saes, conversion_func=loader)


def test_import_registers_all_three_tables():
    directory = get_pretrained_saes_directory()
    lookup = directory[RELEASE]
    assert lookup.repo_id == "mindchain/t5gemma2-sae-all-layers"
    assert lookup.model == "google/t5gemma-2-270m-270m"
    assert lookup.conversion_func == "mindchain_t5gemma2"
    assert len(lookup.saes_map) == 36
    assert lookup.saes_map["encoder/layer_5"] == "encoder/sae_encoder_05.pt"
    assert lookup.saes_map["decoder/layer_17"] == "decoder/sae_decoder_17.pt"
    assert set(lookup.expected_l0.values()) == {1367.0}
    assert (
        loaders.NAMED_PRETRAINED_SAE_LOADERS["mindchain_t5gemma2"] is mindchain.mindchain_huggingface_loader
    )
    assert (
        loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS["mindchain_t5gemma2"]
        is mindchain.get_mindchain_config_from_hf
    )
    assert loaders.NAMED_PRETRAINED_SAE_LOADERS[LOCAL_LOADER] is saelens_folder.local_loader
    assert sae_lens_t5gemma.register is register


def test_register_is_idempotent():
    directory = get_pretrained_saes_directory()
    before_dir = dict(directory)
    before_loaders = dict(loaders.NAMED_PRETRAINED_SAE_LOADERS)
    before_getters = dict(loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS)
    assert register() == [RELEASE]
    assert register() == [RELEASE]
    assert directory == before_dir and directory[RELEASE] is before_dir[RELEASE]
    assert before_loaders == loaders.NAMED_PRETRAINED_SAE_LOADERS
    assert before_getters == loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS


def test_load_sae_config_from_huggingface(hub_cache):
    cfg = load_sae_config_from_huggingface(RELEASE, "decoder/layer_4")
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("standard", 64, 256)
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "decoder_blocks.4.self_attn.hook_out"
    assert cfg["metadata"]["hf_hook_name"] == "model.decoder.layers.4.self_attn.o_proj"
    assert cfg["metadata"]["layer_idx"] == 4


def test_clash_with_saelens_release_is_an_error(tmp_path):
    directory = get_pretrained_saes_directory()
    theirs = directory["gemma-scope-2-270m-pt-att"]
    path = _yaml(tmp_path, _release_text("gemma-scope-2-270m-pt-att", loader="mindchain_t5gemma2"))
    with pytest.raises(RegistrationError, match=re.escape(
        "Release 'gemma-scope-2-270m-pt-att' already exists in SAELens' pretrained SAE directory "
        "(repo_id 'google/gemma-scope-2-270m-pt'); refusing to overwrite it."
    )):  # fmt: skip
        register_release_yaml(path)
    assert directory["gemma-scope-2-270m-pt-att"] is theirs
    assert theirs.conversion_func == "gemma_3"


def test_clash_with_saelens_loader_is_an_error():
    theirs = loaders.NAMED_PRETRAINED_SAE_LOADERS["gemma_3"]
    with pytest.raises(RegistrationError, match="Loader name 'gemma_3' is already used by SAELens"):
        register_loader("gemma_3", saelens_folder.local_loader, saelens_folder.get_local_config)
    assert loaders.NAMED_PRETRAINED_SAE_LOADERS["gemma_3"] is theirs
    assert loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS["gemma_3"] is loaders.get_gemma_3_config_from_hf


def test_yaml_registration_is_all_or_nothing(tmp_path):
    text = _release_text("t5g-test-new-one", loader="mindchain_t5gemma2") + _release_text(
        "gemma-scope-2-270m-pt-res", loader="mindchain_t5gemma2"
    )
    with pytest.raises(RegistrationError, match="'gemma-scope-2-270m-pt-res' already exists"):
        register_release_yaml(_yaml(tmp_path, text))
    assert "t5g-test-new-one" not in get_pretrained_saes_directory()


def test_our_own_release_changes_need_replace(tmp_path):
    first = _yaml(tmp_path, _release_text("t5g-test-replace", loader="mindchain_t5gemma2"), "a.yaml")
    second = _yaml(tmp_path, _release_text("t5g-test-replace", "other/repo", "mindchain_t5gemma2"), "b.yaml")
    assert register_release_yaml(first) == ["t5g-test-replace"]
    assert register_release_yaml(first) == ["t5g-test-replace"]  # identical: a no-op
    with pytest.raises(
        RegistrationError, match="'t5g-test-replace' was registered earlier with other contents"
    ):
        register_release_yaml(second)
    assert get_pretrained_saes_directory()["t5g-test-replace"].repo_id == "someone/some-saes"
    register_release_yaml(second, replace=True)
    assert get_pretrained_saes_directory()["t5g-test-replace"].repo_id == "other/repo"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("r1:\n  model: m\n  saes: [{id: a, path: b}]\n", "release 'r1' has no 'repo_id' field"),
        ("r1:\n  repo_id: x/y\n  model: m\n  saes: []\n", "release 'r1': 'saes' must be a non-empty list"),
        (
            "r1:\n  repo_id: x/y\n  model: m\n  saes: [{id: a}]\n",
            r"release 'r1': saes\[0\] needs 'id' and 'path'",
        ),
        (
            "r1:\n  repo_id: x/y\n  model: m\n  saes: [{id: a, path: b}, {id: a, path: c}]\n",
            "duplicate SAE id 'a'",
        ),
        (
            "r1:\n  repo_id: x/y\n  model: m\n  conversion_func: nope\n  saes: [{id: a, path: b}]\n",
            r"release 'r1' uses conversion_func 'nope', which is no registered loader \(known: \[",
        ),
        ("r1: [1, 2]\n", "release 'r1' must be a mapping"),
        ("- just a list\n", "expected a mapping of release names to releases"),
        ("r1: {repo_id: [unclosed\n", "cannot read release YAML"),
    ],
)
def test_malformed_release_yaml(tmp_path, text, pattern):
    path = _yaml(tmp_path, text)
    with pytest.raises(RegistrationError, match=pattern) as e:
        register_release_yaml(path)
    assert str(e.value).startswith(f"{path}: ")
    assert "r1" not in get_pretrained_saes_directory()


def test_missing_yaml_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such release YAML file"):
        register_release_yaml(tmp_path / "nope.yaml")


def test_local_release_of_mindchain_files(tmp_path):
    for layer in (0, 1):
        (tmp_path / "encoder").mkdir(exist_ok=True)
        ck = synthetic.mindchain_checkpoint("encoder", layer, d_in=8, d_sae=16, seed=7)
        torch.save(ck, tmp_path / synthetic.mindchain_filename("encoder", layer))
    saes = [{"id": f"enc{i}", "path": synthetic.mindchain_filename("encoder", i)} for i in (0, 1)]
    path = _yaml(tmp_path, release_yaml("t5g-test-local-pt", "placeholder/repo", "m", saes))
    assert register_release_yaml(path, local_root=tmp_path) == ["t5g-test-local-pt"]
    lookup = get_pretrained_saes_directory()["t5g-test-local-pt"]
    assert (lookup.repo_id, lookup.conversion_func) == (str(tmp_path.resolve()), LOCAL_LOADER)
    sae = SAE.from_pretrained(release="t5g-test-local-pt", sae_id="enc1")
    ck = synthetic.mindchain_checkpoint("encoder", 1, d_in=8, d_sae=16, seed=7)
    assert all(torch.equal(getattr(sae, k).data, ck[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    assert sae.cfg.metadata.hook_name == "encoder_blocks.1.attn.hook_out"
    assert registration.hook_names("t5g-test-local-pt", "enc0") == (
        "encoder_blocks.0.attn.hook_out",
        "model.encoder.text_model.layers.0.self_attn.o_proj",
    )


def test_local_release_of_saelens_folders_with_sparsity(tmp_path):
    torch.manual_seed(0)
    cfg = StandardSAEConfig(d_in=8, d_sae=16, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "decoder_blocks.1.self_attn.hook_out"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(tmp_path / "saes" / "dec1")
    sparsity = torch.linspace(-5, 0, 16)
    save_file({"sparsity": sparsity}, tmp_path / "saes" / "dec1" / "sparsity.safetensors")
    path = _yaml(tmp_path, release_yaml("t5g-test-local-folder", "-", "m", [{"id": "dec1", "path": "dec1"}]))
    register_release_yaml(path, local_root=tmp_path / "saes")
    loaded, cfg_dict, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity(
        "t5g-test-local-folder", "dec1"
    )
    assert all(
        torch.equal(getattr(loaded, k).data, getattr(sae, k).data)
        for k in ("W_enc", "b_enc", "W_dec", "b_dec")
    )
    assert torch.equal(log_sparsity, sparsity)
    assert loaded.cfg.metadata.hook_name == "decoder_blocks.1.self_attn.hook_out"
    assert (
        registration.hook_names("t5g-test-local-folder", "dec1")[0] == "decoder_blocks.1.self_attn.hook_out"
    )
    # A cfg.json broken after registration names no hook, and list still answers.
    (tmp_path / "saes" / "dec1" / "cfg.json").write_text("[1, 2]")
    assert registration.hook_names("t5g-test-local-folder", "dec1") == (None, None)
    listing = registration.format_releases().splitlines()
    row = listing.index(next(ln for ln in listing if ln.startswith("t5g-test-local-folder"))) + 2
    assert listing[row].split() == ["dec1", "dec1", "?", "?"]


def test_local_root_must_hold_the_paths(tmp_path):
    path = _yaml(tmp_path, release_yaml("t5g-test-local-missing", "-", "m", [{"id": "x", "path": "nowhere"}]))
    with pytest.raises(
        FileNotFoundError, match=r"SAE 'x' of release 't5g-test-local-missing': .*nowhere does not exist"
    ):
        register_release_yaml(path, local_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        register_release_yaml(path, local_root=tmp_path / "no-such-dir")


def test_valid_ids_listed_in_full():
    ids = valid_sae_ids(RELEASE)
    assert ids == [f"{s}/layer_{n}" for s in ("encoder", "decoder") for n in range(18)]
    with pytest.raises(ValueError) as e:
        check_sae_id(RELEASE, "encoder/layer_18")
    msg = str(e.value)
    assert msg.startswith(
        "SAE id 'encoder/layer_18' is not in release 't5gemma2-270m-attn_out'. Valid ids (36): "
    )
    assert all(i in msg for i in ids)
    check_sae_id(RELEASE, "decoder/layer_0")  # no error
    with pytest.raises(
        ValueError,
        match=r"unknown SAE release 't5gemma2-270m-atn_out'; close matches: \['t5gemma2-270m-attn_out'",
    ):
        valid_sae_ids("t5gemma2-270m-atn_out")


def test_release_yaml_round_trip():
    saes = [{"id": "encoder/layer_0", "path": "encoder/layer_0", "l0": 12.5}]
    text = release_yaml(
        "rel",
        "me/repo",
        "google/t5gemma-2-270m-270m",
        saes,
        links={"model": "u"},
        header="line one\nline two",
    )
    assert text.startswith("# line one\n# line two\nrel:\n")
    parsed = yaml.safe_load(text)
    assert parsed == {
        "rel": {
            "links": {"model": "u"},
            "model": "google/t5gemma-2-270m-270m",
            "repo_id": "me/repo",
            "saes": saes,
        }
    }
    lookup = lookup_from_yaml("rel", parsed["rel"])
    assert lookup.conversion_func is None and lookup.expected_l0 == {"encoder/layer_0": 12.5}


def test_register_loader_and_release_primitives():
    def my_loader(repo_id, folder_name, device="cpu", force_download=False, cfg_overrides=None):
        return saelens_folder.local_loader(repo_id, folder_name, device, force_download, cfg_overrides)

    register_loader("t5g-test-loader", my_loader, saelens_folder.get_local_config)
    register_loader("t5g-test-loader", my_loader, saelens_folder.get_local_config)  # identical: a no-op
    assert loaders.NAMED_PRETRAINED_SAE_LOADERS["t5g-test-loader"] is my_loader
    with pytest.raises(
        RegistrationError, match="'t5g-test-loader' was registered earlier with other functions"
    ):
        register_loader("t5g-test-loader", saelens_folder.local_loader, saelens_folder.get_local_config)
    assert loaders.NAMED_PRETRAINED_SAE_LOADERS["t5g-test-loader"] is my_loader

    lookup = lookup_from_yaml("t5g-test-primitive", yaml.safe_load(_release_text("x", loader="nope"))["x"])
    lookup.release = "t5g-test-primitive"
    with pytest.raises(RegistrationError, match="uses conversion_func 'nope', which is no registered loader"):
        registration.register_release_lookup(lookup)
    lookup.conversion_func = "t5g-test-loader"
    assert registration.register_release_lookup(lookup) is True
    assert registration.register_release_lookup(lookup) is False
    assert get_pretrained_saes_directory()["t5g-test-primitive"].conversion_func == "t5g-test-loader"


def test_release_carries_the_neuronpedia_ids_the_export_writes(hub_cache):
    from sae_lens_t5gemma.dashboard.neuronpedia import mindchain_neuronpedia_ids

    lookup = get_pretrained_saes_directory()["t5gemma2-270m-attn_out"]
    assert lookup.neuronpedia_id == mindchain_neuronpedia_ids()
    sae = SAE.from_pretrained(release="t5gemma2-270m-attn_out", sae_id="decoder/layer_3")
    assert sae.cfg.metadata.neuronpedia_id == "t5gemma-2-270m-270m/3-mindchain-dec-attn-out-4k"
