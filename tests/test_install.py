"""install.py's decisions (AUTOMATIC1111 / Forge install hook): what it installs, what it leaves to the web UI, and
that it is a quick no-op when everything is satisfied."""

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("trust_install_hook", ROOT / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

# what AUTOMATIC1111 v1.8.0 installs (requirements_versions.txt + torch 2.1.2)
A1111 = {"torch": "2.1.2", "transformers": "4.30.2", "tokenizers": "0.13.3", "gradio": "3.41.2", "numpy": "1.26.2",
         "safetensors": "0.4.2", "Pillow": "9.5.0", "huggingface-hub": "0.20.3"}


def versions(table):
    table = {install.canonical(k): v for k, v in table.items()}
    return lambda name: table.get(install.canonical(name))


def test_our_requirements_are_satisfied_by_automatic1111s_pins_except_diffusers():
    todo, warnings = install.plan(install.requirements(), versions(A1111))
    assert [install.canonical(line.split(">")[0].split("=")[0]) for line in todo] == ["diffusers"]
    assert warnings == []


def test_nothing_to_do_when_everything_is_satisfied():
    assert install.plan(install.requirements(), versions({**A1111, "diffusers": "0.31.0"})) == ([], [])


def test_torch_is_never_installed_even_when_missing_or_too_old():
    todo, warnings = install.plan(["torch>=2.3", "torchvision", "numpy>=1.0"], versions({"numpy": "1.26"}))
    assert todo == [] and warnings == []


def test_a_host_owned_package_at_the_wrong_version_is_reported_not_changed():
    todo, warnings = install.plan(["transformers>=4.40"], versions({"transformers": "4.30.2"}))
    assert todo == [] and len(warnings) == 1 and "transformers 4.30.2" in warnings[0]


def test_a_missing_or_too_old_package_of_ours_is_installed_with_its_specifier():
    todo, _ = install.plan(["diffusers>=0.27", "somepkg>=2"], versions({"diffusers": "0.20.0"}))
    assert todo == ["diffusers>=0.27", "somepkg>=2"]


def test_a_missing_host_owned_package_is_installed_and_markers_are_honoured():
    todo, _ = install.plan(["gradio>=3", 'winonly>=1; sys_platform == "nonexistent"'], versions({}))
    assert todo == ["gradio>=3"]


def test_constraints_pin_the_installed_host_packages():
    pins = install.constraints(versions(A1111))
    assert "transformers==4.30.2" in pins and "torch==2.1.2" in pins and "gradio==3.41.2" in pins
    assert "diffusers<0.32" in pins  # newer diffusers needs transformers >= 4.37 and torch >= 2.3
    assert not any(p.startswith("diffusers") for p in install.constraints(versions({"transformers": "5.1",
                                                                                  "torch": "2.13.0"})))


FAKE_LAUNCH = ("import sys\n"
               "def is_installed(name):\n    raise AssertionError('version-blind is_installed must not be used')\n"
               "def run_pip(args, desc):\n    print('PIP ' + args)\n    print('CONSTRAINTS ' + open(args.split('-c ')[1].strip('\"')).read().replace(chr(10), ' '))\n")


def _run_hook(tmp_path, requirements: str):
    folder = tmp_path / "ext"
    folder.mkdir()
    shutil.copy(ROOT / "install.py", folder / "install.py")
    (folder / "requirements.txt").write_text(requirements)
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "launch.py").write_text(FAKE_LAUNCH)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(folder / "install.py")], cwd=webui, capture_output=True, text=True,
                            env={"PYTHONPATH": str(webui)})
    return result, time.perf_counter() - start


def test_hook_calls_pip_only_for_what_is_missing_with_the_host_pinned(tmp_path):
    result, _ = _run_hook(tmp_path, "numpy>=1.0\nno-such-package-trust>=1.0\ntorch>=9\n")
    assert result.returncode == 0, result.stderr
    pip = [line for line in result.stdout.splitlines() if line.startswith("PIP ")]
    assert len(pip) == 1 and '"no-such-package-trust>=1.0"' in pip[0] and "numpy" not in pip[0] and "torch" not in pip[0]
    assert "numpy==" in result.stdout  # the constraints file pins the installed numpy


def test_hook_is_a_quick_no_op_when_satisfied(tmp_path):
    result, seconds = _run_hook(tmp_path, "numpy>=1.0\nsafetensors>=0.3\n")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr
    assert seconds < 5  # the interpreter start; no pip


def test_hook_does_nothing_without_the_web_ui(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
