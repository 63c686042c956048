"""The TRuST tab (gradio 3 Blocks, as in AUTOMATIC1111 v1.x): the inputs of TRUST Unlearn, Erase / Interrupt, the
web UI's own progress bar, the training curves, the report and the resulting <lora:...> tag."""

from __future__ import annotations

import html

from ..trust_engine import methods, ranges
from ..trust_engine.render import training_curves
from . import bake as bake_module
from . import delta_script, host, run

MODES = list(ranges.RANGES["mode"].choices)
LOSSES = [c.upper() for c in ranges.RANGES["loss"].choices]
METHODS = methods.names()


def _limits(name: str) -> dict:
    allowed = ranges.RANGES[name]
    return {"minimum": min((allowed.low, *allowed.special)), "maximum": allowed.high}


def erase(id_task, concepts, mode, loss, steps, learning_rate, relative_lr, beta, xi, mask_refresh, seed,
          training_images, resolution, preserve, file_name, aligner, method="trust", method_settings=""):
    """The Erase button (run under wrap_gradio_gpu_call: queue lock, shared.state.begin/end). Returns the tag, the
    curves (None when the method recorded none: UCE, FIA, ConceptPrune, a reused file without them), the report, the
    file HTML and the (empty) error HTML."""
    request = run.Request(concepts=concepts, mode=mode, loss=loss, steps=int(steps), learning_rate=float(learning_rate),
                          relative_lr=float(relative_lr), beta=float(beta), xi=float(xi),
                          mask_refresh=int(mask_refresh), seed=int(seed), training_images=int(training_images),
                          resolution=int(resolution), preserve=preserve, file_name=file_name, aligner=aligner,
                          method=method, method_settings=method_settings or "")
    try:
        out = run.unlearn(request)
    except host.Interrupted as e:
        return "", None, f"Interrupted: {e}", "", ""
    curves = training_curves(out["history"], run.curves_title(request)) if out["history"] else None
    # the last output is the error/performance HTML that wrap_gradio_call fills
    return out["tag"], curves, out["report"], f"<p>{html.escape(out['file'])}</p>", ""


def bake(id_task, delta, strength, file_name):
    """The Bake button (under wrap_gradio_gpu_call, like Erase): a new checkpoint with the delta merged in. Returns
    the report and the (empty) error HTML."""
    try:
        out = bake_module.bake(bake_module.BakeRequest(delta=delta, strength=float(strength), file_name=file_name))
    except host.Interrupted as e:
        return f"Interrupted: {e}", ""
    return out["report"], ""


