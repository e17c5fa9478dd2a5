"""The comparison's evaluation: each pair's SAE scored on its model, transfers set beside their homes.

:func:`evaluate_pairs` loads every model and SAE once, builds each model's token rows
(:func:`~sae_lens_t5gemma.analysis.corpus.document_batches`, or packed rows), scores each pair
with :func:`~sae_lens_t5gemma.analysis.evaluation.evaluate_sae` over covered positions, and
reads each Gemma 3 -> T5Gemma 2 transfer feature by feature
(:func:`~sae_lens_t5gemma.comparison.transfer.feature_transfer`). It writes nothing:
:func:`~sae_lens_t5gemma.comparison.suite.compare` writes the report.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sae_lens_t5gemma.analysis.corpus import document_batches, token_batches
from sae_lens_t5gemma.comparison.models import (
    check_sae_spec,
    describe_site,
    family_of_name,
    load_model,
    load_sae,
)
from sae_lens_t5gemma.comparison.pairs import Pair
from sae_lens_t5gemma.comparison.report import CE_KL_CAVEAT, HONEST_SITES_NOTE, Report, Row, TransferRow
from sae_lens_t5gemma.comparison.transfer import FeatureTransfer, ev_kept
from sae_lens_t5gemma.model.dtypes import dtype_name, resolve_dtype, sae_dtype
from sae_lens_t5gemma.model.sites import site_width, transfer_hook


def evaluate_pairs(
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

    from sae_lens_t5gemma.model.conventions import CONVENTIONS
    from sae_lens_t5gemma.stand_in.synthetic import stand_in_texts

    dtype = resolve_dtype(dtype, device)
    pairs = [p if isinstance(p, Pair) else Pair.parse(p) for p in pairs]
    if not pairs:
        raise ValueError("compare needs at least one (model, SAE) pair.")
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}: expected one of {sorted(CONVENTIONS)}")
    for p in pairs:
        check_sae_spec(p.sae)
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
            model, family = load_model(model_name, device, dtype)
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
        width = site_width(model, hook)
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
        rows="packed documents (--concat-sequences)"
        if pack
        else "one document per row, right-padded, padding masked",
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
            self.saes[spec] = load_sae(spec, self.device)
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
    home_family = family_of_name(home_model)
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
