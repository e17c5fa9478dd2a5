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


def section_hook_and_steer(cache: Path, out: Path) -> None:
    """Issue 3: load the model, attach an SAE, top features on a sentence, steer one."""


def section_train(cache: Path, out: Path) -> None:
    """Issue 4: a short offline training run."""


def section_compare(cache: Path, out: Path) -> None:
    """Issue 5: a small comparison on the stand-in."""


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
