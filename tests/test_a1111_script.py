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
    scripts = types.ModuleType("modules.scripts")
    scripts.AlwaysVisible = object()

    class Script:  # the base class the web UI looks for among the script module's values
        pass

    scripts.Script = Script
    modules = types.ModuleType("modules")
    modules.script_callbacks, modules.scripts = callbacks, scripts
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    monkeypatch.setitem(sys.modules, "modules.scripts", scripts)
    for _ in range(2):  # "Reload UI" runs the script again: it registers again (the web UI cleared its callbacks)
        namespace = runpy.run_path(str(ROOT / "scripts" / "trust_a1111.py"), run_name="trust_a1111")
    found = [v for v in namespace.values() if isinstance(v, type) and issubclass(v, Script) and v is not Script]
    assert len(found) == 1  # the AlwaysVisible "TRuST delta" script of txt2img / img2img
    script = found[0]()
    assert script.title() == "TRuST delta" and script.show(False) is scripts.AlwaysVisible
    assert sorted(calls) == ["on_app_started", "on_ui_settings", "on_ui_tabs"]
    assert all(len(v) == 2 for v in calls.values())
    assert calls["on_ui_tabs"][0].__module__ == "trust_unlearning_extension.a1111.ui"
    for key in [k for k in sys.modules if k.startswith("trust_unlearning_extension")]:
        del sys.modules[key]
