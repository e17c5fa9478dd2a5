"""``list``, ``inspect`` and ``convert``: the release, its SAEs and the mindchain checkpoints."""

from __future__ import annotations

import argparse

from sae_lens_t5gemma.cli.options import add_command, add_device, resolve_device
from sae_lens_t5gemma.model.sizes import MINDCHAIN_REPO


def add_list(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "list", help="releases, SAE ids and hook names")
    p.add_argument("--all", action="store_true", help="also list SAELens' other releases")

    def run(a: argparse.Namespace) -> None:
        if not a.all:  # the package's own YAML is enough, no SAELens import
            from sae_lens_t5gemma.loading.listing import format_package_releases

            print(format_package_releases())
            return
        from sae_lens_t5gemma.loading.registration import format_releases, register

        register()
        print(format_releases(include_all=True))

    p.set_defaults(func=run, light=True)


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "inspect",
        help="an SAE's config, shapes and weight statistics",
        description="inspect RELEASE SAE_ID, or inspect --path FOLDER_OR_PT",
    )
    p.add_argument("release", nargs="?", help="release name, e.g. t5gemma2-270m-attn_out")
    p.add_argument("sae_id", nargs="?", help="SAE id, e.g. encoder/layer_5")
    p.add_argument(
        "--path", help="a SAELens folder (cfg.json) or a mindchain .pt file instead (default: none)"
    )
    add_device(p, "the SAE")

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.loading.inspection import describe_sae

        print(describe_sae(a.release, a.sae_id, a.path, resolve_device(a.device)))

    p.set_defaults(func=run)


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "convert", help="mindchain snapshot -> SAELens-native folders + release YAML")
    p.add_argument("src_dir", help=f"local snapshot of {MINDCHAIN_REPO}")
    p.add_argument("out_dir", help="output folder (must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    p.add_argument("--release", default="t5gemma2-270m-attn_out", help="release name in the YAML")
    p.add_argument(
        "--repo-id",
        help="HF repo the folders will be uploaded to (the YAML's repo_id; default: a placeholder to edit)",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.loading.convert import REPO_ID_PLACEHOLDER, convert_snapshot

        yaml_path = convert_snapshot(
            a.src_dir, a.out_dir, a.force, a.progress, a.release, a.repo_id or REPO_ID_PLACEHOLDER
        )
        print(f"wrote {yaml_path}")

    p.set_defaults(func=run)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    add_list(sub)
    add_inspect(sub)
    add_convert(sub)