def tabs():
    import gradio as gr
    from modules import call_queue, shared, ui_common

    with gr.Blocks(analytics_enabled=False) as block:
        with gr.Row():
            with gr.Column(variant="panel"):
                concepts = gr.Textbox(label="Concepts to erase (one per line)", lines=3, elem_id="trust_concepts",
                                      placeholder="nudity\nred circle\ncat on the table")
                with gr.Row():
                    mode = gr.Dropdown(MODES, value=MODES[0], label="Mode", elem_id="trust_mode")
                    loss = gr.Radio(LOSSES, value="CIP", label="Loss (CIP hard, CSR soft)", elem_id="trust_loss")
                with gr.Row():
                    steps = gr.Slider(label="Steps", value=60, step=1, elem_id="trust_steps", **_limits("steps"))
                    training_images = gr.Slider(label="Training images", value=32, step=1,
                                                elem_id="trust_training_images", **_limits("forget_images"))
                with gr.Row():
                    relative_lr = gr.Number(label="Relative learning rate", value=0.1, elem_id="trust_relative_lr")
                    learning_rate = gr.Number(label="Learning rate (0 = relative)", value=0.0,
                                              elem_id="trust_learning_rate")
                    beta = gr.Number(label="β (0 = the loss's default)", value=0.0, elem_id="trust_beta")
                with gr.Row():
                    xi = gr.Number(label="ξ (z-score threshold)", value=2.0, elem_id="trust_xi")
                    mask_refresh = gr.Number(label="Mask refresh (0 = never)", value=1, precision=0,
                                             elem_id="trust_mask_refresh")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="trust_seed")
                    resolution = gr.Number(label="Resolution (0 = native)", value=0, precision=0,
                                           elem_id="trust_resolution")
                preserve = gr.Textbox(label="Preserve (prompts that must keep working, one per line)", lines=2,
                                      elem_id="trust_preserve")
                with gr.Row():
                    aligner = gr.Dropdown([run.NO_ALIGNER] + run.aligner_names(shared), value=run.NO_ALIGNER,
                                          label="Aligner (models/concept_aligners)", elem_id="trust_aligner")
                    file_name = gr.Textbox(label="File name (empty = from the concept)", elem_id="trust_file_name")
                with gr.Row():
                    method = gr.Dropdown(METHODS, value="trust", elem_id="trust_method",
                                         label="Method (the others read only concepts, mode, preserve, seed, "
                                               "resolution and file name)")
                    method_settings = gr.Textbox(label="Method settings (key=value, one per line; other methods only)",
                                                 lines=2, elem_id="trust_method_settings",
                                                 placeholder="erase_scale=30\npreserve_scale=1")
                with gr.Row():
                    interrupt = gr.Button("Interrupt", elem_id="trust_interrupt")
                    start = gr.Button("Erase", variant="primary", elem_id="trust_erase")
                with gr.Accordion("Bake a delta into a new checkpoint", open=False, elem_id="trust_bake_panel"):
                    with gr.Row():
                        bake_delta = gr.Dropdown(delta_script.choices(shared), value=delta_script.NONE,
                                                 label="Delta (TRuST files in the Lora folder)",
                                                 elem_id="trust_bake_delta")
                        ui_common.create_refresh_button(bake_delta, lambda: None,
                                                        lambda: {"choices": delta_script.choices(shared)},
                                                        "trust_bake_refresh")
                        bake_strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength",
                                                  elem_id="trust_bake_strength")
                    with gr.Row():
                        bake_name = gr.Textbox(label="New checkpoint name (empty = <checkpoint>_<delta>)",
                                               elem_id="trust_bake_name")
                        bake_start = gr.Button("Bake into the loaded checkpoint", elem_id="trust_bake")
                    bake_report = gr.Textbox(label="Bake report", lines=3, interactive=False,
                                             elem_id="trust_bake_report")
                    bake_error = gr.HTML(elem_id="trust_bake_error")
            with gr.Column(variant="panel"):
                gr.HTML(elem_id="trust_progress")  # trust.js writes shared.state.textinfo here
                output = gr.HTML(elem_id="trust_output")
                with gr.Row():
                    tag = gr.Textbox(label="Resulting LoRA tag", elem_id="trust_tag", interactive=False)
                    send = gr.Button("Send to txt2img", elem_id="trust_send")
                curves = gr.Image(label="Loss / forget score", type="numpy", interactive=False, elem_id="trust_curves")
                report = gr.Textbox(label="Report", lines=12, interactive=False, elem_id="trust_report")
                error = gr.HTML(elem_id="trust_error")
        id_task = gr.Textbox(visible=False, elem_id="trust_id_task")
        inputs = [id_task, concepts, mode, loss, steps, learning_rate, relative_lr, beta, xi, mask_refresh, seed,
                  training_images, resolution, preserve, file_name, aligner, method, method_settings]
        start.click(fn=call_queue.wrap_gradio_gpu_call(erase, extra_outputs=["", None, "", ""]),
                    _js="trust_start", inputs=inputs, outputs=[tag, curves, report, output, error])
        bake_start.click(fn=call_queue.wrap_gradio_gpu_call(bake, extra_outputs=[""]), _js="trust_bake_start",
                         inputs=[id_task, bake_delta, bake_strength, bake_name], outputs=[bake_report, bake_error])
        interrupt.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
        send.click(fn=None, _js="trust_send_to_txt2img", inputs=[tag], outputs=[])
    return [(block, "TRuST", "trust")]
