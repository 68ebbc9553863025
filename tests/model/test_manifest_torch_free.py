"""The service reads manifests without torch installed."""

from __future__ import annotations

import subprocess
import sys


def test_manifest_module_imports_without_torch() -> None:
    # sys.modules['torch'] = None makes any `import torch` raise ImportError.
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import model.manifest\n"
        "assert model.manifest.Manifest\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
