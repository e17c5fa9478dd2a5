"""One eval harness for SAEs on T5Gemma 2 and Gemma 3: a side-by-side report with plots.

:func:`compare` evaluates (model, SAE) pairs on the same token batches with SAELens' own
``run_evals`` (explained variance, MSE, cosine similarity, L0, feature density, CE-loss
and KL scores from splicing the SAE in) and times each evaluation. Sources:

- the mindchain release on T5Gemma 2 (``t5gemma2-270m-attn_out:encoder/layer_5``), run
  through :class:`~sae_lens_t5gemma.hooked.HookedT5Gemma2`;
- Gemma Scope 2 releases on Gemma 3 270M (``gemma-scope-2-270m-pt-res-all:layer_5_width_16k_l0_small``),
  loaded by SAELens' ``gemma_3`` loader, with Gemma 3 run through TransformerLens
  (:func:`~sae_lens_t5gemma.gemma_scope.load_gemma3`);
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma import sites as sites_mod
from sae_lens_t5gemma.registration import PACKAGE_RELEASE
from sae_lens_t5gemma.report import (  # noqa: F401 (re-exported: the comparison API in one import)
    CE_KL_CAVEAT,
    HONEST_SITES_NOTE,
    SITE_WORDS,
    Report,
    Row,
    TransferRow,
    write_report,
)
from sae_lens_t5gemma.synthetic import GEMMA_SCOPE_RELEASES, T5GEMMA2_MODEL

MINDCHAIN_RELEASE = PACKAGE_RELEASE
DEFAULT_GEMMA_SCOPE_VARIANT = "width_16k_l0_small"


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
# T5Gemma 2 encoder site kinds that are the same activation as a Gemma 3 site key.
TRANSFERABLE = ("resid_pre", "attn_z", "resid_mid", "resid_post")
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


def transfer_hook(gemma3_hook: str) -> str | None:
    """The T5Gemma 2 encoder hook reading the same activation as a Gemma 3 (TransformerLens) hook.

    ``blocks.5.attn.hook_z`` -> ``encoder_blocks.5.attn.hook_z``; ``blocks.5.hook_resid_post``
    -> ``encoder_blocks.5.hook_resid_post``. None where T5Gemma 2 has no such site: Gemma 3's
    ``hook_attn_out``/``hook_mlp_out`` are taken after the post-sublayer norm, T5Gemma 2's before it.
    """
    parts = gemma3_hook.split(".")
    key = _TL_SUFFIXES.get(".".join(parts[2:]))
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or key not in TRANSFERABLE:
        return None
    return sites_mod.site("encoder", int(parts[1]), key).hook_name


def standard_pairs(
    layers: Iterable[int],
    mindchain: bool = True,
    decoder: bool = True,
    gemma_scope_sites: Sequence[str] = ("attn_out", "resid_post", "mlp_out"),
    gemma_scope_variant: str = DEFAULT_GEMMA_SCOPE_VARIANT,
    transfer: bool = True,
    local_saes: Sequence[str | Path] = (),
    t5gemma2_model: str = T5GEMMA2_MODEL,
) -> list[Pair]:
    """The usual comparison at some layers.

    Per layer: the mindchain encoder (and decoder) SAE on T5Gemma 2; the Gemma Scope 2
    every-layer SAEs (``gemma_scope_variant``, e.g. ``width_16k_l0_small``) at
    ``gemma_scope_sites`` on Gemma 3; and, with ``transfer``, those of them whose site exists
    in T5Gemma 2's encoder (hook_z and resid_post) applied there. Then each local folder.
    """
    pairs: list[Pair] = []
    for layer in layers:
        if mindchain:
            stacks = ("encoder", "decoder") if decoder else ("encoder",)
            pairs += [Pair(f"{MINDCHAIN_RELEASE}:{stack}/layer_{layer}", t5gemma2_model) for stack in stacks]
        for gs_site in gemma_scope_sites:
            if gs_site not in GEMMA_SCOPE_RELEASES:
                raise ValueError(
                    f"Unknown Gemma Scope 2 site {gs_site!r}: expected one of {sorted(GEMMA_SCOPE_RELEASES)}."
                )
            spec = f"{GEMMA_SCOPE_RELEASES[gs_site]}:layer_{layer}_{gemma_scope_variant}"
            pairs.append(Pair(spec))
            target = transfer_hook(f"blocks.{layer}.{_GEMMA_SCOPE_HOOKS[gs_site]}")
            if transfer and target is not None:
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
        from sae_lens_t5gemma.hooked import load_t5gemma2

        return load_t5gemma2(name, device=device, dtype=dtype), "T5Gemma 2"
    if model_type == "gemma3_text":
        from sae_lens_t5gemma.gemma_scope import load_gemma3

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
    from sae_lens_t5gemma.registration import check_sae_id

    check_sae_id(release, sae_id)


def _load_sae(spec: str, device: str) -> tuple[Any, str]:
    """(SAE, source label) for ``RELEASE:SAE_ID`` or a folder."""
    from sae_lens import SAE

    if Path(spec).exists():
        return SAE.load_from_disk(spec, device=device), "local"
    release, _, sae_id = spec.partition(":")
    if release in GEMMA_SCOPE_RELEASES.values():
        import sae_lens_t5gemma.gemma_scope  # noqa: F401  (reads tensor shapes from the local cache offline)
    sae = SAE.from_pretrained(release=release, sae_id=sae_id, device=device)
    source = {MINDCHAIN_RELEASE: "mindchain"}.get(release)
    if source is None:
        source = "gemma-scope-2" if release.startswith("gemma-scope-2") else release
    return sae, source


@contextlib.contextmanager
def stand_in_hub() -> Iterator[Path]:
    """A throwaway offline hub cache with every stand-in this comparison can use.

    The T5Gemma 2 stand-in and the mindchain SAEs (``synthetic.write_stand_in_hub``) plus
    Gemma 3 and Gemma Scope 2 (``synthetic.write_gemma3_stand_in_hub``), under their real
    ids, with huggingface_hub offline; removed on exit. Numbers from it are synthetic.
    """
    from sae_lens_t5gemma import synthetic

    with tempfile.TemporaryDirectory(prefix="sae_lens_t5gemma_compare_hub_") as tmp:
        synthetic.write_stand_in_hub(tmp)
        synthetic.write_gemma3_stand_in_hub(tmp)
        with synthetic.offline_hub(tmp) as cache:
            yield cache


def read_texts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, one text each."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Texts file {path} does not exist.")
    texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
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
    """``[n_seq, context_size]`` token ids: the texts concatenated, as SAELens' store does.

    Each text is tokenised without special tokens; sequences start with BOS and texts are
    separated by BOS (SAELens' defaults). Trailing tokens that do not fill a sequence are dropped.
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


# --------------------------------------------------------------------------- evaluate


def _evaluate(
    model: Any,
    sae: Any,
    hook_name: str,
    tokens: torch.Tensor,
    batch_size: int,
    dense_threshold: float,
    convention: str,
    prefix_len: int | None,
) -> tuple[dict[str, float], str]:
    """Metrics over covered positions (:func:`evaluation.evaluate_sae`) and the task they were scored on.

    A model without T5Gemma 2's conventions (Gemma 3) is scored on the same targets as T5Gemma 2
    under ``convention``: under ``prefix_lm`` the continuation after ``prefix_len`` (or ``n // 2``).
    """
    from sae_lens_t5gemma.evaluation import evaluate_sae

    n = tokens.shape[1]
    if hasattr(model, "covered_mask"):
        task, score_from = f"T5Gemma 2 {model.describe_convention()}", None
    elif convention == "prefix_lm":
        score_from = prefix_len or max(1, n // 2)
        task = f"next-token prediction, scored on the prefix_lm continuation (targets at positions >= {score_from})"
    else:
        task, score_from = "next-token prediction, every target", None
    metrics = evaluate_sae(
        model,
        sae,
        tokens.split(batch_size),
        hook_name,
        dense_threshold=dense_threshold,
        score_from=score_from,
    )
    return metrics, task


def _special_ids(tokenizer: Any) -> list[int]:
    from sae_lens.util import get_special_token_ids

    return list(get_special_token_ids(tokenizer))


def compare(
    pairs: Sequence[Pair | str],
    texts: Sequence[str] | None = None,
    out_dir: str | Path = "out/compare",
    context_size: int = 128,
    batch_size: int = 4,
    n_batches: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    dense_threshold: float = 0.1,
    title: str = "SAE comparison: T5Gemma 2 and Gemma 3 270M",
    banner: str | None = None,
    progress: bool = True,
    convention: str = "prefix_lm",
    prefix_len: int | None = None,
) -> Report:
    """Evaluate (model, SAE) pairs on the same texts and write a side-by-side report.

    Args:
        pairs: :class:`Pair` objects or spec strings (see :meth:`Pair.parse`). A transfer
            pair whose SAE is not also evaluated on its home model gets that pair added.
        texts: the evaluation texts (default: the embedded stand-in corpus).
        out_dir: where ``report.md``, ``results.csv``, ``results.json`` and the PNGs go.
        context_size: tokens per sequence.
        batch_size: sequences per batch.
        n_batches: batches to evaluate on (default: every whole batch the texts give).
        dense_threshold: a feature is dense if it fires on more than this fraction of tokens.
        banner: a line put at the top of the report (e.g. the synthetic stand-in warning).
        progress: show a progress bar over the pairs.
        convention: T5Gemma 2's input convention (``prefix_lm`` or ``reconstruct``). Under
            ``prefix_lm`` Gemma 3 rows are scored on the same continuation targets.
        prefix_len: the ``prefix_lm`` split (default ``context_size // 2``).

    Metrics are computed over covered positions only (:mod:`sae_lens_t5gemma.evaluation`);
    each row's ``task`` says what its CE/KL numbers were scored on.

    Returns:
        The :class:`Report`; its ``files`` name what was written.

    Raises:
        ValueError / KeyError / FileNotFoundError: a pair names an unknown release, id,
            folder or hook, or an SAE whose width does not fit the site; checked for every
            pair before anything is evaluated where possible.
    """
    from tqdm.auto import tqdm

    from sae_lens_t5gemma.synthetic import stand_in_texts

    pairs = [p if isinstance(p, Pair) else Pair.parse(p) for p in pairs]
    if not pairs:
        raise ValueError("compare needs at least one (model, SAE) pair.")
    for p in pairs:
        _check_sae_spec(p.sae)
    texts = list(texts) if texts is not None else stand_in_texts()
    pairs = _add_home_pairs(pairs)
    from sae_lens_t5gemma.hooked import CONVENTIONS

    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}: expected one of {sorted(CONVENTIONS)}")

    models: dict[str, tuple[Any, str]] = {}
    tokens: dict[str, torch.Tensor] = {}
    rows: list[Row] = []
    for pair in tqdm(pairs, desc="SAE pairs", unit="pair", disable=not progress):
        t0 = time.perf_counter()
        sae, source = _load_sae(pair.sae, device)
        load_s = time.perf_counter() - t0
        home_model = sae.cfg.metadata.model_name or ""
        home_hook = sae.cfg.metadata.hook_name
        model_name = pair.model or home_model
        if not model_name:
            raise ValueError(f"SAE {pair.sae}: its config names no model; give the pair a model.")
        if model_name not in models:
            models[model_name] = _load_model(model_name, device, dtype)
            if hasattr(models[model_name][0], "covered_mask"):
                models[model_name][0].convention = convention
                models[model_name][0].prefix_len = prefix_len
            seqs = token_batches(models[model_name][0].tokenizer, texts, context_size)
            # Whole batches only: reconstruction and sparsity/variance metrics then read the same sequences.
            keep = (seqs.shape[0] // batch_size) * batch_size
            if n_batches is not None:
                keep = min(keep, n_batches * batch_size)
            tokens[model_name] = seqs[:keep]
        model, family = models[model_name]
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
        if tokens[model_name].shape[0] == 0:
            raise ValueError(
                f"The texts give fewer than batch_size={batch_size} sequences of {context_size} tokens "
                f"for {model_name}: nothing to evaluate on."
            )
        sae.cfg.metadata.hook_name = hook  # where run_evals hooks it (a transfer changes it)
        t0 = time.perf_counter()
        metrics, task = _evaluate(
            model, sae, hook, tokens[model_name], batch_size, dense_threshold, convention, prefix_len
        )
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

    setup = _setup(texts, tokens, context_size, batch_size, device, dense_threshold)
    setup["convention"] = convention
    setup["prefix_len"] = prefix_len or "n // 2"
    transfer = _transfer_rows(rows)
    notes = _notes(rows)
    report = Report(rows=rows, transfer=transfer, setup=setup, notes=notes)
    write_report(report, out_dir, title=title, banner=banner)
    return report


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


def _transfer_rows(rows: list[Row]) -> list[TransferRow]:
    out = []
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
            f"EV {n.explained_variance:.3f}, CE score {n.ce_loss_score:.3f})"
            for n in natives
        )
        out.append(
            TransferRow(
                sae=r.sae,
                layer=r.layer,
                site=r.site,
                target_model=r.model,
                target_hook=r.hook_name,
                home_model=home.model,
                home_hook=home.hook_name,
                ev_target=r.explained_variance,
                ev_home=home.explained_variance,
                ev_carried=r.explained_variance / home.explained_variance
                if home.explained_variance > 0
                else None,
                ce_score_target=r.ce_loss_score,
                ce_score_home=home.ce_loss_score,
                l0_target=r.l0,
                l0_home=home.l0,
                natives=native_text or "none evaluated",
            )
        )
    return out


def _notes(rows: list[Row]) -> list[str]:
    notes = []
    keys = {r.site for r in rows}
    if {"attn_z", "attn_out"} <= keys or any(r.sae_source == "gemma-scope-2" for r in rows):
        notes.append(HONEST_SITES_NOTE)
    if any(r.family == "T5Gemma 2" and r.task.startswith("T5Gemma 2 reconstruct") for r in rows):
        notes.append(CE_KL_CAVEAT)
    return notes
