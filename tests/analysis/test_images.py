"""Images: T5Gemma 2's SigLIP tower, image tokens and SAEs on them, on a tiny random stand-in.

The stand-in (``stand_in_images.build_image_stand_in``) has a 2-layer SigLIP that turns a 56x56
image into 16 patches, pooled to 4 soft tokens per image, and transformers' own
``Gemma3Processor`` (saved and loaded back with ``AutoProcessor``) writing 4 placeholders per
image. Covers: the processor's rows and ``image_token_mask``; vision-tower and projector hook
values equal transformers' module outputs (PyTorch hooks on the HF modules), and their
shapes; the soft tokens enter the encoder exactly at the masked positions; a run with only
vision hooks stops before the text layers; hooks can edit the soft tokens; aliases; what
changes when the image changes; the prefix_lm refusal and the random split; count and
missing-image errors; reconstruct scores no placeholder; generate with images; harvest at
image / text / all positions and on a vision site; an SAE trained on image tokens only
through SAELens' ``SAETrainer``; ``<img>`` in token strings, ``top_features_with_images`` and
the dashboard.
"""

from __future__ import annotations

import pytest
import torch

from sae_lens_t5gemma.analysis import images as images
from sae_lens_t5gemma.model import sites as sites
from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
from sae_lens_t5gemma.stand_in import images as stand_in_images
from sae_lens_t5gemma.stand_in import synthetic as synthetic

MM = stand_in_images.STAND_IN_MM_TOKENS  # 4 soft tokens per image
N_PATCHES = 16  # (56 / 14) ** 2
D_VISION = stand_in_images.STAND_IN_VISION["hidden_size"]
D_MODEL = synthetic.TINY_TEXT_DIMS["hidden_size"]
PROMPTS = ["<start_of_image> in this image, there is", "a cat <start_of_image> sat on it, it was"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    hf, processor = stand_in_images.build_image_stand_in(tmp_path_factory.mktemp("image_stand_in"))
    return HookedT5Gemma2(hf, processor.tokenizer), processor


@pytest.fixture(scope="module")
def batch(stand_in):
    _, processor = stand_in
    imgs = [[stand_in_images.stand_in_image(0)], [stand_in_images.stand_in_image(1)]]
    return processor(text=PROMPTS, images=imgs, return_tensors="pt", padding=True)


def test_processor_rows_and_image_token_mask(stand_in, batch):
    model, processor = stand_in
    tokens = batch["input_ids"]
    image_id = processor.tokenizer.image_token_id
    assert image_id == model.hf_model.config.image_token_id == model.image_token_id == 514
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    mask = model.image_token_mask(tokens)
    assert torch.equal(mask, tokens == image_id)
    # "\n\n<boi>" + 4 placeholders + "<eoi>\n\n" replaces each <start_of_image>.
    assert mask[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert mask[1].nonzero().flatten().tolist() == [8, 9, 10, 11]
    assert int(mask.sum()) == 2 * MM


def test_vision_hooks_equal_transformers_modules(stand_in, batch):
    model, _ = stand_in
    tokens, pv, am = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    vsites = sites.vision_sites(2)
    names = [s.hook_name for s in vsites] + ["encoder_blocks.1.hook_resid_post"]
    ref: dict[str, torch.Tensor] = {}
    handles = []
    for s in vsites:
        module = model.hf_model.get_submodule(s.hf_module)
        if s.kind.hf_io == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, n=s.hook_name: ref.__setitem__(n, (args or (kwargs["hidden_states"],))[0]),
                with_kwargs=True,
            ))  # fmt: skip
        else:
            handles.append(
                module.register_forward_hook(lambda _m, _a, out, n=s.hook_name: ref.__setitem__(n, out))
            )
    enc_layer = model.hf_model.get_submodule("model.encoder.text_model.layers.1")
    handles.append(enc_layer.register_forward_hook(lambda _m, _a, out: ref.__setitem__(names[-1], out)))
    try:
        with torch.no_grad():
            logits_ref = model.hf_model(
                input_ids=tokens, attention_mask=am, pixel_values=pv, decoder_input_ids=tokens
            ).logits
    finally:
        for h in handles:
            h.remove()
    with model.fed("reconstruct"):
        logits, cache = model.run_with_cache(tokens, pixel_values=pv, attention_mask=am, names_filter=names)
    assert len(ref) == len(names) == 11
    for name in names:
        assert torch.equal(cache[name], ref[name]), name
    assert torch.equal(logits, logits_ref)
    for s in vsites[:-2]:
        assert cache[s.hook_name].shape == (2, N_PATCHES, D_VISION)
    assert cache["hook_vision_out"].shape == (2, N_PATCHES, D_VISION)
    assert cache["hook_mm_proj_out"].shape == (2, MM, D_MODEL)
    features = model.hf_model.model.encoder.get_image_features(pv).pooler_output
    assert torch.equal(cache["hook_mm_proj_out"], features)
    # Aliases: TransformerLens' Gemma 3 multimodal names, friendly names, both HF layouts.
    assert torch.equal(cache["vision_projector.hook_out"], features)
    assert cache["vision.1.attn_out"] is cache["vision_blocks.1.hook_attn_out"]
    legacy = "model.encoder.vision_tower.vision_model.encoder.layers.0"
    assert model.canonical_name(legacy) == "vision_blocks.0.hook_resid_post"
    assert model.canonical_name(f"{legacy}.input") == "vision_blocks.0.hook_resid_pre"
    with pytest.raises(
        ValueError, match=r"vision tower has 2 layers\). Close matches: \['vision_blocks.1.hook_resid_post'"
    ):
        model.canonical_name("vision_blocks.2.hook_resid_post")


