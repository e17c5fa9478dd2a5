"""Console entry of ``sae-lens-t5gemma`` (``[project.scripts]``).

``import sae_lens_t5gemma`` registers the release with SAELens, which imports SAELens and torch
(seconds). This module sits outside the package and tells the package's ``__init__`` to leave
that to the command (``sae_lens_t5gemma.cli.main.main`` registers before any command that needs
SAELens), so ``--help``, ``list`` and argument errors answer at once. The command line itself
lives in :mod:`sae_lens_t5gemma.cli.main`.
"""

from __future__ import annotations

import sys

DEFER_REGISTRATION = True
"""Read by ``sae_lens_t5gemma/__init__.py``."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``sae-lens-t5gemma ...``)."""
    from sae_lens_t5gemma.cli.main import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    # ``python -m sae_lens_t5gemma_cli``: let the package find the flag under the module's name.
    sys.modules.setdefault("sae_lens_t5gemma_cli", sys.modules[__name__])
    sys.exit(main())
