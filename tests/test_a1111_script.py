"""Tier 1: scripts/trust_a1111.py as AUTOMATIC1111 runs it (a module executed from its path, with the web UI's
`modules.script_callbacks`): it imports the repository as a package and registers the tab, settings and API."""

import runpy
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_script_registers_its_callbacks(monkeypatch):
    calls = {}
    callbacks = types.ModuleType("modules.script_callbacks")
    for name in ("on_ui_settings", "on_ui_tabs", "on_app_started"):
        setattr(callbacks, name, lambda fn, _name=name: calls.setdefault(_name, []).append(fn))
    modules = types.ModuleType("modules")
    modules.script_callbacks = callbacks
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    for _ in range(2):  # "Reload UI" runs the script again: it registers again (the web UI cleared its callbacks)
        runpy.run_path(str(ROOT / "scripts" / "trust_a1111.py"), run_name="trust_a1111")
    assert sorted(calls) == ["on_app_started", "on_ui_settings", "on_ui_tabs"]
    assert all(len(v) == 2 for v in calls.values())
    assert calls["on_ui_tabs"][0].__module__ == "trust_unlearning_extension.a1111.ui"
    for key in [k for k in sys.modules if k.startswith("trust_unlearning_extension")]:
        del sys.modules[key]