def test_soft_tokens_enter_the_encoder_at_the_masked_positions(stand_in, batch):
    model, _ = stand_in
    tokens, pv = batch["input_ids"], batch["pixel_values"]
    with model.fed(prefix_len=tokens.shape[1]):
        _, cache = model.run_with_cache(
            tokens, pixel_values=pv, names_filter=["hook_mm_proj_out", "encoder_blocks.0.hook_resid_pre"]
        )
    mask = model.image_token_mask(tokens)
    embedded = cache["encoder_blocks.0.hook_resid_pre"][mask]
    assert torch.equal(embedded, cache["hook_mm_proj_out"].reshape(-1, D_MODEL))


def test_vision_only_run_stops_before_the_text_layers(stand_in, batch):
    model, _ = stand_in
    tokens, pv = batch["input_ids"], batch["pixel_values"]
    name = "vision_blocks.0.hook_resid_post"
    with model.fed(prefix_len=12):
        logits, full = model.run_with_cache(tokens, pixel_values=pv, names_filter=[name])
    calls = []
    watched = [
        model.hf_model.get_submodule(p)
        for p in ("model.encoder.text_model.layers.0", "model.encoder.vision_tower.encoder.layers.1")
    ]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in watched]
    try:
        with model.fed(prefix_len=12):
            out, cache = model.run_with_cache(tokens, pixel_values=pv, names_filter=[name], return_type=None)
    finally:
        for h in handles:
            h.remove()
    assert logits.shape == (2, 23, 515) and out is None
    assert calls == []  # neither the text layers nor the next SigLIP layer ran
    assert torch.equal(cache[name], full[name])


def test_hooks_edit_the_soft_tokens(stand_in, batch):
    model, _ = stand_in
    tokens, pv = batch["input_ids"], batch["pixel_values"]
    seen = {}

    def capture(x, hook):
        seen[hook.name] = x

    with torch.no_grad(), model.fed(prefix_len=tokens.shape[1]):
        model.run_with_hooks(
            tokens,
            pixel_values=pv,
            return_type=None,
            fwd_hooks=[("hook_mm_proj_out", lambda x, hook: torch.zeros_like(x)),
                       ("encoder_blocks.0.hook_resid_pre", capture)],
        )  # fmt: skip
    mask = model.image_token_mask(tokens)
    resid = seen["encoder_blocks.0.hook_resid_pre"]
    assert float(resid[mask].abs().max()) == 0.0
    assert float(resid[~mask].abs().min(dim=-1).values.max()) > 0.0


