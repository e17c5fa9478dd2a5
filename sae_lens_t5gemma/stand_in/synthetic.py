"""Synthetic stand-ins for what this machine cannot download.

Real T5Gemma 2, Gemma 3 and SAE weights live on the Hugging Face hub. For offline tests,
the demo and the notebooks this module builds:

- tiny random ``T5Gemma2ForConditionalGeneration`` models from config (and one with the
  real 270m-270m text dimensions, for benchmarks: speed does not depend on weight values);
- a small BPE tokenizer with Gemma's special ids (pad 0, eos 1, bos 2), saved to a folder;
- a throwaway Hugging Face cache laid out exactly as the hub's cache is, so that the real
  ``hf_hub_download`` / ``from_pretrained`` code paths run unchanged with ``HF_HUB_OFFLINE=1``;
- mindchain-format SAE checkpoints with random weights.

Everything here is labelled synthetic wherever it is shown to a user.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma._compat import hub_settings
from sae_lens_t5gemma.loading.mindchain import mindchain_filename

# The stand-ins sit under the real ids, whose one home is model/sizes.py.
from sae_lens_t5gemma.model import sizes as sizes
from sae_lens_t5gemma.model.sizes import (  # noqa: F401 (the ids the stand-ins serve)
    GEMMA3_MODEL,
    GEMMA_SCOPE_RELEASES,
    GEMMA_SCOPE_REPO,
    MINDCHAIN_REPO,
    T5GEMMA2_MODEL,
)

TINY_TEXT_DIMS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=1, head_dim=16, vocab_size=512, sliding_window=8,
    max_position_embeddings=512, query_pre_attn_scalar=16,
)  # fmt: skip
_TINY_VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    image_size=28, patch_size=14,
)  # fmt: skip
SPECIAL_TOKENS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}


def stand_in_texts() -> list[str]:
    """The embedded default corpus: a few dozen plain English sentences."""
    text = files("sae_lens_t5gemma").joinpath("data/stand_in.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def t5gemma2_config(real_dims: bool = False, size: str | None = None, **text_overrides: Any):
    """A ``T5Gemma2Config`` with tiny (default) or real text dimensions.

    Args:
        real_dims: the real text dimensions (of ``size``, 270m-270m by default), for benchmarks.
        size: ``"270m"``, ``"1b"`` or ``"4b"`` (see :data:`~sae_lens_t5gemma.model.sizes.SIZES`): a
            stand-in with that size's structure (layer pattern, heads, KV heads, head_dim,
            RoPE bases and scaling, sliding window, soft-caps, ``query_pre_attn_scalar``) and
            shrunken widths, vocabulary and depth; with ``real_dims``, the real size. None
            (default): the original tiny stand-in (head_dim 16, window 8, default RoPE).
        **text_overrides: text-config fields for both stacks (``num_hidden_layers`` alone
            re-derives the layer pattern).

    The vision tower is always tiny.
    """
    from transformers import T5Gemma2Config

    if size is not None or real_dims:
        spec = sizes.get_size(size or sizes.DEFAULT_SIZE)
        dims = spec.t5gemma2_text if real_dims else spec.stand_in_text("t5gemma2")
        text = dims.config_kwargs()
        if "num_hidden_layers" in text_overrides and "layer_types" not in text_overrides:
            text["layer_types"] = list(sizes.gemma3_layer_types(text_overrides["num_hidden_layers"]))
        text.update(text_overrides)
    else:
        text = dict(TINY_TEXT_DIMS)
        text.update(text_overrides)
        n = text["num_hidden_layers"]
        # Gemma 3's pattern: 5 sliding-window layers, then 1 full-attention layer.
        text.setdefault(
            "layer_types",
            ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)],
        )
        if n <= 2 and "layer_types" not in text_overrides:
            text["layer_types"] = ["sliding_attention", "full_attention"][:n]
    text.update(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=_TINY_VISION, mm_tokens_per_image=4),
        decoder=dict(text),
        tie_word_embeddings=True,
    )


def build_t5gemma2(real_dims: bool = False, seed: int = 0, size: str | None = None, **text_overrides: Any):
    """A random-init ``T5Gemma2ForConditionalGeneration`` in eval mode (see :func:`t5gemma2_config`)."""
    from transformers import T5Gemma2ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(t5gemma2_config(real_dims, size, **text_overrides))
    return model.eval()


def build_tokenizer(folder: str | Path, vocab_size: int = 512):
    """Train a small BPE tokenizer on the embedded corpus and save it to ``folder``.

    It has Gemma's special ids (pad 0, eos 1, bos 2) and prepends ``<bos>`` like Gemma's.
    Returns the loaded ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stand_in_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    folder = Path(folder)
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def save_stand_in_model(
    folder: str | Path, real_dims: bool = False, seed: int = 0, size: str | None = None
) -> Path:
    """Save a random model and a matching tokenizer to ``folder`` (loadable by ``from_pretrained``)."""
    folder = Path(folder)
    build_t5gemma2(real_dims, seed, size).save_pretrained(folder)
    build_tokenizer(folder)
    return folder


