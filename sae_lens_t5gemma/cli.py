"""``sae-lens-t5gemma``: a thin command line over the library.

Each subcommand parses its arguments and calls one library function, which the tests
call directly. Heavy imports happen inside the subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


# --------------------------------------------------------------- list / inspect / convert (issue 2)
def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="releases, SAE ids and hook names")
    p.set_defaults(func=lambda a: print("TODO list"))


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="an SAE's config, shapes and weight statistics")
    p.set_defaults(func=lambda a: print("TODO inspect"))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="mindchain snapshot -> SAELens-native folders + release YAML")
    p.set_defaults(func=lambda a: print("TODO convert"))


# ------------------------------------------------------------------------------ train (issue 4)
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train SAEs on T5Gemma 2 activations with SAELens' runners")
    p.set_defaults(func=lambda a: print("TODO train"))


# ---------------------------------------------------------------------------- compare (issue 5)
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="side-by-side eval report against Gemma Scope 2")
    p.set_defaults(func=lambda a: print("TODO compare"))


# ------------------------------------------------------------------------------- demo (all)
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded synthetic stand-in (offline)")
    p.add_argument("--out", default="out/demo", help="folder for the demo's files")

    def run(a: argparse.Namespace) -> None:
        from sae_lens_t5gemma.demo import run_demo

        run_demo(a)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-lens-t5gemma", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_list, _add_inspect, _add_convert, _add_train, _add_compare, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        # Bad input: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
