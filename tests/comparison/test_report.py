"""The comparison's report (comparison/report.py, report_files.py): findings and tables from a hand-made report.

Covers: :func:`matched_variants` picks the Gemma Scope 2 variant nearest in L0 among rows of the
same site and layer (never another site); :func:`findings` writes the sentences this module
promises, with the numbers of a hand-made report (medians, fractions, null clearance, norm
and causal controls, matched-task CE, matched sparsity, the token-count warning) and the
SYNTHETIC prefix; ``Report.find`` and ``Report.summary``; ``write_report`` writes tables whose
cells are the rows' numbers. No model runs.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from sae_lens_t5gemma.comparison import report as R
from sae_lens_t5gemma.comparison.report_files import write_report

T5 = "google/t5gemma-2-270m-270m"
G3 = "google/gemma-3-270m"
GS_SMALL = "gemma-scope-2-270m-pt-res-all:layer_1_width_16k_l0_small"
GS_BIG = "gemma-scope-2-270m-pt-res-all:layer_1_width_16k_l0_big"


def _row(sae: str, family: str, model: str, site: str, l0: float, role: str = "native", stack: str = "encoder",
         d_sae: int = 16384, n_tokens: int = 1000, ev: float = 0.8) -> R.Row:  # fmt: skip
    return R.Row(
        model=model, family=family, stack=stack if family == "T5Gemma 2" else "decoder-only", layer=1,
        hook_name=f"{stack}_blocks.1.hook_{site}", site=site, site_words=R.SITE_WORDS[site], sae=sae,
        sae_source="test", sae_home_model=model, sae_home_hook="h", role=role, d_in=640, d_sae=d_sae,
        n_tokens=n_tokens, explained_variance=ev, mse=0.1, cossim=0.9, l0=l0, l1=1.0, l2_ratio=1.0,
        dead_frac=0.0, dense_frac=0.0, ce_loss_score=0.9, kl_div_score=0.8, ce_loss_without_sae=2.0,
        ce_loss_with_sae=2.1, ce_loss_with_ablation=3.0, ce_increase=0.1, kl_div_with_sae=0.05,
        kl_div_with_ablation=0.5, load_s=0.1, eval_s=0.2, task="t",
    )  # fmt: skip


def _transfer(sae: str, layer: int, corr: float, null: float, ci: tuple[float, float], **kw) -> R.TransferRow:
    base = dict(
        sae=sae, layer=layer, site="resid_post", target_model=T5, target_stack="encoder",
        target_hook=f"encoder_blocks.{layer}.hook_resid_post", home_model=G3, home_hook=f"blocks.{layer}.hook_resid_post",
        task_target="same", task_home="same", n_tokens=500, ev_target=0.3, ev_home=0.6, l0_target=30.0,
        l0_home=20.0, ce_increase_target=0.4, natives="none evaluated", ev_kept=0.5, ce_increase_home=0.2,
        corr_median=corr, corr_frac_above_0_5=0.25, corr_median_ci=ci, corr_median_null=null,
        corr_frac_above_0_5_null=0.05, norm_ratio=1.5, ev_norm_matched=0.4, corr_median_causal=corr + 0.1,
    )  # fmt: skip
    base.update(kw)
    return R.TransferRow(**base)


@pytest.fixture
def report() -> R.Report:
    rows = [
        _row("t5gemma2-270m-attn_out:encoder/layer_1", "T5Gemma 2", T5, "resid_post", l0=40.0),
        _row(GS_SMALL, "Gemma 3", G3, "resid_post", l0=15.0),
        _row(GS_BIG, "Gemma 3", G3, "resid_post", l0=100.0),
        # Nearer in L0 (40) but another site: never matched to a resid_post SAE.
        _row("gemma-scope-2-270m-pt-att-all:layer_1_width_16k_l0_small", "Gemma 3", G3, "attn_z", l0=41.0),
    ]
    transfer = [
        # Clears its null (0.6 and its interval's low end 0.5 above 0.2).
        _transfer(GS_SMALL, 1, corr=0.6, null=0.2, ci=(0.5, 0.7)),
        # Does not: its interval reaches below the null.
        _transfer(GS_BIG, 1, corr=0.3, null=0.25, ci=(0.2, 0.4), ev_norm_matched=0.36, norm_ratio=2.0),
    ]
    setup = dict(n_texts=8, context_size=32, batch_size=4, sequences={T5: 8, G3: 8}, same_tokens_for_all_models=False,
                 dense_threshold=0.1, versions={"sae-lens": "6"}, device="cpu")  # fmt: skip
    return R.Report(rows=rows, transfer=transfer, setup=setup, notes=[])


def test_matched_variants_pick_the_nearest_l0_of_the_same_site(report):
    (m,) = R.matched_variants(report.rows)
    # |log(100 / 40)| = 0.916 < |log(15 / 40)| = 0.981: the big variant is nearer.
    assert m["gemma_scope_sae"] == GS_BIG and m["candidates"] == 2 and m["gemma_scope_site"] == "resid_post"
    assert m["abs_log_l0_ratio"] == pytest.approx(math.log(100 / 40))


def test_findings_quote_the_report_numbers(report):
    found = R.findings(report)
    assert found[0] == (
        "Gemma Scope 2 resid_post SAEs on T5Gemma 2's encoder (layers 1; 2 SAEs): median feature correlation "
        "with Gemma 3 0.45 (25% of features above 0.5); highest at layer 1 (0.60), lowest at layer 1 (0.30). "
        "1 of 2 clear their permutation null (documents shuffled, positions kept): e.g. layer 1, 0.60 (90% "
        "interval over documents 0.50 to 0.70) against a null median of 0.20, and 25% of features above 0.5 "
        "against 5% by chance; the rest could be chance. Their explained variance on T5Gemma 2 is a median 50% "
        "of that on Gemma 3 (unclipped); kept variance does not mean kept features: a dictionary whose span "
        "still covers the activations reconstructs them with unrelated features, which is what the "
        "correlations above measure."
    )
    # Norm control: mean of (0.4 - 0.3) and (0.36 - 0.3) = +0.080.
    assert found[1] == (
        "Activation norms on T5Gemma 2 are 1.50-2.00x Gemma 3's at the same sites and positions; rescaling "
        "them to Gemma 3's mean norm changes EV by +0.080 on average: part of the difference is scale, not direction."
    )
    assert found[2].startswith(
        "Run causally, T5Gemma 2's encoder moves the median feature correlation from 0.45 to 0.55 "
        "(per SAE and layer, by +0.10 to +0.10; 2 transfers). The two models' RoPE are the same here"
    )
    assert found[3] == (
        "On the matched prefix_lm continuation task, splicing the SAE in raises CE by a median 0.4 nats on "
        "T5Gemma 2 against 0.2 on Gemma 3 (2 transfers)."
    )
    assert found[4] == (
        "Matched sparsity: the T5Gemma 2 SAEs run at L0 40-40; the nearest Gemma Scope 2 variants at 100-100 "
        "(worst match t5gemma2-270m-attn_out:encoder/layer_1: 40 vs 100); compare EV at matched L0 in the L0 "
        "plot, not across L0."
    )
    assert found[5] == (
        "Every row was measured on at most 1,000 tokens, fewer than 1,000,000: dead and dense fractions "
        "mostly measure rarity at this size."
    )
    assert len(found) == 6
    assert all(s.startswith(R.SYNTHETIC_PREFIX) for s in R.findings(report, synthetic=True))


def test_findings_without_measured_transfers_say_so():
    found = R.findings(R.Report(rows=[], transfer=[], setup={}, notes=[]))
    assert found == ["No Gemma 3 -> T5Gemma 2 transfer was measured feature by feature in this run."]


def test_find_and_summary(report):
    assert report.find(GS_BIG).l0 == 100.0
    with pytest.raises(KeyError, match="No row for SAE 'nope' on 'x'"):
        report.find("nope", model="x")
    lines = report.summary().splitlines()
    assert len(lines) == 1 + len(report.rows)
    assert lines[2].split()[-3:] == ["0.800", "15.0", "0.900"]  # EV, L0, CE score of GS_SMALL


def test_write_report_tables_hold_the_rows_numbers(report, tmp_path):
    write_report(report, tmp_path, title="T", synthetic=True)
    assert set(report.files) >= {"csv", "transfer_csv", "feature_transfer_csv", "json", "report"}
    with open(report.files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["l0"]) for r in rows] == [40.0, 15.0, 100.0, 41.0]
    payload = json.loads(report.files["json"].read_text())
    assert payload["synthetic"] is True and payload["findings"] == report.findings
    assert payload["matched_variants"] == R.matched_variants(report.rows)
    assert report.markdown.startswith("# T") and R.SYNTHETIC_PREFIX in report.markdown
