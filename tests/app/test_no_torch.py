"""The service never imports torch: with `import torch` failing, a process creates the app and serves."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError

    from pathlib import Path

    from fastapi.testclient import TestClient

    import app.cli
    from app.config import Settings
    from app.main import create_app

    settings = Settings(model_dir=Path(sys.argv[1]), execution_provider="cpu", max_batch_size=4)
    with TestClient(create_app(settings)) as client:
        assert client.get("/sample?n=2&seed=0").status_code == 200
        decoded = client.post("/decode", json={"latents": [[0.0] * 16]})
        assert decoded.status_code == 200
    loaded = sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "torch" and module)
    assert not loaded, loaded
    print("served without torch")
    """
)


def test_app_serves_without_torch(mnist_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(mnist_model_dir)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "served without torch"
