"""Tier 2: the extension inside a real AUTOMATIC1111 (v1.8.0 tried). Runs only when A1111_ROOT points at a web UI
folder (with launch.py, modules/ and repositories/) and pytest runs with that web UI's Python (its venv, with the
extension's requirements installed: see README, AUTOMATIC1111 tier 2); otherwise every test here is skipped with the
reason. AUTOMATIC1111 is AGPL-3.0: it is never vendored here.

A session builds a tiny SD1.5-shaped checkpoint (make_tiny_sd15.py, a .yaml beside it), links this repository into
a temp data folder's extensions/, and starts the web UI headless on the CPU (UI and API: the tab must build too).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOKENIZER = REPO / "trust_engine" / "testbed" / "weights" / "pipeline" / "tokenizer"


def a1111_root() -> Path | None:
    root = os.environ.get("A1111_ROOT")
    if root and (Path(root) / "launch.py").is_file() and (Path(root) / "modules").is_dir():
        return Path(root)
    return None


def pytest_collection_modifyitems(config, items):
    root = a1111_root()
    reason = ("tier 2 needs AUTOMATIC1111: set A1111_ROOT=/path/to/stable-diffusion-webui and run pytest with the "
              "web UI's Python (README, AUTOMATIC1111 tier 2)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.a1111)
            if root is None:
                item.add_marker(pytest.mark.skip(reason=reason))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    def __init__(self, url: str, data: Path, log: Path):
        self.url, self.data, self.log = url, data, log
        self.lora_dir = data / "models" / "Lora"

    def get(self, path: str, **kw):
        import requests

        return requests.get(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, **kw):
        import requests

        return requests.post(self.url + path, timeout=kw.pop("timeout", 600), **kw)


@pytest.fixture(scope="session")
def webui():
    import requests

    root = a1111_root()
    data = Path(tempfile.mkdtemp(prefix="trust-a1111-"))
    (data / "extensions").mkdir()
    (data / "models" / "Lora").mkdir(parents=True)
    (data / "extensions" / "trust-unlearning").symlink_to(REPO, target_is_directory=True)
    (data / "extensions" / "trust-tier2-probe").symlink_to(HERE / "probe_ext", target_is_directory=True)
    build = subprocess.run([sys.executable, str(HERE / "make_tiny_sd15.py"), str(root), str(data), str(TOKENIZER)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    port = free_port()
    log = data / "webui.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
            "--skip-python-version-check", "--skip-version-check", "--use-cpu", "all", "--no-half", "--precision",
            "full", "--disable-nan-check", "--no-download-sd-model", "--do-not-download-clip", "--api",
            "--server-name", "127.0.0.1", "--port", str(port), "--data-dir", str(data), "--loglevel", "DEBUG",
            "--ckpt", str(data / "models" / "Stable-diffusion" / "tiny_sd15.safetensors")]
    with open(log, "w") as out:
        process = subprocess.Popen(args, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                pytest.fail("the web UI exited:\n" + log.read_text()[-4000:])
            try:
                # the extensions' routes are mounted after the web UI's own (app_started): wait for both
                if all(requests.get(url + path, timeout=5).status_code == 200
                       for path in ("/sdapi/v1/sd-models", "/trust/v1/deltas")):
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy starting on loaded cores
                pass
            if time.time() > deadline:
                pytest.fail("the web UI (or the extension's routes) did not start in 300 s:\n" + log.read_text()[-4000:])
            time.sleep(2)
        yield WebUI(url, data, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        if os.environ.get("A1111_KEEP") is None:
            shutil.rmtree(data, ignore_errors=True)
