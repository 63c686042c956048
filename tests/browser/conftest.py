"""Tier 3: ComfyUI's real front-end (the comfyui-frontend-package its requirements pin) in headless Chromium, driven
by playwright's Python package. Skipped with the reason unless COMFYUI_ROOT is set, Chromium is found and playwright
imports. The ComfyUI server and the tiny checkpoint are tier 2's (tests/comfyui/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from comfyui.conftest import comfy, comfyui_root  # noqa: F401  (the tier-2 server fixture, reused)

HERE = Path(__file__).resolve().parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def skip_reason() -> str | None:
    if comfyui_root() is None:
        return ("tier 3 needs a ComfyUI checkout: set COMFYUI_ROOT=/path/to/ComfyUI and run with a Python that has "
                "ComfyUI's requirements and playwright (see README, Tier 3)")
    if chromium_path() is None:
        return "tier 3 needs Chromium (Debian: apt-get install chromium; or set CHROMIUM=/path/to/chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "tier 3 needs playwright's Python package (pip install playwright; no browser download is needed)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="trust-tier3-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
