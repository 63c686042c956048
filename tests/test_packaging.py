"""The pack imports as a top-level engine package and as a ComfyUI-style package under any folder name."""

import importlib.util
import subprocess
import sys

from conftest import ROOT


def test_pack_root_imports_under_any_folder_name_without_comfyui():
    name = "Some-Folder_name_x_pack"  # ComfyUI registers the folder's path-derived name
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert isinstance(module.NODE_DISPLAY_NAME_MAPPINGS, dict)
        assert sys.modules[f"{name}.trust_engine"].__version__ == module.__version__
        assert "comfy" not in sys.modules
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_engine_runs_as_a_top_level_module():
    result = subprocess.run([sys.executable, "-m", "trust_engine", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "testbed-check" in result.stdout


def test_requirements_never_list_torch():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        assert not line.strip().lower().startswith("torch"), line


def test_install_hook_does_nothing_outside_automatic1111(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


