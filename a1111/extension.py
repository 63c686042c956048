"""Registers the extension with the web UI's callbacks (called each time the web UI loads its scripts)."""

from __future__ import annotations

from . import api, ui
from .run import DEFAULT_SUBFOLDER, SUBFOLDER_OPTION


def settings() -> None:
    from modules import shared

    section = ("trust", "TRuST")
    shared.opts.add_option(SUBFOLDER_OPTION, shared.OptionInfo(
        DEFAULT_SUBFOLDER, "Subfolder of the Lora folder where TRuST saves its deltas (empty = the Lora folder)",
        section=section))


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_settings(settings)
    script_callbacks.on_ui_tabs(ui.tabs)
    script_callbacks.on_app_started(api.mount)
