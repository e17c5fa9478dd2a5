"""What a comparison loads: models and SAEs by name, and where a hook reads on a loaded model.

T5Gemma 2 is run through :class:`~sae_lens_t5gemma.model.hooked.HookedT5Gemma2`, Gemma 3 through
TransformerLens (:func:`~sae_lens_t5gemma.loading.gemma_scope.load_gemma3`), any other model
through TransformerLens. :func:`describe_site` gives a hook's stack, layer, site key and plain
words (:data:`~sae_lens_t5gemma.comparison.report.SITE_WORDS`); the width an SAE at that site
must have is :func:`sae_lens_t5gemma.model.sites.site_width`. :func:`stand_in_hub` serves every stand-in offline.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.comparison.pairs import MINDCHAIN_RELEASE
from sae_lens_t5gemma.comparison.report import SITE_WORDS
from sae_lens_t5gemma.model import sites as sites_mod


def family_of_name(name: str) -> str:
    low = name.lower()
    if "t5gemma-2" in low or "t5gemma2" in low:
        return "T5Gemma 2"
    if "gemma-3" in low or "gemma3" in low:
        return "Gemma 3"
    return name


def load_model(name: str, device: str, dtype: torch.dtype) -> tuple[Any, str]:
    """(hooked model, family) for a hub id or folder."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError):
        model_type = None  # e.g. a TransformerLens alias such as "gpt2-small"
    if model_type == "t5gemma2":
        from sae_lens_t5gemma.model.hooked import load_t5gemma2

        return load_t5gemma2(name, device=device, dtype=dtype), "T5Gemma 2"
    # "gemma3": the multimodal Gemma 3 checkpoints (4B and up); TransformerLens reads their text part.
    if model_type in ("gemma3_text", "gemma3"):
        from sae_lens_t5gemma.loading.gemma_scope import load_gemma3

        return load_gemma3(name, device=device, dtype=dtype), "Gemma 3"
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype), name


def check_sae_spec(spec: str) -> None:
    """Fail early, before anything is loaded, on an SAE spec that cannot resolve."""
    if Path(spec).exists():
        if not (Path(spec) / "cfg.json").is_file():
            raise FileNotFoundError(f"SAE folder {spec}: no cfg.json (expected a SAELens folder).")
        return
    release, sep, sae_id = spec.partition(":")
    if not sep:
        raise ValueError(f"SAE {spec!r}: expected RELEASE:SAE_ID or an existing SAELens folder.")
    from sae_lens_t5gemma.loading.registration import check_sae_id

    check_sae_id(release, sae_id)


def load_sae(spec: str, device: str) -> tuple[Any, str]:
    """(SAE, source label) for ``RELEASE:SAE_ID``, a SAELens folder or a mindchain ``.pt`` file."""
    from sae_lens_t5gemma.loading.inspection import load_sae_spec

    sae, _ = load_sae_spec(spec, device)
    if Path(spec).exists():
        return sae, "local"
    release = spec.partition(":")[0]
    source = {MINDCHAIN_RELEASE: "mindchain"}.get(release)
    if source is None:
        source = "gemma-scope-2" if release.startswith("gemma-scope-2") else release
    return sae, source


@contextlib.contextmanager
def stand_in_hub(size: str | None = None) -> Iterator[Path]:
    """A throwaway offline hub cache with every stand-in this comparison can use.

    The T5Gemma 2 stand-in and the mindchain SAEs (``synthetic.write_stand_in_hub``) plus
    Gemma 3 and Gemma Scope 2 (``synthetic.write_gemma3_stand_in_hub``), under their real
    ids, with huggingface_hub offline; removed on exit. Numbers from it are synthetic.
    ``size`` (``1b``, ``4b``): the shrunken stand-ins with that size's structure and ids.
    """
    from sae_lens_t5gemma.stand_in import synthetic as synthetic

    size = None if size == "270m" else size  # the default stand-in is the 270M one
    with tempfile.TemporaryDirectory(prefix="sae_lens_t5gemma_compare_hub_") as tmp:
        synthetic.write_stand_in_hub(tmp, size=size)
        synthetic.write_gemma3_stand_in_hub(tmp, size=size)
        with synthetic.offline_hub(tmp) as cache:
            yield cache


def _describe_tl_hook(model: Any, hook_name: str) -> tuple[str, int, str]:
    key = sites_mod.tl_site_key(hook_name)
    # Gemma 2/3 normalise each sublayer's output before adding it to the residual stream,
    # and TransformerLens' hook_attn_out/hook_mlp_out sit after that norm.
    if key in ("attn_out", "mlp_out") and getattr(model.cfg, "use_normalization_before_and_after", False):
        key += "_normed"
    return "decoder-only", int(hook_name.split(".")[1]), key


def describe_site(model: Any, hook_name: str) -> tuple[str, int, str, str]:
    """(stack, layer, site key, plain words) of a hook on a loaded model.

    Raises:
        ValueError: the hook is unknown to the model (the message lists close names).
    """
    if hasattr(model, "canonical_name"):  # HookedT5Gemma2
        s = sites_mod.resolve(model.canonical_name(hook_name))
        key = s.kind.friendly
        words = SITE_WORDS.get(key, s.kind.description)
        if s.stack == "decoder" and s.kind.hf_submodule.startswith("self_attn"):
            words += f" [{sites_mod.MERGED_ATTENTION_NOTE}]"
        return s.stack, s.layer, key, words
    if hook_name not in model.hook_dict:
        raise ValueError(f"Hook {hook_name!r} does not exist on {model.cfg.model_name}.")
    stack, layer, key = _describe_tl_hook(model, hook_name)
    return stack, layer, key, SITE_WORDS[key]
