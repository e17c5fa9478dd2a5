"""Which input convention were the mindchain decoder SAEs trained under? An estimate from the weights.

The mindchain card does not say how its decoder activations were produced. Its checkpoints
do store a training history (``{"loss": [...], "l0": [...]}``). An SAE reproduces the L0 it
reached in training only on activations like the ones it was trained on, so each decoder
SAE is evaluated under every candidate convention and its L0 is compared with the last L0 in
its history; the convention whose L0 lies closest (in log ratio) is the best match.

Candidates:

- ``prefix_lm``: the encoder reads ``tokens[:, :p]``, the decoder reads ``[BOS] + tokens[:, p:]``
  (UL2's prefix-LM task, one of those T5Gemma 2 was adapted with);
- ``reconstruct``: encoder and decoder read the same row;
- ``shifted_copy``: the encoder reads the row, the decoder reads it shifted right behind its
  BOS, what ``model(input_ids=x, labels=x)`` in transformers does (the easiest code to write).

Every candidate is scored on the same (row, position) set (:func:`scored_positions`), with the
padding masked, so the convention is not confounded with which tokens were counted. Each L0
carries a 5-95% interval over bootstrap resamples of the documents, and the verdict says how
often each SAE's best match stays best under resampling. The per-layer votes are not independent
(one model, one text set). This is an estimate, not a proof: L0 depends on the text distribution
too, and the card's 1,500 training texts are unknown. On the synthetic stand-in the answer means
nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_lens_t5gemma.analysis.corpus import pad_id, text_batches
from sae_lens_t5gemma.model.dtypes import dtype_name, to_sae

CANDIDATES = ("prefix_lm", "reconstruct", "shifted_copy")


BOOTSTRAP = 500
"""Bootstrap resamples of the documents behind each L0's interval and each verdict's stability."""


@dataclass(frozen=True)
class DiagnosisRow:
    """One decoder SAE under one candidate convention."""

    sae_id: str
    layer: int
    convention: str
    l0: float
    """Mean L0 over the scored positions (the same (row, position) set for every candidate)."""
    mse: float
    """Mean squared error per element (the card's MSE is most likely this)."""
    history_l0: float | None
    """The last L0 of the checkpoint's training history."""
    n_tokens: int
    l0_low: float = math.nan
    """5th percentile of the L0 over bootstrap resamples of the documents."""
    l0_high: float = math.nan
    """95th percentile of the same."""
    n_nonfinite: int = 0
    """Scored positions whose activation or SAE features hold NaN or Inf; any makes L0 and MSE NaN
    (a NaN feature counts as not firing, so the L0 would look valid and be wrong)."""

    @property
    def distance(self) -> float:
        """|log(L0 / history L0)|: 0 when the SAE fires as sparsely as it did in training."""
        if not self.history_l0 or not self.l0 > 0:
            return math.inf
        return abs(math.log(self.l0 / self.history_l0))


@dataclass
class Diagnosis:
    rows: list[DiagnosisRow]
    synthetic: bool
    dtype: str = "float32"
    """The model's dtype during the measurement."""
    stability: dict[str, float] = field(default_factory=dict)
    """SAE id -> the fraction of bootstrap resamples (documents) in which its best match stays best."""
    n_documents: int = 0

    def best(self) -> dict[str, str]:
        """SAE id -> the convention whose L0 lies closest to the history's (finite distances only)."""
        out: dict[str, tuple[float, str]] = {}
        for r in self.rows:
            if math.isfinite(r.distance) and (r.sae_id not in out or r.distance < out[r.sae_id][0]):
                out[r.sae_id] = (r.distance, r.convention)
        return {k: v[1] for k, v in out.items()}

    def nonfinite(self) -> dict[str, list[str]]:
        """SAE id -> the conventions under which its activations or features held NaN or Inf."""
        out: dict[str, list[str]] = {}
        for r in self.rows:
            if r.n_nonfinite:
                out.setdefault(r.sae_id, []).append(
                    f"{r.convention} ({r.n_nonfinite} of {r.n_tokens} positions)"
                )
        return out

    def verdict(self) -> str:
        votes: dict[str, int] = {}
        for conv in self.best().values():
            votes[conv] = votes.get(conv, 0) + 1
        bad = self.nonfinite()
        why = "; ".join(f"{k}: NaN/Inf under {', '.join(v)}" for k, v in bad.items())
        if not votes:
            if bad:
                return (
                    f"no verdict: activations or SAE features are not finite ({why}), so no L0 can be "
                    "compared; check the model and SAE weights for NaN/Inf"
                )
            return "no decoder SAE with a training-history L0 and a finite L0: nothing to compare"
        winner = max(votes, key=votes.__getitem__)
        label = "SYNTHETIC stand-in, meaningless: " if self.synthetic else "estimate: "
        stable = sorted(self.stability.values())
        strength = ""
        if stable:
            strength = (
                f"; each SAE's best match stays best in a median {statistics.median(stable):.0%} of {BOOTSTRAP} bootstrap resamples "
                f"of the {self.n_documents} documents (lowest {stable[0]:.0%})"
            )
        return (
            f"{label}best match {winner!r} for {votes[winner]} of {sum(votes.values())} decoder SAEs ({votes}; "
            f"model in {self.dtype}){strength}. The SAEs' votes are not independent evidence: one model and one "
            "text set for all of them, so the count is no significance test."
            + (f" Left out, their activations or features not finite: {why}." if bad else "")
        )

    def table(self) -> str:
        lines = [
            f"{'sae id':18s} {'convention':13s} {'L0':>9s} {'L0 5-95%':>15s} {'history L0':>10s} "
            f"{'|log ratio|':>11s} {'MSE/elem':>10s}"
        ]
        best = self.best()
        for r in self.rows:
            mark = "  <- best" if best.get(r.sae_id) == r.convention else ""
            hist = f"{r.history_l0:10.1f}" if r.history_l0 else f"{'-':>10s}"
            spread = f"{r.l0_low:7.1f}-{r.l0_high:<7.1f}"
            lines.append(
                f"{r.sae_id:18s} {r.convention:13s} {r.l0:9.1f} {spread:>15s} {hist} {r.distance:11.3f} "
                f"{r.mse:10.4g}{mark}"
            )
        return "\n".join(lines)


def _real_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """1 up to each row's last non-pad token (right padding), 0 after it."""
    real = tokens != pad_id
    return real.flip(1).long().cummax(1).values.flip(1)


@torch.no_grad()
def _activations(
    model: Any, tokens: torch.Tensor, mask: torch.Tensor, hook: str, convention: str
) -> torch.Tensor:
    """Decoder activations ``[batch, n, d]`` at ``hook`` under a candidate, the padding masked."""
    if convention == "shifted_copy":
        dec = model.hf_model.prepare_decoder_input_ids_from_labels(tokens)
        _, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=[hook], decoder_input_ids=dec, return_type=None
        )
    else:
        with model.fed(convention):
            _, cache = model.run_with_cache(
                tokens, attention_mask=mask, names_filter=[hook], return_type=None
            )
    x = cache[hook]
    return x.reshape(*x.shape[:2], -1)


