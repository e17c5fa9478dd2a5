"""Non-finite values refused or reported as such, and rows bounded before the work (issue 22, items 4-5).

Covers: a local SAELens folder with a NaN or an Inf weight is refused naming the file and the
tensor (``inspect``'s loader and local releases share the one check); ``diagnose`` with NaN
activations gives no verdict and says why, for all-NaN and partly NaN features alike; images
with NaN or Inf pixels, bool, integer or complex ``pixel_values``, or a row whose placeholders
split an image are refused in one line; a 20 MB text row is tokenised from a bounded prefix
(bounded characters, well under a second) with the ids of full tokenisation, as every normal
row keeps.
"""

from __future__ import annotations

import math
import random
import time
from types import SimpleNamespace

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_t5gemma.analysis import corpus
from sae_lens_t5gemma.analysis import images as images
from sae_lens_t5gemma.analysis.diagnose import diagnose
from sae_lens_t5gemma.loading import inspection as inspection
from sae_lens_t5gemma.loading import registration as registration
from sae_lens_t5gemma.stand_in import images as stand_in_images
from sae_lens_t5gemma.stand_in import synthetic as synthetic

DEC = "decoder_blocks.1.self_attn.hook_out"


# ----------------------------------------------------------------------------- SAE folders


def _folder(tmp_path, name: str, value: float):
    meta = SAEMetadata(hook_name=DEC)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32, apply_b_dec_to_input=False, metadata=meta))
    with torch.no_grad():
        getattr(sae, name).view(-1)[[3, 7]] = value
    folder = tmp_path / "sae"
    sae.save_model(folder)
    return folder


def test_a_saelens_folder_with_a_nan_weight_is_refused(tmp_path):
    folder = _folder(tmp_path, "W_dec", math.nan)
    with pytest.raises(registration.RegistrationError) as e:
        inspection.load_sae_spec(folder)
    assert (
        str(e.value)
        == f"{folder / 'sae_weights.safetensors'}: tensor W_dec holds 2 NaN and 0 Inf values (of 2048)"
    )


def test_a_local_release_folder_with_an_inf_weight_is_refused(tmp_path):
    folder = _folder(tmp_path, "b_enc", math.inf)
    with pytest.raises(registration.RegistrationError) as e:
        registration.local_loader(str(tmp_path), "sae")
    assert (
        str(e.value)
        == f"{folder / 'sae_weights.safetensors'}: tensor b_enc holds 0 NaN and 2 Inf values (of 32)"
    )


# ----------------------------------------------------------------------------- diagnose


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from sae_lens_t5gemma.model.hooked import load_t5gemma2

    return load_t5gemma2(tiny_model_dir, dtype=torch.float32)


def _diag_sae(nan_columns: slice) -> StandardSAE:
    meta = SAEMetadata(hook_name=DEC)
    meta.training_history = {"loss": [0.1], "l0": [20.0]}
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=256, apply_b_dec_to_input=False, metadata=meta))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 256, generator=g))
        sae.b_enc.copy_(torch.randn(256, generator=g) * 0.1 - 0.5)
        sae.W_dec.copy_(torch.randn(256, 64, generator=g) * 0.05)
        sae.W_enc[:, nan_columns] = math.nan
    return sae


@pytest.mark.parametrize(
    ("case", "columns"), [("all features NaN", slice(None)), ("one feature NaN", slice(0, 1))]
)
def test_diagnose_with_nan_features_gives_no_verdict(model, case, columns):
    tokens = model.to_tokens(["The cat sat on the mat and looked at the door.", "Rain fell on the old town."])
    result = diagnose(model, {"decoder/layer_1": _diag_sae(columns)}, [tokens])
    assert result.best() == {}
    n = result.rows[0].n_tokens
    assert n > 0 and all(r.n_nonfinite == n and math.isnan(r.l0) and math.isnan(r.mse) for r in result.rows)
    assert result.verdict() == (
        "no verdict: activations or SAE features are not finite (decoder/layer_1: NaN/Inf under "
        f"prefix_lm ({n} of {n} positions), reconstruct ({n} of {n} positions), shifted_copy ({n} of {n} "
        "positions)), so no L0 can be compared; check the model and SAE weights for NaN/Inf"
    )


# ----------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2

    hf, processor = stand_in_images.build_image_stand_in(tmp_path_factory.mktemp("image_stand_in"))
    model = HookedT5Gemma2(hf, processor.tokenizer)
    imgs = [[stand_in_images.stand_in_image(0)], [stand_in_images.stand_in_image(1)]]
    prompts = ["<start_of_image> in this image, there is", "a cat <start_of_image> sat on it, it was"]
    return model, dict(processor(text=prompts, images=imgs, return_tensors="pt", padding=True))


