"""Shared fixtures: the bundled testbed parts, loaded once per session (CPU, float32)."""

import hashlib
import importlib.util
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


# The pack as ComfyUI loads it, against the small fake of the ComfyUI calls it uses (tests/comfy_fake.py); each test
# module that asks for it gets its own fake models folder.
PACK = "trust_pack_under_test"


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    import comfy_fake

    models = tmp_path_factory.mktemp("models")
    comfy_fake.install(str(models), str(tmp_path_factory.mktemp("temp")))
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    yield module
    for key in [k for k in sys.modules if k == PACK or k.startswith(PACK + ".")]:
        del sys.modules[key]
    comfy_fake.uninstall()


@pytest.fixture(scope="module")
def host(pack):
    import comfy_fake

    return comfy_fake.host_objects()


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


