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

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from sae_lens_t5gemma.comparison.harness import evaluate_pairs
from sae_lens_t5gemma.comparison.pairs import (
    DEFAULT_GEMMA_SCOPE_VARIANT,
    MINDCHAIN_RELEASE,
    Pair,
    gemma_scope_variants,
)
from sae_lens_t5gemma.comparison.report import Report
from sae_lens_t5gemma.comparison.report_files import write_report
from sae_lens_t5gemma.model.sites import GEMMA_SCOPE_HOOKS, transfer_hook
from sae_lens_t5gemma.model.sizes import T5GEMMA2_MODEL
from sae_lens_t5gemma.outputs import owned_outputs


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
    releases = get_size(size).gemma_scope_releases
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
                    target = transfer_hook(f"blocks.{layer}.{GEMMA_SCOPE_HOOKS[gs_site]}", stack)
                    if target is not None:
                        pairs.append(Pair(spec, t5gemma2_model, target))
    pairs += [Pair(str(p)) for p in local_saes]
    return pairs


# ---------------------------------------------------------------------------- loading


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
        report = evaluate_pairs(
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
