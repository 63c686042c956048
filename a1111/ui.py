"""The TRuST tab (gradio 3 Blocks, as in AUTOMATIC1111 v1.x): the inputs of TRUST Unlearn, Erase / Interrupt, the
web UI's own progress bar, the training curves, the report and the resulting <lora:...> tag."""

from __future__ import annotations

import html

from ..trust_engine import attacks, methods, ranges
from ..trust_engine.concepts import CONCEPT_TYPES, NO_CONCEPT_TYPE
from ..trust_engine.render import training_curves
from . import bake as bake_module
from . import delta_script, host, run
from . import saliency as saliency_module
from . import verify as verify_module

MODES = list(ranges.RANGES["mode"].choices)
LOSSES = [c.upper() for c in ranges.RANGES["loss"].choices]
METHODS = methods.names()


def _limits(name: str) -> dict:
    allowed = ranges.RANGES[name]
    return {"minimum": min((allowed.low, *allowed.special)), "maximum": allowed.high}


def erase(id_task, concepts, mode, loss, steps, learning_rate, relative_lr, beta, xi, mask_refresh, seed,
          training_images, resolution, preserve, file_name, aligner, method="trust", method_settings="",
          concept_type=NO_CONCEPT_TYPE):
    """The Erase button (run under wrap_gradio_gpu_call: queue lock, shared.state.begin/end). Returns the tag, the
    curves (None when the method recorded none: UCE, FIA, ConceptPrune, a reused file without them), the report, the
    file HTML and the (empty) error HTML."""
    request = run.Request(concepts=concepts, mode=mode, loss=loss, steps=int(steps), learning_rate=float(learning_rate),
                          relative_lr=float(relative_lr), beta=float(beta), xi=float(xi),
                          mask_refresh=int(mask_refresh), seed=int(seed), training_images=int(training_images),
                          resolution=int(resolution), preserve=preserve, file_name=file_name, aligner=aligner,
                          method=method, method_settings=method_settings or "",
                          concept_type=concept_type or NO_CONCEPT_TYPE)
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


def find_neurons(id_task, concept, concepts, xi, seed, steps, images, anchor, aligner, resolution):
    """The "Find concept neurons" button (under wrap_gradio_gpu_call): the heatmap, the summary, the error HTML.
    Without a concept of its own it looks for the first of the concepts to erase."""
    first = next((line.strip() for line in (concepts or "").splitlines() if line.strip()), "")
    request = saliency_module.SaliencyRequest(concept=(concept or "").strip() or first, xi=float(xi), seed=int(seed), steps=int(steps),
                                              images=int(images), anchor=anchor, aligner=aligner,
                                              resolution=int(resolution))
    try:
        out = saliency_module.find(request)
    except host.Interrupted as e:
        return None, f"Interrupted: {e}", ""
    return out["heatmap"], out["summary"], ""


def verify(id_task, delta, strength, concept, chosen, budget, threshold, seed, paraphrases, aligner, resolution):
    """The Verify button (under wrap_gradio_gpu_call): the worst cases, the verdict HTML, the report, the error HTML."""
    request = verify_module.VerifyRequest(delta=delta, aligner=aligner, concept=concept, strength=float(strength),
                                          attacks=", ".join(chosen or []), budget=budget, threshold=float(threshold),
                                          seed=int(seed), paraphrases=paraphrases, resolution=int(resolution))
    try:
        out = verify_module.verify(request)
    except host.Interrupted as e:
        return None, "", f"Interrupted: {e}", ""
    verdict = ("<p><b>PASS</b>: every attack's success rate is at or below the threshold at this budget.</p>"
               if out["passed"] else
               "<p><b>FAIL</b>: an attack brought the concept back more often than the threshold allows.</p>")
    return out["grid"], verdict, out["report"], ""


