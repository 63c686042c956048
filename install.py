"""AUTOMATIC1111 install hook: installs requirements.txt through the web UI's own launcher (never torch, which the
host owns). Under ComfyUI (whose Manager installs requirements.txt itself) or anywhere else it does nothing.
"""

from pathlib import Path

try:
    import launch  # only AUTOMATIC1111 / Forge have this module
except ImportError:
    launch = None


def requirements() -> list[str]:
    lines = (Path(__file__).with_name("requirements.txt")).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def package_name(requirement: str) -> str:
    for sep in ("<", ">", "=", "!", "~", "[", ";", " "):
        requirement = requirement.split(sep)[0]
    return requirement.strip()


if launch is not None:
    for requirement in requirements():
        name = package_name(requirement)
        if name.lower() == "torch":
            continue
        if not launch.is_installed(name):
            launch.run_pip(f'install "{requirement}"', f"TRuST requirement: {requirement}")