def scored_positions(
    model: Any, tokens: torch.Tensor, mask: torch.Tensor, special: torch.Tensor
) -> torch.Tensor:
    """The (row, position) set every candidate is scored on: the positions ``t >= p`` that the
    ``prefix_lm`` decoder computes from a token (``p`` each row's own split, ``L // 2`` if random),
    holding a real, non-special token. Under ``reconstruct`` and ``shifted_copy`` the decoder
    computes these too, so all three read the same positions of the same documents."""
    n = tokens.shape[1]
    fixed = None if model.prefix_len == "random" else model.prefix_len
    with model.fed(convention="prefix_lm", prefix_len=fixed):
        p = model.splits(tokens, mask).to(tokens.device)  # each row's own split
    after = torch.arange(n, device=tokens.device)[None, :] >= p[:, None]
    return after & mask.bool() & ~torch.isin(tokens, special.to(tokens.device))


@torch.no_grad()
def diagnose(
    model: Any,
    saes: dict[str, Any],
    batches: Sequence[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    synthetic: bool = False,
    seed: int = 0,
) -> Diagnosis:
    """Evaluate decoder SAEs under each candidate convention and compare with their histories.

    Args:
        model: a ``HookedT5Gemma2`` (its convention is restored afterwards).
        saes: SAE id -> SAELens SAE at a decoder site, carrying ``metadata.training_history``.
        batches: token batches ``[batch, n]`` (right-padded; the mask is rebuilt from the pad id)
            or ``(tokens, attention_mask)`` pairs. One document per row.
        synthetic: the model and SAEs are stand-ins (the verdict says so).
        seed: of the bootstrap over documents.
    """
    from sae_lens_t5gemma.analysis.evaluation import special_token_ids
    from sae_lens_t5gemma.loading.mindchain_history import final_l0, training_history

    special = torch.tensor(special_token_ids(model.tokenizer))
    pad = pad_id(model.tokenizer)
    pairs = [(b, _real_mask(b, pad)) if isinstance(b, torch.Tensor) else b for b in batches]
    pairs = [(t.to(model.cfg.device), m.to(model.cfg.device)) for t, m in pairs]
    keeps = [scored_positions(model, t, m, special) for t, m in pairs]
    per_row_n = torch.cat([k.sum(1) for k in keeps]).cpu()
    n_docs = int((per_row_n > 0).sum())
    g = torch.Generator().manual_seed(seed)
    resample = torch.randint(0, len(per_row_n), (BOOTSTRAP, len(per_row_n)), generator=g)
    counts = per_row_n[resample].sum(1).clamp_min(1)
    rows: list[DiagnosisRow] = []
    boot: dict[str, dict[str, torch.Tensor]] = {}
    for sae_id, sae in saes.items():
        hook = model.canonical_name(sae.cfg.metadata.hook_name)
        if not hook.startswith("decoder_blocks."):
            raise ValueError(f"SAE {sae_id} reads {hook}: diagnose compares decoder SAEs only")
        history = final_l0(training_history(sae))
        for conv in CANDIDATES:
            xs, fs, row_l0 = [], [], []
            for (t, m), keep in zip(pairs, keeps, strict=True):
                # Encoded once, at the scored positions only; per-row L0 sums feed the bootstrap.
                x = to_sae(sae, _activations(model, t, m, hook, conv)[keep])
                f = sae.encode(x)
                row_l0.append(torch.zeros(keep.shape[0]).index_add_(
                    0, keep.nonzero()[:, 0].cpu(), (f > 0).sum(-1).float().cpu()
                ))  # fmt: skip
                xs.append(x)
                fs.append(f)
            x, feats = torch.cat(xs), torch.cat(fs)
            recon = sae.decode(feats)
            n_bad = int((~torch.isfinite(x).all(-1) | ~torch.isfinite(feats).all(-1)).sum())
            l0_boot = torch.cat(row_l0)[resample].sum(1) / counts
            boot.setdefault(sae_id, {})[conv] = l0_boot
            rows.append(
                DiagnosisRow(
                    sae_id=sae_id,
                    layer=int(hook.split(".")[1]),
                    convention=conv,
                    l0=float((feats > 0).sum(-1).float().mean()) if x.shape[0] and not n_bad else math.nan,
                    mse=float(((recon.float() - x.float().to(recon.device)) ** 2).mean())
                    if x.shape[0] and not n_bad
                    else math.nan,
                    history_l0=history,
                    n_tokens=x.shape[0],
                    l0_low=math.nan if n_bad else float(l0_boot.quantile(0.05)),
                    l0_high=math.nan if n_bad else float(l0_boot.quantile(0.95)),
                    n_nonfinite=n_bad,
                )
            )
    result = Diagnosis(rows, synthetic, dtype_name(model.cfg.dtype), n_documents=n_docs)
    for sae_id, best in result.best().items():
        history = next(r.history_l0 for r in rows if r.sae_id == sae_id)
        dist = torch.stack([(boot[sae_id][c].clamp_min(1e-12) / history).log().abs() for c in CANDIDATES])
        result.stability[sae_id] = float((dist.argmin(0) == CANDIDATES.index(best)).float().mean())
    return result


def diagnose_release(
    release: str = "t5gemma2-270m-attn_out",
    layers: Sequence[int] | None = None,
    texts: Sequence[str] | None = None,
    context_size: int = 128,
    batch_size: int = 4,
    n_batches: int | None = 4,
    device: str = "cpu",
    synthetic: bool = False,
    dtype: str | None = None,
) -> Diagnosis:
    """Load a release's decoder SAEs and their model, and run :func:`diagnose` on ``texts``.

    Rows hold one document each (padded, pads excluded), so the encoder never reads a later
    document. ``texts`` defaults to the embedded stand-in corpus.
    """
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from sae_lens_t5gemma.model.hooked import load_t5gemma2
    from sae_lens_t5gemma.stand_in.synthetic import stand_in_texts

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ValueError(
            f"Unknown release {release!r}; `sae-lens-t5gemma list` shows this package's releases"
        )
    ids = [i for i in directory[release].saes_map if i.startswith("decoder/")]
    if layers is not None:
        wanted = {f"decoder/layer_{n}" for n in layers}
        missing = sorted(wanted - set(ids))
        if missing:
            raise ValueError(f"Release {release!r} has no SAE(s) {missing}")
        ids = [i for i in ids if i in wanted]
    saes = {i: SAE.from_pretrained(release=release, sae_id=i, device=device) for i in ids}
    model = load_t5gemma2(directory[release].model, device=device, dtype=dtype)
    # One document per row, right-padded, its attention mask kept (cut to the context first).
    context = min(context_size, model.cfg.n_ctx)
    batches = text_batches(model.tokenizer, list(texts or stand_in_texts()), context, batch_size)
    batches = batches[: n_batches or None]
    return diagnose(model, saes, batches, synthetic=synthetic)