def test_what_changes_when_the_image_changes(stand_in, batch):
    """The embedding at text positions stays put; the bidirectional encoder mixes the image into
    every position from its first attention on, so text positions move too (less than image ones)."""
    model, processor = stand_in
    other = processor(
        text=PROMPTS,
        images=[[stand_in_images.stand_in_image(7)], [stand_in_images.stand_in_image(8)]],
        return_tensors="pt",
        padding=True,
    )
    assert torch.equal(other["input_ids"], batch["input_ids"])
    names = ["encoder_blocks.0.hook_resid_pre", "encoder_blocks.1.hook_resid_post"]
    tokens, am = batch["input_ids"], batch["attention_mask"]
    with model.fed(prefix_len=tokens.shape[1]):
        _, a = model.run_with_cache(
            tokens, pixel_values=batch["pixel_values"], attention_mask=am, names_filter=names
        )
        _, b = model.run_with_cache(
            tokens, pixel_values=other["pixel_values"], attention_mask=am, names_filter=names
        )
    image = images.position_mask(model, tokens, "image", am)
    text = images.position_mask(model, tokens, "text", am)
    emb_a, emb_b = a[names[0]], b[names[0]]
    assert torch.equal(emb_a[text], emb_b[text])
    assert float((emb_a[image] - emb_b[image]).norm(dim=-1).min()) > 0.1
    out_a, out_b = a[names[1]], b[names[1]]
    d_image = (out_a[image] - out_b[image]).norm(dim=-1).mean()
    d_text = (out_a[text] - out_b[text]).norm(dim=-1)
    assert float(d_text.min()) > 0.0  # bidirectional: every text position has read the image
    assert float(d_text.mean()) < float(d_image)


def test_prefix_lm_refuses_images_past_the_split(stand_in, batch):
    model, _ = stand_in
    tokens, pv = batch["input_ids"], batch["pixel_values"]
    assert tokens.shape[1] == 23  # default split p = 11; row 1's images sit at 8..11
    msg = (
        "An image placeholder token sits at position 11, at or after the prefix_lm split p=11: only the "
        "encoder (tokens[:, :p]) reads images, the decoder cannot. Put the images before the split: "
        "model.prefix_len >= 12 (e.g. `with model.fed(prefix_len=12): ...`)."
    )
    with pytest.raises(ValueError) as err:
        model(tokens, pixel_values=pv)
    assert str(err.value) == msg
    with model.fed(prefix_len=12):
        loss = model(tokens, pixel_values=pv, attention_mask=batch["attention_mask"], return_type="loss")
    assert torch.isfinite(loss)
    splits = []
    with model.fed(prefix_len="random"):
        for _ in range(20):
            model(tokens, pixel_values=pv, return_type=None)
            splits.append(model.last_prefix_len)
    assert min(splits) >= 12 and max(splits) <= 22
    with model.fed(prefix_len="random"), pytest.raises(ValueError, match=r"needs a split in \[12, 11\]"):
        model(tokens[:, :12], pixel_values=pv, return_type=None)  # row 1's image ends the row


def test_image_count_errors(stand_in, batch):
    model, _ = stand_in
    tokens, pv = batch["input_ids"], batch["pixel_values"]
    with model.fed(prefix_len=12):
        with pytest.raises(ValueError, match=r"pixel_values holds 1 images, which need 4 image placeholder tokens"
                           r" \(4 each, image_token_id=514\); the tokens hold 8"):  # fmt: skip
            model(tokens, pixel_values=pv[:1])
        with pytest.raises(ValueError, match=r"The tokens hold 8 image placeholder tokens \(image_token_id=514\) "
                           r"but no pixel_values were given"):  # fmt: skip
            model(tokens)
        with pytest.raises(ValueError, match=r"pixel_values must be \[n_images, channels, height, width\]"):
            model(tokens, pixel_values=pv[0])
        with pytest.raises(TypeError, match="unexpected keyword"):
            model(tokens, images=pv)


def test_reconstruct_scores_no_placeholder(stand_in, batch):
    model, _ = stand_in
    tokens, pv = batch["input_ids"], batch["pixel_values"]
    with torch.no_grad(), model.fed("reconstruct"):
        per_token = model(tokens, pixel_values=pv, return_type="loss", loss_per_token=True)
    predicts_image = model.image_token_mask(tokens)[:, 1:]
    assert per_token.shape == (2, 22)
    assert float(per_token[predicts_image].abs().max()) == 0.0
    assert float(per_token[~predicts_image].min()) > 0.0


