"""Shared fixtures: the bundled testbed parts, loaded once per session (CPU, float32)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def pipe():
    from trust_engine.testbed import bundle

    return bundle.load_pipeline()


@pytest.fixture(scope="session")
def judge():
    from trust_engine.testbed import bundle

    return bundle.load_judge()


@pytest.fixture(scope="session")
def testbed():
    """(pipeline, DiffusionParts, Aligner) of the bundled testbed."""
    from trust_engine.testbed import bundle

    return bundle.load_parts()
