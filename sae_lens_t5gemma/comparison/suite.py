"""One eval harness for SAEs on T5Gemma 2 and Gemma 3: a side-by-side report with plots.

:func:`compare` evaluates (model, SAE) pairs on the same token batches with SAELens' own
``run_evals`` (explained variance, MSE, cosine similarity, L0, feature density, CE-loss
and KL scores from splicing the SAE in) and times each evaluation. Sources:

- the mindchain release on T5Gemma 2 (``t5gemma2-270m-attn_out:encoder/layer_5``), run
  through :class:`~sae_lens_t5gemma.model.hooked.HookedT5Gemma2`;
- Gemma Scope 2 releases on Gemma 3 270M (``gemma-scope-2-270m-pt-res-all:layer_5_width_16k_l0_small``),
  loaded by SAELens' ``gemma_3`` loader, with Gemma 3 run through TransformerLens
  (:func:`~sae_lens_t5gemma.loading.gemma_scope.load_gemma3`);
- SAEs trained with this package, or any SAELens folder (a path);
- any other SAELens release, on its TransformerLens model.

**Honest sites.** Every row names its model, stack, layer, hook and site in plain words,
with the SAE's width. A *site key* (``SITE_WORDS``) says which activation a hook reads;
rows are compared like with like only where the keys agree. Gemma Scope 2's "attn_out"
SAEs read the o_proj *input* (``hook_z``, n_heads × d_head = 1024 wide on the real model),
the mindchain SAEs the o_proj *output* (640 wide): different activations, never compared.

**Transfer.** A pair may apply an SAE at another model's hook (``hook_name``): a Gemma
Scope 2 SAE at the T5Gemma 2 encoder site with the same key and layer. The report sets
each transfer row beside the same SAE on its own model (evaluated automatically if not
asked for) and beside the native SAEs of that layer.

**hook_z.** Both Gemma 3 under TransformerLens and ``HookedT5Gemma2`` give ``hook_z`` as
``[batch, pos, n_heads, d_head]``. SAELens' evals flatten the last two dimensions of any
hook named ``hook_z`` (head-major, as transformers concatenates heads before o_proj), and
Gemma Scope 2's loader sets ``reshape_activations="none"``, so the same SAE reads the same
layout of o_proj input on both models; :func:`compare` checks that the width fits first.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.model import sites as sites_mod
from sae_lens_t5gemma.model.dtypes import dtype_name, resolve_dtype, sae_dtype
from sae_lens_t5gemma.outputs import owned_outputs
from sae_lens_t5gemma.loading.registration import PACKAGE_RELEASE
from sae_lens_t5gemma.comparison.report import (  # noqa: F401 (re-exported: the comparison API in one import)
    CE_KL_CAVEAT,
    HONEST_SITES_NOTE,
    SITE_WORDS,
    SYNTHETIC_PREFIX,
    Report,
    Row,
    TransferRow,
    matched_variants,
    write_report,
)
from sae_lens_t5gemma.stand_in.synthetic import T5GEMMA2_MODEL
from sae_lens_t5gemma.comparison.transfer import FeatureTransfer, ev_kept

MINDCHAIN_RELEASE = PACKAGE_RELEASE
DEFAULT_GEMMA_SCOPE_VARIANT = (
    "all"  # every variant of the width: the L0 sweep, matched per layer in the report
)


# TransformerLens hook suffix -> site key (for models with Gemma's sandwich norms, the
# attn/mlp outputs are taken after the post-sublayer norm: see ``_describe_tl_hook``).
_TL_SUFFIXES = {
    "hook_resid_pre": "resid_pre",
    "attn.hook_z": "attn_z",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
# Gemma 3 site key -> the T5Gemma 2 site kind reading the same activation. Gemma 3's
# hook_attn_out / hook_mlp_out sit after the post-sublayer norm, so they map onto T5Gemma 2's
# post-norm sites (hook_attn_out_normed / hook_mlp_out_normed), not onto its o_proj / MLP outputs.
TRANSFER_KINDS = {
    "resid_pre": "resid_pre",
    "attn_z": "attn_z",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
    "attn_out_normed": "attn_out_normed",
    "mlp_out_normed": "mlp_out_normed",
}
# The decoder's self_attn merges self- and cross-attention: its z and attention output are not
# Gemma 3's self-attention, so attention sites transfer onto the encoder only.
_ENCODER_ONLY_KINDS = ("attn_z", "attn_out_normed")
# The TransformerLens hook each Gemma Scope 2 site's SAEs read (SAELens' gemma_3 loader).
_GEMMA_SCOPE_HOOKS = {"attn_out": "attn.hook_z", "resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out"}


# ----------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """One (model, SAE) pair to evaluate.

    ``sae`` is ``RELEASE:SAE_ID`` (any registered SAELens release) or a local SAELens folder
    (``cfg.json`` + ``sae_weights.safetensors``, as training here writes). ``model`` is a hub id
    or folder; by default the SAE's own model. ``hook_name`` applies the SAE at another hook
    (transfer); by default its own.
    """

    sae: str
    model: str | None = None
    hook_name: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Pair:
        """Parse ``sae=SPEC[,model=NAME][,hook=HOOK]``, or a bare SAE spec.

        Raises:
            ValueError: unknown key or no ``sae``.
        """
        if "=" not in spec:
            return cls(sae=spec.strip())
        parts: dict[str, str] = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in ("sae", "model", "hook"):
                raise ValueError(f"Pair {spec!r}: expected 'sae=...,model=...,hook=...', got {item!r}.")
            parts[key] = value.strip()
        if not parts.get("sae"):
            raise ValueError(f"Pair {spec!r} names no SAE (sae=RELEASE:SAE_ID or a folder).")
        return cls(sae=parts["sae"], model=parts.get("model") or None, hook_name=parts.get("hook") or None)


def _releases(size: str) -> Mapping[str, str]:
    """Gemma Scope 2 every-layer releases (site -> SAELens release name) for a model size."""
    from sae_lens_t5gemma.model.sizes import get_size

    return get_size(size).gemma_scope_releases


def transfer_hook(gemma3_hook: str, stack: str = "encoder") -> str | None:
    """The T5Gemma 2 hook reading the same activation as a Gemma 3 (TransformerLens) hook.

    ``blocks.5.attn.hook_z`` -> ``encoder_blocks.5.attn.hook_z``; ``blocks.5.hook_mlp_out``
    (after post_feedforward_layernorm, as Gemma Scope 2's mlp_out SAEs read it) ->
    ``encoder_blocks.5.hook_mlp_out_normed``. With ``stack="decoder"``, the decoder's hook, or
    None for attention sites (the decoder's self_attn merges self- and cross-attention).
    None where T5Gemma 2 has no such site.
    """
    parts = gemma3_hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    key = _TL_SUFFIXES.get(".".join(parts[2:]))
    if key in ("attn_out", "mlp_out"):  # Gemma 3 has sandwich norms: these hooks are post-norm
        key += "_normed"
    kind = TRANSFER_KINDS.get(key or "")
    if kind is None or (stack == "decoder" and kind in _ENCODER_ONLY_KINDS):
        return None
    return sites_mod.site(stack, int(parts[1]), kind).hook_name


def gemma_scope_variants(
    site: str, layer: int, widths: Sequence[str] = ("16k",), size: str = "270m"
) -> list[str]:
    """Every Gemma Scope 2 every-layer id at ``layer`` with a width in ``widths``, by expected L0.

    Read from SAELens' own release YAML: ``layer_5_width_16k_l0_small`` (L0 10-20) and
    ``..._l0_big`` (60-150) for the ``-all`` releases of the model ``size``.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release = _releases(size)[site]
    lookup = get_pretrained_saes_directory()[release]
    ids = [
        i
        for i in lookup.saes_map
        if i.startswith(f"layer_{layer}_") and any(f"_width_{w}_" in i for w in widths)
    ]
    if not ids:
        raise ValueError(f"{release} has no SAE at layer {layer} with a width in {list(widths)}.")
    return sorted(ids, key=lambda i: (lookup.expected_l0.get(i) or 0, i))


def standard_pairs(
    layers: Iterable[int],
    mindchain: bool = True,
    decoder: bool = True,
    gemma_scope_sites: Sequence[str] = ("attn_out", "resid_post", "mlp_out"),
    gemma_scope_variant: str = DEFAULT_GEMMA_SCOPE_VARIANT,
    transfer: bool = True,
    local_saes: Sequence[str | Path] = (),
    t5gemma2_model: str = T5GEMMA2_MODEL,
    gemma_scope_widths: Sequence[str] = ("16k",),
    transfer_stacks: Sequence[str] = ("encoder", "decoder"),
    size: str = "270m",
) -> list[Pair]:
    """The usual comparison at some layers.

    Per layer: the mindchain encoder (and decoder) SAE on T5Gemma 2; the Gemma Scope 2
    every-layer SAEs at ``gemma_scope_sites`` on Gemma 3: with ``gemma_scope_variant="all"``
    (default) every variant of ``gemma_scope_widths`` (small and big L0, so the report can
    match each T5Gemma 2 SAE to the variant nearest in L0 and plot the L0 sweep), else the
    one named (e.g. ``width_16k_l0_small``); and, with ``transfer``, each of them applied at
    the same activation of T5Gemma 2's ``transfer_stacks`` (:func:`transfer_hook`). Then each
    local folder.

    ``size`` (``270m``, ``1b``, ``4b``) picks T5Gemma 2, Gemma 3 and the Gemma Scope 2
    releases of that size (:data:`~sae_lens_t5gemma.model.sizes.SIZES`). The mindchain SAEs exist
    for 270M only, so other sizes leave them out.
    """
    from sae_lens_t5gemma.model.sizes import get_size

    layers = list(layers)
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0]
    if bad:
        raise ValueError(f"layers (--layers): {bad[0]!r} is not a layer index (an integer >= 0).")
    releases = _releases(size)
    if size != "270m":
        mindchain = False  # the community SAEs were trained on 270M-270M only
        if t5gemma2_model == T5GEMMA2_MODEL:
            t5gemma2_model = get_size(size).t5gemma2_id
    pairs: list[Pair] = []
    for layer in layers:
        if mindchain:
            stacks = ("encoder", "decoder") if decoder else ("encoder",)
            pairs += [Pair(f"{MINDCHAIN_RELEASE}:{stack}/layer_{layer}", t5gemma2_model) for stack in stacks]
        for gs_site in gemma_scope_sites:
            if gs_site not in releases:
                raise ValueError(
                    f"Unknown Gemma Scope 2 site {gs_site!r}: expected one of {sorted(releases)}."
                )
            if gemma_scope_variant == "all":
                ids = gemma_scope_variants(gs_site, layer, gemma_scope_widths, size)
            else:
                ids = [f"layer_{layer}_{gemma_scope_variant}"]
            for sae_id in ids:
                spec = f"{releases[gs_site]}:{sae_id}"
                pairs.append(Pair(spec))
                for stack in transfer_stacks if transfer else ():
                    target = transfer_hook(f"blocks.{layer}.{_GEMMA_SCOPE_HOOKS[gs_site]}", stack)
                    if target is not None:
                        pairs.append(Pair(spec, t5gemma2_model, target))
    pairs += [Pair(str(p)) for p in local_saes]
    return pairs


# ---------------------------------------------------------------------------- loading


def _family_of_name(name: str) -> str:
    low = name.lower()
    if "t5gemma-2" in low or "t5gemma2" in low:
        return "T5Gemma 2"
    if "gemma-3" in low or "gemma3" in low:
        return "Gemma 3"
    return name


def _load_model(name: str, device: str, dtype: torch.dtype) -> tuple[Any, str]:
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


def _check_sae_spec(spec: str) -> None:
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


def _load_sae(spec: str, device: str) -> tuple[Any, str]:
    """(SAE, source label) for ``RELEASE:SAE_ID`` or a folder."""
    from sae_lens import SAE

    if Path(spec).exists():
        return SAE.load_from_disk(spec, device=device), "local"
    release, _, sae_id = spec.partition(":")
    if release.startswith("gemma-scope-2-"):
        import sae_lens_t5gemma.loading.gemma_scope  # noqa: F401  (reads tensor shapes from the local cache offline)
    sae = SAE.from_pretrained(release=release, sae_id=sae_id, device=device)
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


def read_texts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one text each.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8 text, or no non-empty line (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Texts file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"Texts file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"Texts file {path} has no non-empty line.")
    return texts


# ------------------------------------------------------------------------------ sites


def _describe_tl_hook(model: Any, hook_name: str) -> tuple[str, int, str]:
    parts = hook_name.split(".")
    suffix = ".".join(parts[2:])
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or suffix not in _TL_SUFFIXES:
        raise ValueError(
            f"Hook {hook_name!r} is not a per-layer TransformerLens site this comparison knows: "
            f"expected blocks.<layer>.<one of {sorted(_TL_SUFFIXES)}>."
        )
    key = _TL_SUFFIXES[suffix]
    # Gemma 2/3 normalise each sublayer's output before adding it to the residual stream,
    # and TransformerLens' hook_attn_out/hook_mlp_out sit after that norm.
    if key in ("attn_out", "mlp_out") and getattr(model.cfg, "use_normalization_before_and_after", False):
        key += "_normed"
    return "decoder-only", int(parts[1]), key


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


def _site_width(model: Any, site_key: str) -> int:
    if site_key in ("attn_z", "z_self", "z_cross"):
        return model.cfg.n_heads * model.cfg.d_head
    if site_key == "mlp_post":
        return model.cfg.d_mlp
    return model.cfg.d_model


# ----------------------------------------------------------------------------- tokens


def token_batches(tokenizer: Any, texts: Sequence[str], context_size: int) -> torch.Tensor:
    """``[n_seq, context_size]`` token ids: the texts packed, as SAELens' store does (``--pack``).

    Each text is tokenised without special tokens; sequences start with BOS and texts are
    separated by BOS (SAELens' defaults). Trailing tokens that do not fill a sequence are dropped.
    A row then holds several documents: T5Gemma 2's bidirectional encoder sees *later* ones too,
    which a causal Gemma 3 never does; :func:`document_batches` is the default for that reason.
    """
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    bos = tokenizer.bos_token_id
    streams = (
        torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts
    )
    seqs = list(
        concat_and_batch_sequences(
            streams, context_size, begin_batch_token_id=bos, sequence_separator_token_id=bos
        )
    )
    if not seqs:
        raise ValueError(
            f"The texts give fewer than context_size={context_size} tokens: nothing to evaluate on."
        )
    return torch.stack(seqs)


def document_batches(
    tokenizer: Any, texts: Sequence[str], context_size: int, min_tokens: int
) -> tuple[torch.Tensor, dict[str, int]]:
    """One document per row: ``[BOS] + ids[: context_size - 1]``, right-padded with PAD.

    No row holds two documents, so no position can attend to another document (the
    bidirectional encoder included). Padding sits at the end of a row: causal models and the
    decoder never read it before a real token, it is a special token (left out of every metric
    and target), and documents with fewer than ``min_tokens`` tokens (BOS included) are dropped
    so that, under ``prefix_lm``, the encoder's prefix holds no padding.

    Returns:
        ``(tokens, counts)``: counts of ``documents``, ``kept``, ``too_short`` and ``truncated``.

    Raises:
        ValueError: no document is long enough (the message gives the lengths).
    """
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    if pad is None:
        raise ValueError("document_batches needs a tokenizer with a pad token (PAD is masked as special).")
    rows, lengths, truncated = [], [], 0
    for text in texts:
        ids = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        lengths.append(len(ids))
        if len(ids) < min_tokens:
            continue
        truncated += len(ids) > context_size
        ids = ids[:context_size]
        rows.append(ids + [pad] * (context_size - len(ids)))
    if not rows:
        raise ValueError(
            f"No document has at least {min_tokens} tokens (BOS included; needed for a prefix of "
            f"{min_tokens - 1} real tokens and a continuation); lengths are {min(lengths)}-{max(lengths)}. "
            "Give a smaller context size, longer texts, or pack documents (pack=True / --pack)."
        )
    counts = {"documents": len(lengths), "kept": len(rows), "too_short": len(lengths) - len(rows),
              "truncated": truncated}  # fmt: skip
    return torch.tensor(rows, dtype=torch.long), counts


# --------------------------------------------------------------------------- evaluate


def compare(
    pairs: Sequence[Pair | str],
    texts: Sequence[str] | None = None,
    out_dir: str | Path = "out/compare",
    context_size: int = 128,
    batch_size: int = 4,
    n_batches: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    dense_threshold: float = 0.1,
    title: str = "SAE comparison: T5Gemma 2 and Gemma 3 270M",
    banner: str | None = None,
    progress: bool = True,
    convention: str = "prefix_lm",
    prefix_len: int | None = None,
    pack: bool = False,
    synthetic: bool = False,
    min_fires: int = 5,
    top_k: int = 10,
) -> Report:
    """Evaluate (model, SAE) pairs on the same texts and write a side-by-side report.

    Args:
        pairs: :class:`Pair` objects or spec strings (see :meth:`Pair.parse`). A transfer
            pair whose SAE is not also evaluated on its home model gets that pair added.
        texts: the evaluation documents (default: the embedded stand-in corpus).
        out_dir: where ``report.md``, the CSV/JSON tables and the PNGs go.
        context_size: tokens per row.
        batch_size: rows per batch.
        n_batches: batches to evaluate on (default: every whole batch the texts give).
        dense_threshold: a feature is dense if it fires on more than this fraction of tokens.
        banner: a line put at the top of the report (e.g. the synthetic stand-in warning).
        progress: progress bars over the pairs and over each evaluation's batches.
        convention: T5Gemma 2's input convention (``prefix_lm`` or ``reconstruct``). Under
            ``prefix_lm`` Gemma 3 rows are scored on the same continuation targets.
        prefix_len: the ``prefix_lm`` split (default ``context_size // 2``).
        pack: pack documents into rows (SAELens' way) instead of one document per row.
            Packed rows let the bidirectional encoder read later documents.
        dtype: the models' dtype (default float32; see :mod:`sae_lens_t5gemma.model.dtypes`). SAEs stay
            in the dtype they load in and the report's setup records both.
        synthetic: the data are the synthetic stand-in: every finding and plot says so.
        min_fires: fires on Gemma 3 for a feature's transfer correlation to be scored.
        top_k: best and worst carried features listed per transfer.

    Metrics are computed over covered positions only (:mod:`sae_lens_t5gemma.analysis.evaluation`);
    each row's ``task`` says what its CE/KL numbers were scored on. Each Gemma 3 -> T5Gemma 2
    transfer is also read feature by feature (:func:`~sae_lens_t5gemma.comparison.transfer.feature_transfer`),
    with a norm-matched and (encoder) a causal-mask control, and its home SAE is re-scored on
    Gemma 3 on the transfer's own task, so the two ΔCE columns compare like with like.

    Returns:
        The :class:`Report`; its ``files`` name what was written.

    Output: ``out_dir`` is locked for the whole run (a second run into it fails at once), the
    files are written atomically and never through a symlink, and the files an earlier run
    wrote there that this one did not (plots of pairs no longer compared) are removed; files
    the package did not write are left alone (:func:`~sae_lens_t5gemma.outputs.owned_outputs`).

    Raises:
        ValueError / KeyError / FileNotFoundError: a pair names an unknown release, id,
            folder or hook, or an SAE whose width does not fit the site; checked for every
            pair before anything is evaluated where possible. ValueError: a numeric argument
            out of range (checked first).
        OutputLockedError: another run is writing ``out_dir``.
    """
    check_arguments(context_size, batch_size, n_batches, dense_threshold, prefix_len, min_fires, top_k)
    with owned_outputs(out_dir, "compare") as out_run:
        report = _compare(
            pairs, texts, context_size, batch_size, n_batches, device, dtype, dense_threshold, progress, convention,
            prefix_len, pack, synthetic, min_fires, top_k,
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="sae_lens_t5gemma_compare_") as staging:
            # report.py writes plain files; staged privately, they enter out_dir atomically.
            write_report(report, staging, title=title, banner=banner, synthetic=synthetic)
            report.files = {
                name: out_run.write(Path(out_dir) / path.name, path.read_bytes())
                for name, path in report.files.items()
            }
    return report


def check_arguments(
    context_size: int = 128,
    batch_size: int = 4,
    n_batches: int | None = None,
    dense_threshold: float = 0.1,
    prefix_len: int | None = None,
    min_fires: int = 5,
    top_k: int = 10,
) -> None:
    """:func:`compare`'s numeric arguments, checked before anything loads.

    Raises:
        ValueError: one line naming the argument (and its flag), the bound and the value.
    """

    def integer(name: str, v: Any, low: int, none_ok: bool = False) -> None:
        if v is None and none_ok:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= {low}, got {v!r}")

    integer("context_size", context_size, 2)
    integer("batch_size", batch_size, 1)
    integer("n_batches", n_batches, 1, none_ok=True)
    integer("prefix_len", prefix_len, 1, none_ok=True)
    integer("min_fires", min_fires, 1)
    integer("top_k", top_k, 1)
    if prefix_len is not None and prefix_len >= context_size:
        raise ValueError(
            f"prefix_len (--prefix-len) must be below context_size ({context_size}) to leave a continuation, "
            f"got {prefix_len}"
        )
    t = dense_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
        raise ValueError(f"dense_threshold (--dense-threshold) must be a fraction in [0, 1], got {t!r}")


def _compare(
    pairs: Sequence[Pair | str],
    texts: Sequence[str] | None,
    context_size: int,
    batch_size: int,
    n_batches: int | None,
    device: str,
    dtype: torch.dtype | str | None,
    dense_threshold: float,
    progress: bool,
    convention: str,
    prefix_len: int | None,
    pack: bool,
    synthetic: bool,
    min_fires: int,
    top_k: int,
) -> Report:
    """:func:`compare`'s evaluation: the rows, transfers and setup of the report (nothing written)."""
    from tqdm.auto import tqdm

    from sae_lens_t5gemma.model.hooked import CONVENTIONS
    from sae_lens_t5gemma.stand_in.synthetic import stand_in_texts

    dtype = resolve_dtype(dtype, device)
    pairs = [p if isinstance(p, Pair) else Pair.parse(p) for p in pairs]
    if not pairs:
        raise ValueError("compare needs at least one (model, SAE) pair.")
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}: expected one of {sorted(CONVENTIONS)}")
    for p in pairs:
        _check_sae_spec(p.sae)
    texts = list(texts) if texts is not None else stand_in_texts()
    pairs = _add_home_pairs(pairs)
    split = prefix_len or context_size // 2
    # prefix_lm: the encoder's prefix must hold no padding; reconstruct: the encoder reads the
    # whole row, so only full rows carry no padding.
    min_tokens = split + 1 if convention == "prefix_lm" else context_size

    run = _Run(models={}, tokens={}, saes={}, device=device, batch_size=batch_size, dense_threshold=dense_threshold,
               convention=convention, prefix_len=prefix_len, progress=progress)  # fmt: skip
    doc_counts: dict[str, dict[str, int]] = {}
    rows: list[Row] = []
    for pair in tqdm(pairs, desc="SAE pairs", unit="pair", disable=not progress):
        t0 = time.perf_counter()
        sae, source = run.sae(pair.sae)
        load_s = time.perf_counter() - t0
        home_model = sae.cfg.metadata.model_name or ""
        home_hook = sae.cfg.metadata.hook_name
        model_name = pair.model or home_model
        if not model_name:
            raise ValueError(f"SAE {pair.sae}: its config names no model; give the pair a model.")
        if model_name not in run.models:
            model, family = _load_model(model_name, device, dtype)
            if hasattr(model, "covered_mask"):
                model.convention, model.prefix_len = convention, prefix_len
            run.models[model_name] = (model, family)
            if pack:
                seqs = token_batches(model.tokenizer, texts, context_size)
            else:
                seqs, doc_counts[model_name] = document_batches(
                    model.tokenizer, texts, context_size, min_tokens
                )
            # Whole batches only: reconstruction and sparsity/variance metrics then read the same rows.
            keep = (seqs.shape[0] // batch_size) * batch_size
            if n_batches is not None:
                keep = min(keep, n_batches * batch_size)
            run.tokens[model_name] = seqs[:keep]
        model, family = run.models[model_name]
        hook = pair.hook_name or home_hook
        try:
            stack, layer, key, words = describe_site(model, hook)
        except ValueError as e:
            target = transfer_hook(hook) if family == "T5Gemma 2" else None
            hint = f" To apply it at the same activation of T5Gemma 2, give hook={target}." if target else ""
            raise ValueError(f"SAE {pair.sae} on {model_name}: {e}{hint}") from e
        width = _site_width(model, key)
        if sae.cfg.d_in != width:
            raise ValueError(
                f"SAE {pair.sae} (d_in={sae.cfg.d_in}) does not fit {hook} on {model_name}, "
                f"which is {width} wide ({words})."
            )
        if run.tokens[model_name].shape[0] == 0:
            raise ValueError(
                f"The texts give fewer than batch_size={batch_size} rows of {context_size} tokens "
                f"for {model_name}: nothing to evaluate on."
            )
        t0 = time.perf_counter()
        metrics, task = run.evaluate(model_name, sae, hook)
        eval_s = time.perf_counter() - t0
        role = _role(hook, home_hook, model_name, home_model, family)
        rows.append(
            Row(
                model=model_name,
                family=family,
                stack=stack,
                layer=layer,
                hook_name=hook,
                site=key,
                site_words=words,
                sae=pair.sae,
                sae_source=source,
                sae_home_model=home_model,
                sae_home_hook=home_hook,
                role=role,
                d_in=sae.cfg.d_in,
                d_sae=sae.cfg.d_sae,
                load_s=load_s,
                eval_s=eval_s,
                task=task,
                **{k: v for k, v in metrics.items() if k != "n_predictions"},
            )
        )

    setup = _setup(texts, run.tokens, context_size, batch_size, device, dense_threshold)
    setup["dtype"] = dtype_name(dtype)
    setup["sae_dtypes"] = sorted({dtype_name(sae_dtype(s)) for s, _ in run.saes.values()})
    setup.update(
        convention=convention,
        prefix_len=prefix_len or "n // 2",
        rows="packed documents (--pack)" if pack else "one document per row, right-padded, padding masked",
        documents=doc_counts,
        synthetic=synthetic,
        min_fires=min_fires,
    )
    transfer, features = _transfer_rows(rows, run, min_fires, top_k)
    return Report(rows=rows, transfer=transfer, setup=setup, notes=_notes(rows), features=features)


@dataclass
class _Run:
    """What one :func:`compare` call has loaded: models, their token rows, SAEs; and how it scores."""

    models: dict[str, tuple[Any, str]]
    tokens: dict[str, torch.Tensor]
    saes: dict[str, tuple[Any, str]]
    device: str
    batch_size: int
    dense_threshold: float
    convention: str
    prefix_len: int | None
    progress: bool

    def sae(self, spec: str) -> tuple[Any, str]:
        """(SAE, source label), loaded once per spec."""
        if spec not in self.saes:
            self.saes[spec] = _load_sae(spec, self.device)
        return self.saes[spec]

    def batches(self, model_name: str) -> list[torch.Tensor]:
        return list(self.tokens[model_name].split(self.batch_size))

    def evaluate(
        self, model_name: str, sae: Any, hook: str, site_span: tuple[int | None, int | None] | None = None
    ) -> tuple[dict[str, float], str]:
        """Metrics over covered positions (:func:`evaluation.evaluate_sae`) and the task they were scored on.

        A model without T5Gemma 2's conventions (Gemma 3) is scored on the same targets as T5Gemma 2
        under ``prefix_lm``: the continuation after ``prefix_len`` (or ``n // 2``); ``site_span``
        splices it only where a T5Gemma 2 stack reads (a transfer's matched task).
        """
        from sae_lens_t5gemma.analysis.evaluation import evaluate_sae

        model = self.models[model_name][0]
        n = self.tokens[model_name].shape[1]
        if hasattr(model, "covered_mask"):
            task, score_from = f"T5Gemma 2 {model.describe_convention()}", None
        elif self.convention == "prefix_lm":
            score_from = self.prefix_len or max(1, n // 2)
            task = f"next-token prediction, scored on the prefix_lm continuation (targets at positions >= {score_from})"
        else:
            task, score_from = "next-token prediction, every target", None
        metrics = evaluate_sae(
            model,
            sae,
            self.batches(model_name),
            hook,
            dense_threshold=self.dense_threshold,
            score_from=score_from,
            progress=self.progress,
            site_span=site_span,
        )
        return metrics, task


def _role(hook: str, home_hook: str, model_name: str, home_model: str, family: str) -> str:
    """transfer: applied at another hook than its own, or on a model of another family."""
    if hook != home_hook:
        return "transfer"
    if model_name == home_model:
        return "native"
    home_family = _family_of_name(home_model)
    known = home_family in ("T5Gemma 2", "Gemma 3")
    return "transfer" if known and home_family != family else "native"


def _add_home_pairs(pairs: list[Pair]) -> list[Pair]:
    """Put the home-model evaluation of every transfer pair's SAE right before it."""
    out: list[Pair] = []
    have = {p.sae for p in pairs if p.hook_name is None and p.model is None}
    for p in pairs:
        if p.hook_name is not None and p.sae not in have:
            out.append(Pair(p.sae))
            have.add(p.sae)
        out.append(p)
    return out


def _setup(
    texts: Sequence[str],
    tokens: dict[str, torch.Tensor],
    context_size: int,
    batch_size: int,
    device: str,
    dense_threshold: float,
) -> dict[str, Any]:
    from importlib.metadata import version

    digests = {name: hashlib.sha1(t.numpy().tobytes()).hexdigest()[:12] for name, t in tokens.items()}
    return {
        "n_texts": len(texts),
        "context_size": context_size,
        "batch_size": batch_size,
        "sequences": {name: t.shape[0] for name, t in tokens.items()},
        "token_digest": digests,
        "same_tokens_for_all_models": len(set(digests.values())) <= 1,
        "device": device,
        "dense_threshold": dense_threshold,
        "versions": {pkg: version(pkg) for pkg in ("sae-lens", "transformer-lens", "transformers", "torch")},
    }


def matched_task(stack: str, p: int, n: int) -> str:
    """The task both ΔCE columns of a prefix_lm transfer row are scored on, in words."""
    where = (
        f"positions t < {p} (T5Gemma 2's encoder prefix)"
        if stack == "encoder"
        else (f"positions t >= {p} (T5Gemma 2's decoder continuation)")
    )
    return (
        f"continuation targets t >= {p} of {n}-token rows, context = tokens before the target; "
        f"SAE spliced at {where}, non-special tokens"
    )


def _transfer_rows(
    rows: list[Row], run: _Run, min_fires: int, top_k: int
) -> tuple[list[TransferRow], list[FeatureTransfer]]:
    """One TransferRow per transfer (and a FeatureTransfer where both sides share token ids)."""
    from sae_lens_t5gemma.comparison.transfer import feature_transfer

    out, features = [], []
    for r in rows:
        if r.role != "transfer":
            continue
        home = next((h for h in rows if h.sae == r.sae and h.role == "native"), None)
        if home is None:
            continue
        natives = [
            n
            for n in rows
            if n.role == "native" and n.model == r.model and n.stack == r.stack and n.layer == r.layer
        ]
        native_text = "; ".join(
            f"{n.sae} ({n.site}, {'same site' if n.site == r.site else 'different site'}: "
            f"EV {n.explained_variance:.3f}, L0 {n.l0:.1f})"
            for n in natives
        )
        row = TransferRow(
            sae=r.sae,
            layer=r.layer,
            site=r.site,
            target_model=r.model,
            target_stack=r.stack,
            target_hook=r.hook_name,
            home_model=home.model,
            home_hook=home.hook_name,
            task_target=r.task,
            task_home=home.task,
            n_tokens=r.n_tokens,
            ev_target=r.explained_variance,
            ev_home=home.explained_variance,
            l0_target=r.l0,
            l0_home=home.l0,
            ce_increase_target=r.ce_increase,
            natives=native_text or "none evaluated",
        )
        target_model, home_model = run.models[r.model][0], run.models[home.model][0]
        same_ids = torch.equal(run.tokens[r.model], run.tokens[home.model])
        if hasattr(target_model, "covered_mask") and same_ids:
            sae = run.sae(r.sae)[0]
            ft = feature_transfer(
                home_model,
                target_model,
                sae,
                run.batches(r.model),
                r.hook_name,
                home_hook=home.hook_name,
                sae_name=r.sae,
                min_fires=min_fires,
                top_k=top_k,
                progress=run.progress,
            )
            features.append(ft)
            row.n_tokens, row.ev_target, row.ev_home = ft.n_tokens, ft.ev_target, ft.ev_home
            row.l0_target, row.l0_home = ft.l0_target, ft.l0_home
            for name in ("norm_ratio", "ev_norm_matched", "l0_norm_matched", "ev_causal", "ev_kept_causal",
                         "corr_median", "corr_frac_above_0_5", "corr_frac_above_0_9", "corr_median_causal",
                         "ev_causal_home_rope", "corr_median_causal_home_rope",
                         "corr_median_ci", "corr_frac_above_0_5_ci", "corr_median_null", "corr_frac_above_0_5_null",
                         "corr_frac_above_0_9_null"):  # fmt: skip
                setattr(row, name, getattr(ft, name))
            if run.convention == "prefix_lm":
                n = run.tokens[r.model].shape[1]
                p = target_model.split_point(n)
                span = (0, p) if r.stack == "encoder" else (p, None)
                metrics, _ = run.evaluate(home.model, sae, home.hook_name, site_span=span)
                row.task_target = row.task_home = matched_task(r.stack, p, n)
                row.ce_increase_home = metrics["ce_increase"]
        row.ev_kept = ev_kept(row.ev_target, row.ev_home)
        out.append(row)
    return out, features


def _notes(rows: list[Row]) -> list[str]:
    notes = []
    keys = {r.site for r in rows}
    if {"attn_z", "attn_out"} <= keys or any(r.sae_source == "gemma-scope-2" for r in rows):
        notes.append(HONEST_SITES_NOTE)
    if any(r.family == "T5Gemma 2" and r.task.startswith("T5Gemma 2 reconstruct") for r in rows):
        notes.append(CE_KL_CAVEAT)
    return notes