def _delta_row(gr, ui_common, shared, prefix: str):
    """A row with a TRuST delta from the Lora folder (↻ re-reads it) and a strength; returns (dropdown, slider)."""
    with gr.Row():
        delta = gr.Dropdown(delta_script.choices(shared), value=delta_script.NONE,
                            label="Delta (TRuST files in the Lora folder)", elem_id=f"{prefix}_delta")
        ui_common.create_refresh_button(delta, lambda: None, lambda: {"choices": delta_script.choices(shared)},
                                        f"{prefix}_refresh")
        strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength", elem_id=f"{prefix}_strength")
    return delta, strength


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
                concept_type = gr.Dropdown(list(CONCEPT_TYPES), value=NO_CONCEPT_TYPE, elem_id="trust_concept_type",
                                           label="Concept type (adds preserve prompts and an anchor; real "
                                                 "checkpoints)")
                with gr.Row():
                    aligner = gr.Dropdown([run.NO_ALIGNER] + run.aligner_names(shared), value=run.NO_ALIGNER,
                                          label="Aligner (models/concept_aligners)", elem_id="trust_aligner")
                    file_name = gr.Textbox(label="File name (empty = from the concept)", elem_id="trust_file_name")
                with gr.Row():
                    method = gr.Dropdown(METHODS, value="trust", elem_id="trust_method",
                                         label="Method (the others read only concepts, mode, preserve, seed, "
                                               "resolution and file name)")
                    method_settings = gr.Textbox(label="Method settings (key=value, one per line; for TRuST only "
                                                       "those without an input above, e.g. row_budget=0.15)",
                                                 lines=2, elem_id="trust_method_settings",
                                                 placeholder="erase_scale=30\npreserve_scale=1")
                with gr.Row():
                    interrupt = gr.Button("Interrupt", elem_id="trust_interrupt")
                    start = gr.Button("Erase", variant="primary", elem_id="trust_erase")
                with gr.Accordion("Bake a delta into a new checkpoint", open=False, elem_id="trust_bake_panel"):
                    bake_delta, bake_strength = _delta_row(gr, ui_common, shared, "trust_bake")
                    with gr.Row():
                        bake_name = gr.Textbox(label="New checkpoint name (empty = <checkpoint>_<delta>)",
                                               elem_id="trust_bake_name")
                        bake_start = gr.Button("Bake into the loaded checkpoint", elem_id="trust_bake")
                    bake_report = gr.Textbox(label="Bake report", lines=3, interactive=False,
                                             elem_id="trust_bake_report")
                    bake_error = gr.HTML(elem_id="trust_bake_error")
                with gr.Accordion("Concept saliency: where the concept lives", open=False,
                                  elem_id="trust_saliency_panel"):
                    sal_concept = gr.Textbox(label="Concept (empty = the first line of Concepts to erase)",
                                             elem_id="trust_saliency_concept")
                    with gr.Row():
                        sal_steps = gr.Slider(label="Sampling steps", value=10, step=1, elem_id="trust_saliency_steps",
                                              **_limits("saliency_steps"))
                        sal_images = gr.Slider(label="Images", value=4, step=1, elem_id="trust_saliency_images",
                                               **_limits("saliency_images"))
                        sal_anchor = gr.Textbox(label="Anchor (noise contrast; empty = unconditional)",
                                                elem_id="trust_saliency_anchor")
                    sal_start = gr.Button("Find concept neurons", elem_id="trust_saliency")
                    sal_heatmap = gr.Image(label="Concept neurons per block (share of rows; count, max z)",
                                           type="numpy", interactive=False, elem_id="trust_saliency_heatmap")
                    sal_summary = gr.Textbox(label="Saliency summary", lines=4, interactive=False,
                                             elem_id="trust_saliency_summary")
                    sal_error = gr.HTML(elem_id="trust_saliency_error")
                with gr.Accordion("Verify an erasure: attack it", open=False, elem_id="trust_verify_panel"):
                    gr.HTML("<p>Runs attacks that try to bring the concept back on the loaded checkpoint with a "
                            "delta applied, judged by the aligner chosen above (required). Passing is not a "
                            "guarantee: a delta can be unloaded, and larger white-box budgets recover most erased "
                            "concepts in the literature.</p>")
                    ver_delta, ver_strength = _delta_row(gr, ui_common, shared, "trust_verify")
                    ver_concept = gr.Textbox(label="Concept (empty = the first one the delta erases)",
                                             elem_id="trust_verify_concept")
                    ver_attacks = gr.CheckboxGroup(list(attacks.ATTACKS), value=list(attacks.ATTACKS),
                                                   label="Attacks", elem_id="trust_verify_attacks")
                    with gr.Row():
                        ver_budget = gr.Radio(list(attacks.BUDGET_NAMES), value="quick",
                                              label="Budget (quick: minutes; full: the README's)",
                                              elem_id="trust_verify_budget")
                        ver_threshold = gr.Slider(0.0, 1.0, value=0.2, step=0.01,
                                                  label="Pass when every attack success rate is at most",
                                                  elem_id="trust_verify_threshold")
                    ver_paraphrases = gr.Textbox(label="Paraphrases (one per line; empty = default framings)",
                                                 lines=2, elem_id="trust_verify_paraphrases")
                    ver_start = gr.Button("Verify", elem_id="trust_verify")
                    ver_verdict = gr.HTML(elem_id="trust_verify_verdict")
                    ver_grid = gr.Image(label="Worst cases (one row per attack)", type="numpy", interactive=False,
                                        elem_id="trust_verify_grid")
                    ver_report = gr.Textbox(label="Verify report", lines=8, interactive=False,
                                            elem_id="trust_verify_report")
                    ver_error = gr.HTML(elem_id="trust_verify_error")
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
                  training_images, resolution, preserve, file_name, aligner, method, method_settings, concept_type]
        start.click(fn=call_queue.wrap_gradio_gpu_call(erase, extra_outputs=["", None, "", ""]),
                    _js="trust_start", inputs=inputs, outputs=[tag, curves, report, output, error])
        bake_start.click(fn=call_queue.wrap_gradio_gpu_call(bake, extra_outputs=[""]), _js="trust_bake_start",
                         inputs=[id_task, bake_delta, bake_strength, bake_name], outputs=[bake_report, bake_error])
        sal_start.click(fn=call_queue.wrap_gradio_gpu_call(find_neurons, extra_outputs=[None, "", ""]),
                        _js="trust_saliency_start",
                        inputs=[id_task, sal_concept, concepts, xi, seed, sal_steps, sal_images, sal_anchor, aligner, resolution],
                        outputs=[sal_heatmap, sal_summary, sal_error])
        ver_start.click(fn=call_queue.wrap_gradio_gpu_call(verify, extra_outputs=[None, "", "", ""]),
                        _js="trust_verify_start",
                        inputs=[id_task, ver_delta, ver_strength, ver_concept, ver_attacks, ver_budget, ver_threshold,
                                seed, ver_paraphrases, aligner, resolution],
                        outputs=[ver_grid, ver_verdict, ver_report, ver_error])
        interrupt.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
        send.click(fn=None, _js="trust_send_to_txt2img", inputs=[tag], outputs=[])
    return [(block, "TRuST", "trust")]