def _pixels(batch, edit):
    pv = batch["pixel_values"].clone()
    return {**batch, "pixel_values": edit(pv)}


def _poke(value):
    def edit(pv):
        pv[1, 0, 5, 5] = value
        return pv

    return edit


IMAGE_CASES = {
    "NaN pixel": (_poke(math.nan), "Batch 0: pixel_values hold 1 NaN and 0 Inf values (images [1]): the vision tower would turn them into NaN activations"),
    "Inf pixel": (_poke(-math.inf), "Batch 0: pixel_values hold 0 NaN and 1 Inf values (images [1]): the vision tower would turn them into NaN activations"),
    "bool pixels": (lambda pv: pv > 0, "Batch 0: pixel_values are bool: expected floating-point pixels as the processor makes them (float32, bfloat16 or float16), not bool, integer or complex values"),
    "integer pixels": (lambda pv: (pv * 127).to(torch.uint8), "Batch 0: pixel_values are uint8: expected floating-point"),
    "complex pixels": (lambda pv: pv.to(torch.complex64), "Batch 0: pixel_values are complex64: expected floating-point"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_pixel_values_are_refused_in_one_line(stand_in, case):
    model, batch = stand_in
    edit, message = IMAGE_CASES[case]
    with pytest.raises(ValueError) as e:
        images.harvest(model, [_pixels(batch, edit)], "encoder_blocks.1.hook_resid_post")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_uneven_placeholder_rows_are_refused(stand_in):
    model, batch = stand_in
    tokens = batch["input_ids"].clone()
    image_id = model.image_token_id
    row0, row1 = (tokens[0] == image_id).nonzero().flatten(), (tokens[1] == image_id).nonzero().flatten()
    # Move one placeholder from row 1 to row 0: 5 and 3, still 8 in all (2 images of 4).
    tokens[0, row0[-1] + 1] = image_id
    tokens[1, row1[0]] = tokens[1, row1[0] - 1]
    assert (tokens == image_id).sum(1).tolist() == [5, 3]
    uneven = {**batch, "input_ids": tokens}
    with pytest.raises(ValueError) as e:
        images.harvest(model, [uneven], "encoder_blocks.1.hook_resid_post")
    assert str(e.value) == (
        "Batch 0: Row 0 holds 5 image placeholder tokens, not a multiple of 4 (one image's soft tokens): an "
        "image would be split across rows. Build the rows with the model's processor."
    )
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=64, d_sae=8, metadata=SAEMetadata(hook_name="encoder_blocks.1.hook_resid_post")
        )
    )
    with pytest.raises(ValueError, match=r"^Row 0 holds 5 image placeholder tokens, not a multiple of 4"):
        images.top_features_with_images(model, sae, uneven)


# ----------------------------------------------------------------------------- rows bounded


class _Spy:
    """A tokenizer that records the length of every text it is given and refuses long ones
    (so a whole-row tokenisation fails at once instead of taking gigabytes)."""

    def __init__(self, tok, limit: int = 100_000):
        self.tok, self.limit, self.lengths = tok, limit, []
        self.bos_token_id = tok.bos_token_id

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        if len(text) > self.limit:
            raise MemoryError(f"tokenising {len(text):,} characters")
        return self.tok(text, **kw)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_20_mb_row_is_tokenised_from_a_bounded_prefix(tokenizer):
    words = synthetic.stand_in_texts()
    line = " ".join(words * (20_000_000 // len(" ".join(words)) + 1))[:20_000_000]
    spy = _Spy(tokenizer)
    t = time.perf_counter()
    ids = corpus.tokenize_row(spy, line, 64)
    seconds = time.perf_counter() - t
    assert len(ids) == 64 and seconds < 1.0
    assert max(spy.lengths) <= 1008 and sum(spy.lengths) <= 1512  # 63 tokens * 8 chars, then twice that
    head = tokenizer(line[:100_000], add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.bos_token_id, *head[:63]]


def test_normal_rows_keep_the_ids_of_full_tokenisation(tokenizer):
    rng = random.Random(0)
    alphabet = "ab cd\u00e9\u4e2d\n\t  .,!?xyz0123456789"
    texts = [*synthetic.stand_in_texts(), "", " ", "x" * 5000, "  " * 3000 + "end", "\u4e2d\u6587" * 900]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 3000))) for _ in range(40)]
    model = SimpleNamespace(tokenizer=tokenizer)
    for context in (1, 2, 5, 24, 64, 512):
        for text in texts:
            full = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
            assert corpus.tokenize_row(model.tokenizer, text, context) == full[:context], (context, text[:40])