# --------------------------------------------------------------------------- hub cache


def _repo_folder(cache_dir: Path, repo_id: str, repo_type: str = "model") -> Path:
    return cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"


def write_hub_repo(
    cache_dir: str | Path, repo_id: str, payload: dict[str, bytes | Path], revision: str = "main"
) -> Path:
    """Write files into ``cache_dir`` laid out as the hub's cache is.

    ``blobs/<sha256>`` hold the bytes, ``snapshots/<commit>/<path>`` link to them and
    ``refs/<revision>`` names the commit, so ``hf_hub_download`` finds them offline.

    Args:
        cache_dir: the cache root (what ``HF_HUB_CACHE`` points at).
        repo_id: e.g. ``mindchain/t5gemma2-sae-all-layers``.
        payload: repo-relative path -> file bytes, or a local file to copy.

    Returns:
        The snapshot folder.
    """
    repo = _repo_folder(Path(cache_dir), repo_id)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for rel, data in payload.items():
        raw = data.read_bytes() if isinstance(data, Path) else data
        blob = repo / "blobs" / hashlib.sha256(raw).hexdigest()
        blob.write_bytes(raw)
        target = snapshot / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(os.path.relpath(blob, target.parent))
    return snapshot


def write_hub_folder(cache_dir: str | Path, repo_id: str, folder: str | Path) -> Path:
    """Place every file of a local folder (e.g. a saved model) in the cache as ``repo_id``."""
    folder = Path(folder)
    payload = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return write_hub_repo(cache_dir, repo_id, payload)


