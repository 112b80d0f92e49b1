"""Importing attnzoo needs neither transformers nor timm (the ``hf`` and ``timm`` extras)."""

import subprocess
import sys


def test_import_attnzoo_loads_no_integration_dependency():
    code = (
        "import sys, attnzoo, attnzoo.integrations; "
        "bad = [m for m in ('transformers', 'timm', 'torchvision') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