def test_generate_reads_the_image(stand_in, batch):
    model, _ = stand_in
    tokens, pv, am = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    out = model.generate(tokens, max_new_tokens=4, pixel_values=pv, attention_mask=am)
    ref = model.hf_model.generate(input_ids=tokens, pixel_values=pv, attention_mask=am, max_new_tokens=4,
                                  do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(out, ref)


def _many_batches(processor, n: int = 64, batch_size: int = 16):
    prompts = (synthetic.stand_in_texts() * 4)[:n]
    imgs = [stand_in_images.stand_in_image(i) for i in range(n)]
    return list(images.image_text_batches(processor, prompts, imgs, batch_size))


def test_harvest_rows_match_positions(stand_in):
    model, processor = stand_in
    batches = _many_batches(processor, n=16, batch_size=8)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    h_img = images.harvest(model, batches, "encoder.1.resid_post", "image", synthetic=True)
    h_txt = images.harvest(model, batches, "encoder_blocks.1.hook_resid_post", "text", synthetic=True)
    h_all = images.harvest(model, batches, "encoder_blocks.1.hook_resid_post", "both", synthetic=True)
    assert h_img.hook_name == "encoder_blocks.1.hook_resid_post"
    assert (h_img.n_images, h_img.n_image_positions, h_img.n_rows) == (16, 16 * MM, 16 * MM)
    assert h_txt.n_rows == real - 16 * MM
    assert h_all.n_rows == real
    h_vis = images.harvest(model, batches, "vision_blocks.1.hook_resid_post", synthetic=True)
    assert h_vis.activations.shape == (16 * N_PATCHES, D_VISION) and h_vis.positions == "patches"
    with pytest.raises(ValueError, match="is a decoder site: the decoder never reads images"):
        images.harvest(model, batches, "decoder_blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="is a vision-tower site: its rows are image patches only"):
        images.harvest(model, batches, "hook_mm_proj_out", "text")


@pytest.fixture(scope="module")
def image_sae(stand_in):
    model, processor = stand_in
    h = images.harvest(
        model, _many_batches(processor), "encoder_blocks.1.hook_resid_post", "image", synthetic=True
    )
    return images.train_sae(h, d_sae=128, architecture="batchtopk", k=8, training_samples=3200, batch_size=64)


def test_sae_trains_on_image_tokens_only(image_sae):
    result, h = image_sae, image_sae.harvest
    assert h.n_rows == h.n_image_positions == 64 * MM
    # Measured: FVU 1.51 -> 0.23 after 50 steps of 64 rows (CPU, torch 2.13).
    assert result.fvu_before > 1.0
    assert result.fvu_after < result.fvu_before / 4
    assert result.l0_after == pytest.approx(8.0, abs=0.5)
    meta = result.sae.cfg.metadata
    assert (meta.hook_name, meta.t5gemma2_positions, meta.t5gemma2_synthetic_data) == (
        h.hook_name,
        "image",
        True,
    )
    assert "synthetic data" in result.summary() and "d_sae=128" in result.summary()
    with pytest.raises(ValueError, match="holds 256 rows, fewer than one batch of 512"):
        images.train_sae(h, batch_size=512)


def test_image_tokens_are_marked(stand_in, batch, image_sae):
    from sae_lens_t5gemma.analysis.feature_stats import Example
    from sae_lens_t5gemma.dashboard.pages import rendered_tokens

    model, _ = stand_in
    tokens = batch["input_ids"]
    strs = model.to_str_tokens(tokens[0])
    assert [i for i, t in enumerate(strs) if t == "<img>"] == [4, 5, 6, 7]
    assert model.token_string(514) == images.IMAGE_TOKEN_LABEL == "<img>"
    hits = images.top_features_with_images(model, image_sae.sae, batch, k=1, per_token=True)
    assert hits and all((h.token == "<img>") == (4 <= h.position <= 7) for h in hits)
    assert {h.position for h in hits if h.token == "<img>"} == {4, 5, 6, 7}
    top = images.top_features_with_images(model, image_sae.sae, batch, k=5, row=1)
    assert len(top) == 5 and [h.activation for h in top] == sorted((h.activation for h in top), reverse=True)
    example = Example(row=0, position=4, split=None, activation=1.0, tokens=strs[:6], token_ids=tokens[0, :6].tolist(),
                      acts=[0.0] * 4 + [1.0, 0.5], segments=["encoder input"] * 6, center=4)  # fmt: skip
    rendered = rendered_tokens(example, max_act=1.0)
    assert [r["image"] for r in rendered] == [False] * 4 + [True, True]
    assert rendered[4]["title"] == "image token · '<img>': activation 1 · encoder input"


def test_saes_are_refused_at_vision_sites(stand_in):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    model, _ = stand_in
    sae = StandardSAE(
        StandardSAEConfig(d_in=D_VISION, d_sae=8, metadata=SAEMetadata(hook_name="vision.0.attn_out"))
    )
    with pytest.raises(
        ValueError,
        match=r"Hook vision_blocks\.0\.hook_attn_out \(from 'vision\.0\.attn_out'\) is a vision-tower site",
    ):
        model.add_sae(sae)
    assert not model._acts_to_saes
