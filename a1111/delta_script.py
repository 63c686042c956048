"""The AlwaysVisible "TRuST delta" script of txt2img / img2img: enable, a TRuST delta from the Lora folder, a strength.
It adds the delta's `<lora:name:strength>` tag to every prompt (the built-in Lora extension applies it) and notes
under the images when the delta was made for another base model than the loaded checkpoint."""

from __future__ import annotations

import re

from ..trust_engine.delta import FINGERPRINT_KEY, fingerprint
from ..trust_engine.sketch import compare_base, sketch
from . import host, run

NONE = "None"
TITLE = "TRuST delta"


def choices(shared) -> list[str]:
    """The TRuST deltas in the Lora folder by tag name (the file's stem), as the dropdown lists them."""
    return [NONE] + sorted({d["name"] for d in run.list_deltas(shared)})


def delta_file(shared, name: str) -> str:
    found = [d["file"] for d in run.list_deltas(shared) if d["name"] == name]
    if not found:
        raise ValueError(f"TRuST delta {name!r} is not in the Lora folder ({run.lora_root(shared)}): press the "
                         f"refresh button beside the list")
    return found[0]


def tag(name: str, strength: float) -> str:
    return f"<lora:{name}:{float(strength):g}>"


def with_tag(prompt: str, name: str, strength: float) -> str:
    """The prompt with the delta's tag appended, unless the prompt already names that Lora (e.g. pasted back from
    an image's infotext, which records the tag this script added)."""
    if re.search(r"<lora:" + re.escape(name) + r":", prompt):
        return prompt
    return f"{prompt} {tag(name, strength)}" if prompt.strip() else tag(name, strength)


_MODEL_FINGERPRINTS: dict[tuple, tuple[str, str]] = {}


def model_fingerprint(sd_model) -> tuple[str, str]:
    """(fingerprint, sketch) of the loaded checkpoint's Q/K/V weights (the Lora extension's patches taken off),
    computed once per loaded checkpoint: the weights themselves are not kept (SDXL's are over a gigabyte)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    key = (id(sd_model), getattr(info, "filename", None), getattr(sd_model, "sd_model_hash", None))
    if key not in _MODEL_FINGERPRINTS:
        _MODEL_FINGERPRINTS.clear()
        weights = host.effective_site_weights(sd_model)
        _MODEL_FINGERPRINTS[key] = (fingerprint(weights), sketch(weights))
        del weights
    return _MODEL_FINGERPRINTS[key]


def base_warning(metadata: dict[str, str], sd_model, source: str) -> str | None:
    """None when the delta was made for the loaded checkpoint (or records no base); otherwise what to tell the user.
    A delta's sketch of its base can recognise that base lightly modified (a LoRA merged in): then a note only."""
    made_for = metadata.get(FINGERPRINT_KEY, "")
    if not made_for:
        return None
    model_fp, model_sketch = model_fingerprint(sd_model)
    check = compare_base(made_for, metadata, model_fp, model_sketch)
    if check.exact:
        return None
    if check.close:
        return f"TRuST: {source}: this checkpoint is {check.close_note()}. Applied."
    return (f"TRuST WARNING: {source} was made for another base model (fingerprint {made_for[:12]})."
            f"{check.mismatch_detail()} It is applied anyway, but it may not erase the concept and may damage other "
            f"content; retrain on this checkpoint for a reliable result.")


def file_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def process(p, enabled: bool, name: str, strength: float, shared) -> str | None:
    """What the script does before a generation: add the tag to the prompts (hires-fix prompts too) and note a
    base-model mismatch under the images. Returns the warning, if any."""
    if not enabled or not name or name == NONE:
        return None
    path = delta_file(shared, name)
    p.all_prompts = [with_tag(x, name, strength) for x in p.all_prompts]
    if isinstance(getattr(p, "all_hr_prompts", None), list) and p.all_hr_prompts:
        p.all_hr_prompts = [with_tag(x, name, strength) for x in p.all_hr_prompts]
    try:
        warning = base_warning(file_metadata(path), p.sd_model if getattr(p, "sd_model", None) is not None
                               else shared.sd_model, name)
    except Exception as e:  # a model the adapter cannot read (e.g. Forge): the tag still applies, say we could not check
        warning = f"TRuST: could not compare {name} with this checkpoint's weights ({type(e).__name__}: {e})"
    if warning:
        print(warning)
        p.comment(warning)
    return warning


def script_class():
    """The scripts.Script subclass the web UI instantiates (built here so this module imports without the web UI)."""
    from modules import scripts

    class TrustDeltaScript(scripts.Script):
        def title(self):
            return TITLE

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            import gradio as gr
            from modules import shared, ui_common

            tab = "img2img" if is_img2img else "txt2img"
            with gr.Accordion(TITLE, open=False, elem_id=f"trust_delta_{tab}"):
                with gr.Row():
                    enabled = gr.Checkbox(label="Enable", value=False, elem_id=f"trust_delta_{tab}_enable")
                    name = gr.Dropdown(choices(shared), value=NONE, label="Delta (TRuST files in the Lora folder)",
                                       elem_id=f"trust_delta_{tab}_file")
                    ui_common.create_refresh_button(name, lambda: None, lambda: {"choices": choices(shared)},
                                                    f"trust_delta_{tab}_refresh")
                    strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength",
                                         elem_id=f"trust_delta_{tab}_strength")
            return [enabled, name, strength]

        def process(self, p, enabled, name, strength):
            from modules import shared

            process(p, enabled, name, strength, shared)

    return TrustDeltaScript
