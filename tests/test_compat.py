"""``sae_lens_t5gemma._compat``: each patch checks the installed version against the one it was
checked with (another minor version warns once, another major version is refused, naming the
package and the patch), and nothing is patched on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sae_lens_t5gemma import _compat


@pytest.fixture
def installed(monkeypatch):
    versions: dict[str, str] = {}
    real = _compat._installed
    monkeypatch.setattr(_compat, "_installed", lambda package: versions.get(package) or real(package))
    monkeypatch.setattr(_compat, "_WARNED", set())
    return versions


def test_the_checked_versions_are_installed():
    for package, series in _compat.CHECKED.items():
        assert _compat._series(_compat._installed(package)) == _compat._series(series), package


def test_another_minor_version_warns_once(installed):
    installed["sae-lens"] = "6.60.1"
    with pytest.warns(
        _compat.UncheckedVersionWarning, match=r"checked against sae-lens 6\.54\.x; 6\.60\.1 is installed"
    ):
        _compat.saelens_loader_tables()
    with warnings_as_errors():
        _compat.saelens_loader_tables()  # once per patch


def test_another_major_version_is_refused(installed):
    installed["sae-lens"] = "7.0.0"
    with pytest.raises(
        _compat.CompatError,
        match=r"registration of releases with SAELens was checked against sae-lens 6\.54\.x; 7\.0\.0",
    ):
        _compat.saelens_release_directory()
    installed["transformers"] = "4.57.0"
    with pytest.raises(_compat.CompatError, match=r"transformers 5\.23\.x; 4\.57\.0 is installed"):
        _compat.check_version("transformers", _compat.CHECKED["transformers"], "a transformers patch")
    installed["huggingface_hub"] = "1.0.0"
    with (
        pytest.raises(_compat.CompatError, match="huggingface_hub 2.4.x"),
        _compat.hub_settings("/tmp", offline=True),
    ):
        pass


def test_a_missing_internal_is_named(monkeypatch):
    from sae_lens.loading import pretrained_sae_loaders as loaders

    monkeypatch.delattr(loaders, "NAMED_PRETRAINED_SAE_CONFIG_GETTERS")
    with pytest.raises(
        _compat.CompatError,
        match=r"needs sae_lens\.loading\.pretrained_sae_loaders\.NAMED_PRETRAINED_SAE_CONFIG_GETTERS",
    ):
        _compat.saelens_loader_tables()


def test_import_and_register_patch_nothing_else():
    code = (
        "import sae_lens_t5gemma\n"
        "from sae_lens.loading import pretrained_sae_loaders as l\n"
        "assert not getattr(l.get_safetensors_tensor_shapes, '_reads_local_cache', False)\n"
        "from sae_lens_t5gemma._compat import read_gemma_scope_shapes_from_cache as r\n"
        "r(); r()\n"
        "assert l.get_safetensors_tensor_shapes._reads_local_cache\n"
        "assert l.get_safetensors_tensor_shapes.__wrapped__.__module__ == l.__name__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
