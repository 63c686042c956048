"""Tier 2: the pack inside a real ComfyUI. Runs only when COMFYUI_ROOT points at a ComfyUI checkout (ComfyUI is
not on PyPI; see README "Tier-2 tests"); otherwise every test here is skipped with the reason.

A session starts ComfyUI's own server (main.py --cpu) on a free port, with a base directory in a temp folder,
this repository loaded by ComfyUI's custom-node loader (through a symlink in a custom_nodes folder given by
--extra-model-paths-config), a test-only probe pack beside it, and a tiny SD1.5-detectable checkpoint built on
the fly (320-channel one-level UNet, random CLIP-L and SD VAE; the shapes ComfyUI's detection needs), and a small
checkpoint ComfyUI detects as SDXL-family (Segmind_Vega layout, CLIP-L + CLIP-G; see tier2_support._unet).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .tier2_support import CHECKPOINT, CHECKPOINT_SDXL, HERE, REPO, Client, build_checkpoint, free_port


def comfyui_root() -> Path | None:
    root = os.environ.get("COMFYUI_ROOT")
    if root and (Path(root) / "main.py").is_file() and (Path(root) / "comfy").is_dir():
        return Path(root)
    return None


def pytest_collection_modifyitems(config, items):
    root = comfyui_root()
    reason = ("tier 2 needs a ComfyUI checkout: set COMFYUI_ROOT=/path/to/ComfyUI and run with a Python that has "
              "ComfyUI's requirements (see README, Tier-2 tests)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.comfyui)
            if root is None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comfy():
    root = comfyui_root()
    # its own folder, not pytest's rotating basetemp: another pytest run could remove that under the live server
    base = Path(tempfile.mkdtemp(prefix="trust-tier2-"))
    checkpoints, nodes = base / "models" / "checkpoints", base / "custom_nodes_under_test"
    checkpoints.mkdir(parents=True)
    nodes.mkdir()
    (base / "custom_nodes").mkdir()  # ComfyUI lists its own custom_nodes folder at start
    for name in (CHECKPOINT, CHECKPOINT_SDXL):
        build_checkpoint(root, checkpoints / name)
    (nodes / "trust_unlearning").symlink_to(REPO, target_is_directory=True)
    (nodes / "trust_tier2_probe").symlink_to(HERE / "probe_pack", target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"tier2:\n  base_path: {base}\n  checkpoints: models/checkpoints\n"
                      f"  custom_nodes: {nodes}\n")
    port = free_port()
    log = base / "server.log"
    cmd = [sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--base-directory", str(base), "--extra-model-paths-config", str(config),
           "--disable-metadata"]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
    client = Client(f"http://127.0.0.1:{port}", log, base)
    try:
        end = time.time() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {server.returncode}:\n{client.tail()}")
            try:
                client._call("/system_stats")
                break
            except (OSError, AssertionError):
                if time.time() > end:
                    raise RuntimeError(f"ComfyUI did not start in 300 s:\n{client.tail()}") from None
                time.sleep(1)
        yield client
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(base, ignore_errors=True)
