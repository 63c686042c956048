"""AUTOMATIC1111 / Forge install hook: installs what requirements.txt asks for and is missing, without touching what
the web UI owns. It runs at every start of the web UI, so when everything is satisfied it only reads package
metadata (no pip call). Under ComfyUI (whose Manager installs requirements.txt itself) or anywhere without the web
UI's `launch` module it does nothing.

AUTOMATIC1111's `launch.is_installed` looks at the name only, not the version, so versions are checked here with
importlib.metadata and packaging. Packages the web UI pins (torch, transformers, tokenizers, gradio, ...) are never
installed, upgraded or downgraded: a version outside our range is reported, not changed. Whatever pip installs is
constrained to the versions of the web UI's packages that are installed now, so pip cannot move them either.
"""

from __future__ import annotations

import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# Installed by the web UI, pinned by it (AUTOMATIC1111 v1.8: torch 2.1.2, transformers 4.30.2, tokenizers 0.13.3,
# gradio 3.41.2, numpy 1.26.2, safetensors 0.4.2, Pillow 9.5.0): never changed by this extension.
HOST_OWNED = frozenset({
    "torch", "torchvision", "torchaudio", "xformers", "transformers", "tokenizers", "gradio", "gradio-client",
    "numpy", "pillow", "safetensors", "huggingface-hub", "accelerate", "fastapi", "pydantic", "open-clip-torch",
})


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def requirements(path: str | os.PathLike[str] | None = None) -> list[str]:
    path = Path(path) if path else Path(__file__).with_name("requirements.txt")
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plan(lines: list[str], installed=installed_version, host_owned=HOST_OWNED) -> tuple[list[str], list[str]]:
    """(requirements to pip-install, warnings). A requirement is installed when its package is missing, or present
    at a version outside the range and not owned by the host; a host-owned package outside the range only warns."""
    Requirement, Version = _packaging()
    install, warnings = [], []
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonical(req.name)
        if name in ("torch", "torchvision", "torchaudio"):
            continue  # the host's own build (CUDA/ROCm/CPU); never ours to install
        version = installed(req.name)
        if version is not None and (not req.specifier or req.specifier.contains(Version(version), prereleases=True)):
            continue
        if version is None:
            install.append(line)
        elif name in host_owned:
            warnings.append(f"{req.name} {version} is installed and the web UI owns it; TRuST asks for {line}. "
                            f"Left as it is: if the TRuST tab fails, update the web UI.")
        else:
            install.append(line)
    return install, warnings


# Caps that follow from the host's versions: diffusers 0.32+ imports SiglipImageProcessor (transformers >= 4.37) and
# 0.33+ touches torch.xpu (absent from torch 2.1). diffusers 0.31.0 is the newest tested beside AUTOMATIC1111 v1.8.0.
COMPAT_CAPS = (("transformers", "4.37", "diffusers<0.32"), ("torch", "2.3", "diffusers<0.32"))


def constraints(installed=installed_version, host_owned=HOST_OWNED) -> list[str]:
    """`name==version` for every host-owned package that is installed (pip may not move them), plus the caps their
    versions imply for our own packages."""
    _, Version = _packaging()
    pins = {f"{name}=={v}" for name in host_owned if (v := installed(name)) is not None}
    for name, below, cap in COMPAT_CAPS:
        v = installed(name)
        if v is not None and Version(v).release < Version(below).release:
            pins.add(cap)
    return sorted(pins)


def main() -> None:
    try:
        import launch  # only AUTOMATIC1111 / Forge have this module
    except ImportError:
        return
    install, warnings = plan(requirements())
    for warning in warnings:
        print(f"TRuST: {warning}", file=sys.stderr)
    if not install:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(constraints()) + "\n")
        pinned = f.name
    try:
        wanted = " ".join(f'"{line}"' for line in install)
        launch.run_pip(f'install {wanted} -c "{pinned}"', f"TRuST requirements: {', '.join(install)}")
    finally:
        os.unlink(pinned)


if __name__ == "__main__":  # AUTOMATIC1111 runs it as a script with its own folder on PYTHONPATH
    main()
