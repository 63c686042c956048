"""Regenerates the pictures of the example workflows from ComfyUI's real front-end: docs/workflows/<name>.jpg (the
README's, after a CPU-size run) and example_workflows/<name>.jpg (the template browser's thumbnails, as loaded).

Run: COMFYUI_ROOT=/path/to/ComfyUI python tools/screenshots.py, with a Python that has ComfyUI's requirements and
playwright, and Chromium installed (README, Tier 3). It runs the tier-3 tests, which save the screenshots.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    if not os.environ.get("COMFYUI_ROOT"):
        print("set COMFYUI_ROOT to a ComfyUI checkout (see README, Tier 3)", file=sys.stderr)
        return 2
    env = {**os.environ, "TRUST_SCREENSHOTS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "pytest", "-m", "browser", "tests/browser", "-p", "no:cacheprovider",
               *sys.argv[1:]]
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
