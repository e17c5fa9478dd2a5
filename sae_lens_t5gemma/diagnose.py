"""Which input convention were the mindchain decoder SAEs trained under? An estimate from the weights.

The mindchain card does not say how its decoder activations were produced. Its checkpoints
do store a training history (``{"loss": [...], "l0": [...]}``). An SAE reproduces the L0 it
reached in training only on activations like the ones it was trained on, so each decoder
SAE is evaluated under every candidate convention and its L0 is compared with the last L0 in
its history; the convention whose L0 lies closest (in log ratio) is the best match.

Candidates:

- ``prefix_lm``: the encoder reads ``tokens[:, :p]``, the decoder reads ``[BOS] + tokens[:, p:]``
  (the task T5Gemma 2 was adapted for);
- ``reconstruct``: encoder and decoder read the same row;
- ``shifted_copy``: the encoder reads the row, the decoder reads it shifted right behind its
  BOS, what ``model(input_ids=x, labels=x)`` in transformers does (the easiest code to write).

This is an estimate, not a proof: L0 depends on the text distribution too, and the card's
1,500 training texts are unknown. On the synthetic stand-in the answer means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sae_lens_t5gemma.dtypes import dtype_name, to_sae

CANDIDATES = ("prefix_lm", "reconstruct", "shifted_copy")


@dataclass(frozen=True)
class DiagnosisRow:
    """One decoder SAE under one candidate convention."""

    sae_id: str
    layer: int
    convention: str
    l0: float
    """Mean L0 over the positions the decoder computed (special tokens excluded)."""
    mse: float
    """Mean squared error per element (the card's MSE is most likely this)."""
    history_l0: float | None
    """The last L0 of the checkpoint's training history."""
    n_tokens: int

    @property
    def distance(self) -> float:
        """|log(L0 / history L0)|: 0 when the SAE fires as sparsely as it did in training."""
        if not self.history_l0 or self.l0 <= 0:
            return math.inf
        return abs(math.log(self.l0 / self.history_l0))


@dataclass
class Diagnosis:
    rows: list[DiagnosisRow]
    synthetic: bool
    dtype: str = "float32"
    """The model's dtype during the measurement."""

    def best(self) -> dict[str, str]:
        """SAE id -> the convention whose L0 lies closest to the history's."""
        out: dict[str, tuple[float, str]] = {}
        for r in self.rows:
            if r.sae_id not in out or r.distance < out[r.sae_id][0]:
                out[r.sae_id] = (r.distance, r.convention)
        return {k: v[1] for k, v in out.items()}

    def verdict(self) -> str:
        votes: dict[str, int] = {}
        for conv in self.best().values():
            votes[conv] = votes.get(conv, 0) + 1
        if not votes:
            return "no decoder SAE with a training-history L0: nothing to compare"
        winner = max(votes, key=votes.__getitem__)
        label = "SYNTHETIC stand-in, meaningless: " if self.synthetic else "estimate: "
        return (
            f"{label}best match {winner!r} for {votes[winner]} of {sum(votes.values())} decoder SAEs ({votes}; "
            f"model in {self.dtype})"
        )

    def table(self) -> str:
        lines = [
            f"{'sae id':18s} {'convention':13s} {'L0':>9s} {'history L0':>10s} {'|log ratio|':>11s} {'MSE/elem':>10s}"
        ]
        best = self.best()
        for r in self.rows:
            mark = "  <- best" if best.get(r.sae_id) == r.convention else ""
            hist = f"{r.history_l0:10.1f}" if r.history_l0 else f"{'-':>10s}"
            lines.append(
                f"{r.sae_id:18s} {r.convention:13s} {r.l0:9.1f} {hist} {r.distance:11.3f} {r.mse:10.4g}{mark}"
            )
        return "\n".join(lines)


@torch.no_grad()
def _activations(
    model: Any, tokens: torch.Tensor, hook: str, convention: str, special: torch.Tensor
) -> torch.Tensor:
    """Decoder activations at ``hook`` under a candidate, at real positions that read no special token."""
    if convention == "shifted_copy":
        dec = model.hf_model.prepare_decoder_input_ids_from_labels(tokens)
        _, cache = model.run_with_cache(tokens, names_filter=[hook], decoder_input_ids=dec, return_type=None)
        keep = ~torch.isin(dec, special)
    else:
        with model.fed(convention):
            _, cache = model.run_with_cache(tokens, names_filter=[hook], return_type=None)
            keep = model.covered_mask(tokens, "decoder") & ~torch.isin(tokens, special)
    x = cache[hook]
    return x.reshape(*x.shape[:2], -1)[keep]


@torch.no_grad()
def diagnose(
    model: Any, saes: dict[str, Any], batches: Sequence[torch.Tensor], synthetic: bool = False
) -> Diagnosis:
    """Evaluate decoder SAEs under each candidate convention and compare with their histories.

    Args:
        model: a ``HookedT5Gemma2`` (its convention is restored afterwards).
        saes: SAE id -> SAELens SAE at a decoder site, carrying ``metadata.training_history``.
        batches: token batches ``[batch, n]``.
        synthetic: the model and SAEs are stand-ins (the verdict says so).
    """
    from sae_lens_t5gemma.evaluation import special_token_ids
    from sae_lens_t5gemma.mindchain import final_l0, training_history

    special = torch.tensor(special_token_ids(model.tokenizer))
    rows: list[DiagnosisRow] = []
    for sae_id, sae in saes.items():
        hook = model.canonical_name(sae.cfg.metadata.hook_name)
        if not hook.startswith("decoder_blocks."):
            raise ValueError(f"SAE {sae_id} reads {hook}: diagnose compares decoder SAEs only")
        for conv in CANDIDATES:
            x = torch.cat([_activations(model, t.to(model.cfg.device), hook, conv, special) for t in batches])
            feats = sae.encode(to_sae(sae, x))
            recon = sae.decode(feats)
            rows.append(
                DiagnosisRow(
                    sae_id=sae_id,
                    layer=int(hook.split(".")[1]),
                    convention=conv,
                    l0=float((feats > 0).sum(-1).float().mean()),
                    mse=float(((recon.float() - x.float().to(recon.device)) ** 2).mean()),
                    history_l0=final_l0(training_history(sae)),
                    n_tokens=x.shape[0],
                )
            )
    return Diagnosis(rows, synthetic, dtype_name(model.cfg.dtype))


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

    from sae_lens_t5gemma.hooked import load_t5gemma2
    from sae_lens_t5gemma.synthetic import stand_in_texts

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
    rows = model.to_tokens(list(texts or stand_in_texts()), truncate=True)[:, :context_size]
    batches = list(rows.split(batch_size))[: n_batches or None]
    return diagnose(model, saes, batches, synthetic=synthetic)