def offline_hub(cache_dir: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Serve the hub from ``cache_dir`` only, as ``HF_HUB_OFFLINE=1`` does, for a block."""
    return hub_settings(cache_dir, offline=True)


# ------------------------------------------------------------------ mindchain checkpoints


def mindchain_checkpoint(
    stack: str,
    layer: int,
    d_in: int = 640,
    d_sae: int = 4096,
    seed: int = 0,
    model_name: str = T5GEMMA2_MODEL,
) -> dict[str, Any]:
    """A checkpoint dict in the mindchain format, with random weights from ``seed``."""
    g = torch.Generator().manual_seed(seed * 1000 + layer * 2 + (stack == "decoder"))
    scale = d_in**-0.5
    return {
        "model_name": model_name,
        "layer_type": stack,
        "layer_idx": layer,
        "d_in": d_in,
        "d_sae": d_sae,
        "W_enc": torch.randn(d_in, d_sae, generator=g) * scale,
        "b_enc": torch.randn(d_sae, generator=g) * 0.01,
        "W_dec": torch.randn(d_sae, d_in, generator=g) * d_sae**-0.5,
        "b_dec": torch.randn(d_in, generator=g) * 0.01,
        "history": {"loss": [0.01, 0.002, 0.0014], "l0": [2000.0, 1500.0, 1367.0]},
    }


def write_mindchain_repo(
    cache_dir: str | Path, n_layers: int = 18, d_in: int = 640, d_sae: int = 4096, seed: int = 0
) -> Path:
    """Write a full synthetic mindchain repo (both stacks, ``n_layers`` each) into the cache."""
    import io

    payload: dict[str, bytes | Path] = {}
    for stack in ("encoder", "decoder"):
        for layer in range(n_layers):
            buf = io.BytesIO()
            torch.save(mindchain_checkpoint(stack, layer, d_in, d_sae, seed), buf)
            payload[mindchain_filename(stack, layer)] = buf.getvalue()
    payload["README.md"] = b"Synthetic stand-in for mindchain/t5gemma2-sae-all-layers (random weights).\n"
    return write_hub_repo(cache_dir, MINDCHAIN_REPO, payload)


STAND_IN_LAYERS = 18
STAND_IN_D_SAE = 256


def write_stand_in_hub(cache_dir: str | Path, seed: int = 0, size: str | None = None) -> Path:
    """The embedded default: a throwaway hub cache holding synthetic stand-ins.

    - ``google/t5gemma-2-270m-270m``: a tiny random T5Gemma 2 (hidden 64, 18 layers per
      stack, so every mindchain id has a layer) with the small BPE tokenizer;
    - ``mindchain/t5gemma2-sae-all-layers``: 36 mindchain-format checkpoints, d_in 64,
      d_sae 256, random weights.

    Both sit under the real repo ids, so the code path is exactly the one users run online
    once ``offline_hub(cache_dir)`` is active. Returns ``cache_dir``.

    Args:
        size: ``"270m"``, ``"1b"`` or ``"4b"``: instead, the stand-in with that size's structure
            (:func:`t5gemma2_config`) under that size's real id (``SIZES[size].t5gemma2_id``).
            The mindchain SAEs exist for 270m only; with ``size="270m"`` they match the
            stand-in's width and depth.
    """
    import tempfile

    cache_dir = Path(cache_dir)
    if size is None:
        repo, n_layers, d_model = T5GEMMA2_MODEL, STAND_IN_LAYERS, TINY_TEXT_DIMS["hidden_size"]
        overrides: dict[str, Any] = {"num_hidden_layers": STAND_IN_LAYERS}
    else:
        spec, overrides = sizes.get_size(size), {}
        dims = spec.stand_in_text("t5gemma2")
        repo, n_layers, d_model = spec.t5gemma2_id, dims.num_hidden_layers, dims.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_t5gemma2(seed=seed, size=size, **overrides).save_pretrained(folder)
        build_tokenizer(folder)
        write_hub_folder(cache_dir, repo, folder)
    if repo == T5GEMMA2_MODEL:
        write_mindchain_repo(cache_dir, n_layers, d_in=d_model, d_sae=STAND_IN_D_SAE, seed=seed)
    return cache_dir


# ------------------------------------------------------- Gemma 3 + Gemma Scope 2 (issue 5)

# The transformers module each Gemma Scope 2 site reads (``hf_hook_point_in`` in config.json).
GEMMA_SCOPE_HF_POINTS = {
    "attn_out": "model.layers.{layer}.self_attn.o_proj.input",
    "resid_post": "model.layers.{layer}.output",
    "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
}
GEMMA_SCOPE_STAND_IN_D_SAE = 128
# T5Gemma 2's encoder layer norms carry other names than Gemma 3's decoder layer norms.
_T5_TO_GEMMA3_NORMS = {
    "pre_self_attn_layernorm": "input_layernorm",
    "post_self_attn_layernorm": "post_attention_layernorm",
}


def gemma3_from_t5gemma2_encoder(t5_model: Any, size: str | None = None):
    """A ``Gemma3ForCausalLM`` carrying the text encoder weights of a T5Gemma 2 model.

    The real T5Gemma 2 was initialised from Gemma 3; the stand-in mirrors that relation the
    other way round, so that applying a Gemma 3 SAE to the T5Gemma 2 encoder differs on the
    stand-in only by what differs on the real pair in structure (bidirectional attention,
    and the RoPE scaling T5Gemma 2 added), not by unrelated random weights.

    Args:
        size: take Gemma 3's own weightless structure for that size (RoPE bases and scaling,
            sliding window, positions) from :data:`~sae_lens_t5gemma.model.sizes.SIZES` instead of
            copying the T5Gemma 2 encoder's; the weight shapes must agree.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    text_cfg = t5_model.config.encoder.text_config.to_dict()
    if size is not None:
        own = sizes.get_size(size).stand_in_text("gemma3").config_kwargs()
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size"):  # fmt: skip
            if text_cfg[field] != own[field]:
                raise ValueError(
                    f"gemma3_from_t5gemma2_encoder(size={size!r}): the T5Gemma 2 encoder's {field} is "
                    f"{text_cfg[field]}, the {size} Gemma 3 stand-in's is {own[field]}; build the "
                    f"T5Gemma 2 model with build_t5gemma2(size={size!r})."
                )
        text_cfg |= {k: own[k] for k in ("rope_parameters", "sliding_window", "max_position_embeddings",
                                          "layer_types", "query_pre_attn_scalar")}  # fmt: skip
    keep = set(Gemma3TextConfig().to_dict()) - {"model_type", "architectures", "transformers_version"}
    cfg = Gemma3TextConfig(**{k: v for k, v in text_cfg.items() if k in keep})
    cfg.use_bidirectional_attention = False
    cfg.architectures = ["Gemma3ForCausalLM"]
    gemma3 = Gemma3ForCausalLM(cfg)
    state = {}
    for name, tensor in t5_model.model.encoder.text_model.state_dict().items():
        if name == "embed_tokens.eoi_embedding":  # multimodal end-of-image token: not in Gemma 3 text
            continue
        for old, new in _T5_TO_GEMMA3_NORMS.items():
            name = name.replace(old, new)
        state[name] = tensor
    gemma3.model.load_state_dict(state, strict=True)
    gemma3.tie_weights()
    return gemma3.eval()


