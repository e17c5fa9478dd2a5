"""The stand-in is a leaf: ``import sae_lens_t5gemma`` and ``register()`` load no stand-in module
(a fresh interpreter, so nothing imported by other tests counts)."""

from __future__ import annotations

import subprocess
import sys


def test_import_and_register_load_no_stand_in():
    code = (
        "import sae_lens_t5gemma, sys\n"
        "from sae_lens_t5gemma.loading.registration import register\n"
        "register()\n"
        "bad = sorted(m for m in sys.modules if 'stand_in' in m or 'synthetic' in m)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
