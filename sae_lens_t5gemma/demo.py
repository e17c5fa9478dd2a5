"""``sae-lens-t5gemma demo``: the main job on the embedded synthetic stand-in.

With no network it writes a throwaway hub cache with a tiny random T5Gemma 2 and 36
mindchain-format SAEs under the real repo ids, switches huggingface_hub offline, and runs
the same code a user runs online. Everything it prints is labelled SYNTHETIC.
Each issue's part of the job is one section function below.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sae_lens_t5gemma import synthetic

BANNER = "SYNTHETIC STAND-IN: random weights, tiny model; numbers say nothing about the real SAEs."


def section_load(cache: Path, out: Path) -> None:
    """Issue 2: load all 36 SAEs through SAE.from_pretrained."""
    import time

    from sae_lens import SAE

    from sae_lens_t5gemma.mindchain import final_l0, training_history
    from sae_lens_t5gemma.registration import PACKAGE_RELEASE, valid_sae_ids

    print(f"\n== load: every SAE of {PACKAGE_RELEASE!r} via SAE.from_pretrained (SYNTHETIC weights) ==")
    t0 = time.perf_counter()
    header = f"{'sae_id':<18}{'hook_name':<38}{'d_in':>5}{'d_sae':>7}  {'dtype':<8}{'|W_dec| mean':>13}{'final l0':>10}"
    print(header)
    ids = valid_sae_ids(PACKAGE_RELEASE)
    for sae_id in ids:
        sae = SAE.from_pretrained(release=PACKAGE_RELEASE, sae_id=sae_id)
        l0 = final_l0(training_history(sae))
        print(
            f"{sae_id:<18}{sae.cfg.metadata.hook_name:<38}{sae.cfg.d_in:>5}{sae.cfg.d_sae:>7}  {sae.cfg.dtype:<8}"
            f"{sae.W_dec.norm(dim=1).mean().item():>13.4f}{l0 if l0 is not None else float('nan'):>10.1f}"
        )
    print(f"loaded {len(ids)} SAEs in {time.perf_counter() - t0:.1f} s (SYNTHETIC stand-in weights)")


def section_hook_and_steer(cache: Path, out: Path) -> None:
    """Issue 3: load the model, attach an SAE, top features on a sentence, steer one."""


def section_train(cache: Path, out: Path) -> None:
    """Issue 4: a short offline training run."""


def section_compare(cache: Path, out: Path) -> None:
    """Issue 5: a small comparison on the stand-in."""
    import time

    from sae_lens_t5gemma.compare import compare, standard_pairs

    print("\n== compare: mindchain vs Gemma Scope 2; Gemma Scope 2 on T5Gemma 2's encoder (SYNTHETIC) ==")
    t0 = time.perf_counter()
    # The cache holds T5Gemma 2 + mindchain; Gemma 3 and Gemma Scope 2 stand-ins join it here.
    synthetic.write_gemma3_stand_in_hub(cache)
    pairs = standard_pairs([5], gemma_scope_sites=("attn_out", "resid_post"))
    report = compare(
        pairs,
        out_dir=out / "compare",
        context_size=32,
        batch_size=4,
        n_batches=2,
        banner=BANNER,
        progress=False,
    )
    print(report.summary())
    print(
        f"compared {len(report.rows)} pairs in {time.perf_counter() - t0:.1f} s; see {report.files['report']}"
    )


def run_demo(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(BANNER)
    with tempfile.TemporaryDirectory(prefix="sae_lens_t5gemma_demo_hub_") as tmp:
        cache = synthetic.write_stand_in_hub(tmp)
        with synthetic.offline_hub(cache):
            for section in (section_load, section_hook_and_steer, section_train, section_compare):
                section(cache, out)
    print(BANNER)