def _releases(size: str | None) -> dict[str, str]:
    return dict(GEMMA_SCOPE_RELEASES if size is None else sizes.get_size(size).gemma_scope_releases)


def gemma_scope_ids(
    site: str, widths: tuple[str, ...] = ("16k",), size: str | None = None
) -> dict[str, tuple[str, float]]:
    """SAE id -> (repo folder, expected L0) of one Gemma Scope 2 every-layer release.

    Read from SAELens' own ``pretrained_saes.yaml``, so the stand-in's folder names are
    exactly the ones SAELens asks the hub for. ``size`` None means 270m.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory()[_releases(size)[site]]
    return {
        sae_id: (path, lookup.expected_l0[sae_id])
        for sae_id, path in lookup.saes_map.items()
        if any(f"_width_{w}_" in sae_id for w in widths)
    }


def gemma_scope_config(
    site: str, layer: int, d_sae: int, l0: float, size: str | None = None
) -> dict[str, Any]:
    """A Gemma Scope 2 ``config.json`` for one SAE, with the real files' fields."""
    point = GEMMA_SCOPE_HF_POINTS[site].format(layer=layer)
    size_name = size or "270m"
    return {
        "width": d_sae,
        # The real 270m files name the model "google/gemma-3-270m-pt"; SAELens' loader maps it.
        "model_name": f"google/gemma-3-{size_name}-pt",
        "architecture": "jump_relu",
        "l0": l0,
        "affine_connection": False,
        "hf_hook_point_in": point,
        "hf_hook_point_out": point,
        "type": "sae",
    }


def gemma_scope_params(
    d_in: int, d_sae: int, seed: int = 0, threshold_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Random JumpReLU parameters in Gemma Scope 2's layout (``w_enc`` is [d_in, d_sae]).

    ``threshold_scale`` raises the thresholds (a sparser SAE: lower L0).
    """
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    return {
        "w_enc": w_dec.T.contiguous(),  # tied at init, as Gemma Scope trains from
        "w_dec": w_dec,
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
        "threshold": torch.rand(d_sae, generator=g) * 0.5 * threshold_scale,
    }


# Stand-in L0 targets of the fitted variants (d_sae 128): the real small/big are 10-20 / 60-150 of 16k.
STAND_IN_FITTED_L0 = {"small": 6.0, "big": 24.0}


def fitted_gemma_scope_params(
    acts: torch.Tensor, d_sae: int, l0: float, seed: int = 0
) -> dict[str, torch.Tensor]:
    """JumpReLU parameters fitted to activations, in Gemma Scope 2's layout: a stand-in that explains variance.

    The decoder holds ± the top ``d_sae // 2`` principal directions of ``acts`` (random unit
    vectors where there are fewer), the encoder is tied to it with ``b_enc`` centring the input,
    ``b_dec`` is the mean, and one threshold for every feature makes the mean L0 on ``acts``
    equal ``l0``. It then reconstructs the centred activation's components that exceed the
    threshold: a lower L0, less variance explained, as for real SAEs. Synthetic, not trained.
    """
    acts = acts.double()
    mean = acts.mean(0)
    centred = acts - mean
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    dirs = vh[: d_sae // 2]
    if dirs.shape[0] < d_sae // 2:
        extra = torch.randn(
            d_sae // 2 - dirs.shape[0], acts.shape[1], generator=torch.Generator().manual_seed(seed)
        )
        dirs = torch.cat([dirs, extra.double() / extra.norm(dim=1, keepdim=True)])
    w_dec = torch.cat([dirs, -dirs])
    pre = (centred @ w_dec.T).flatten()
    # The threshold leaving l0 * tokens values above it: the (size - that)-th smallest.
    above = min(int(l0 * acts.shape[0]), pre.numel() - 1)
    threshold = pre.kthvalue(pre.numel() - above).values.clamp_min(1e-6)
    return {
        "w_enc": w_dec.T.contiguous().float(),
        "w_dec": w_dec.float(),
        "b_enc": (-(mean @ w_dec.T)).float(),
        "b_dec": mean.float(),
        "threshold": torch.full((d_sae,), float(threshold)),
    }


def gemma3_site_activations(
    model: Any, tokenizer: Any, texts: list[str], n_layers: int
) -> dict[tuple[str, int], torch.Tensor]:
    """Activations of a transformers Gemma 3 at each Gemma Scope 2 site (``GEMMA_SCOPE_HF_POINTS``).

    ``(site, layer) -> [tokens, d]`` over ``texts`` (one right-padded batch; BOS and padding left out).
    """
    layers = model.model.layers
    acts: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def keep(key: tuple[str, int], x: torch.Tensor) -> None:
        acts[key] = x.detach()

    for layer in range(n_layers):
        handles += [
            layers[layer].register_forward_hook(
                lambda m, a, out, k=("resid_post", layer): keep(k, out[0] if isinstance(out, tuple) else out)
            ),
            layers[layer].self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, k=("attn_out", layer): keep(k, a[0])
            ),
            layers[layer].post_feedforward_layernorm.register_forward_hook(
                lambda m, a, out, k=("mlp_out", layer): keep(k, out)
            ),
        ]
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    real[:, 0] = False  # BOS: a special token, left out as the evaluations leave it out
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {key: x[real] for key, x in acts.items()}


def write_gemma_scope_repo(
    cache_dir: str | Path,
    n_layers: int | None = None,
    d_in: dict[str, int] | None = None,
    d_sae: int = GEMMA_SCOPE_STAND_IN_D_SAE,
    sites: tuple[str, ...] = ("attn_out", "resid_post", "mlp_out"),
    widths: tuple[str, ...] = ("16k",),
    seed: int = 0,
    size: str | None = None,
    fit_to: dict[tuple[str, int], torch.Tensor] | None = None,
) -> Path:
    """Write Gemma Scope 2 SAEs laid out as in ``google/gemma-scope-2-270m-pt`` (or ``size``'s repo).

    One ``<site>_all/layer_{L}_width_{W}_l0_{small|big}/`` folder per SAELens id with layer
    below ``n_layers`` and a width in ``widths``, each holding ``config.json`` and
    ``params.safetensors`` (``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``).
    The folder name keeps the real width label; the tensors are ``d_sae`` wide.

    Args:
        n_layers: layers with SAEs; default the stand-in's depth (18, or ``size``'s stand-in).
        d_in: input width per site; default 64 everywhere (the stand-in's hidden size and
            its n_heads * head_dim = 4 * 16), or ``size``'s Gemma 3 stand-in widths
            (``attn_out``: heads x head_dim, the o_proj input; others: hidden).
        size: ``"270m"``, ``"1b"`` or ``"4b"``: that size's repo (``SIZES[size].gemma_scope_repo``)
            and releases; None is the original 270m stand-in.
        fit_to: ``(site, layer) -> activations`` (:func:`gemma3_site_activations`): those SAEs are
            fitted (:func:`fitted_gemma_scope_params`, L0 per :data:`STAND_IN_FITTED_L0`) instead
            of random.
    """
    import json

    from safetensors.torch import save as save_safetensors

    if size is None:
        repo, default_layers = GEMMA_SCOPE_REPO, STAND_IN_LAYERS
        d_in = {site: TINY_TEXT_DIMS["hidden_size"] for site in sites} | (d_in or {})
    else:
        spec = sizes.get_size(size)
        dims = spec.stand_in_text("gemma3")
        repo, default_layers = spec.gemma_scope_repo, dims.num_hidden_layers
        d_in = {site: spec.gemma_scope_d_in(site, dims) for site in sites} | (d_in or {})
    n_layers = default_layers if n_layers is None else n_layers
    payload: dict[str, bytes | Path] = {}
    for s_index, site in enumerate(sites):
        for sae_id, (folder, l0) in sorted(gemma_scope_ids(site, widths, size).items()):
            layer = int(sae_id.split("_")[1])
            if layer >= n_layers:
                continue
            # Variants differ as the real ones do: the small-L0 variant (expected L0 below 50)
            # gets thresholds 3x higher, so it fires less often; each variant its own seed.
            variant_seed = int(hashlib.sha1(sae_id.encode()).hexdigest()[:6], 16)
            if fit_to is not None and (site, layer) in fit_to:
                target = STAND_IN_FITTED_L0["small" if l0 < 50 else "big"]
                params = fitted_gemma_scope_params(fit_to[(site, layer)], d_sae, target, seed=variant_seed)
            else:
                params = gemma_scope_params(
                    d_in[site], d_sae, seed=seed * 10007 + s_index * 1009 + variant_seed,
                    threshold_scale=3.0 if l0 < 50 else 1.0,
                )  # fmt: skip
            payload[f"{folder}/params.safetensors"] = save_safetensors(params)
            config = gemma_scope_config(site, layer, d_sae, l0, size)
            payload[f"{folder}/config.json"] = json.dumps(config, indent=2).encode()
    kind = "weights fitted to the Gemma 3 stand-in's activations" if fit_to else "random weights"
    payload["README.md"] = f"Synthetic stand-in for {repo} ({kind}).\n".encode()
    return write_hub_repo(cache_dir, repo, payload)


def write_gemma3_stand_in_hub(cache_dir: str | Path, seed: int = 0, size: str | None = None) -> Path:
    """Add the Gemma 3 side to a stand-in hub cache.

    - ``google/gemma-3-270m``: a tiny ``Gemma3ForCausalLM`` (18 layers, hidden 64) holding
      the text-encoder weights of the T5Gemma 2 stand-in built from the same ``seed``, with
      the same small tokenizer;
    - ``google/gemma-scope-2-270m-pt``: Gemma Scope 2 stand-ins for the three every-layer
      releases (``-att-all``, ``-res-all``, ``-mlp-all``), width-16k ids only, d_sae 128,
      fitted to that Gemma 3's activations on the embedded corpus (:func:`fitted_gemma_scope_params`:
      principal directions, one threshold per SAE; small L0 6, big L0 24).

    With ``size`` (``"270m"``, ``"1b"``, ``"4b"``), the same for that size under its real ids
    (``SIZES[size].gemma3_id``, ``.gemma_scope_repo``): the Gemma 3 stand-in carries the
    encoder of ``build_t5gemma2(seed=seed, size=size)`` with Gemma 3's own RoPE and window
    for that size (a text-only ``Gemma3ForCausalLM`` even for 4b, whose real checkpoint is
    multimodal), and the Gemma Scope 2 SAEs have its widths (``attn_out``: heads x head_dim).

    Returns ``cache_dir``.
    """
    import tempfile

    cache_dir = Path(cache_dir)
    if size is None:
        t5, repo = build_t5gemma2(seed=seed, num_hidden_layers=STAND_IN_LAYERS), GEMMA3_MODEL
    else:
        t5, repo = build_t5gemma2(seed=seed, size=size), sizes.get_size(size).gemma3_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gemma3"
        gemma3 = gemma3_from_t5gemma2_encoder(t5, size)
        gemma3.save_pretrained(folder)
        tokenizer = build_tokenizer(folder)
        write_hub_folder(cache_dir, repo, folder)
    # SAEs fitted to Gemma 3's activations on the embedded corpus, so that they explain variance
    # there (random ones explain none) and the comparison's transfer measures have something to keep.
    acts = gemma3_site_activations(gemma3, tokenizer, stand_in_texts(), gemma3.config.num_hidden_layers)
    write_gemma_scope_repo(cache_dir, seed=seed, size=size, fit_to=acts)
    return cache_dir
