"""Verify an erasure in AUTOMATIC1111: the pack's attacks (trust_engine.attacks, through trust_engine.verify) on the
loaded checkpoint with a TRuST delta from the Lora folder applied, judged by a concept aligner. Shared by the tab's
Verify button and POST /trust/v1/verify; the caller holds the queue lock.

The erased model is a private tree over the checkpoint's tensors with new tensors where the delta changes something
(`host.put_delta`); the base model is the checkpoint itself (the Lora extension's patches taken off). Neither is
written: the web UI's model is bit-identical afterwards, also after an error or an interruption.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ..trust_engine import attacks, ranges
from ..trust_engine.delta import Delta
from ..trust_engine.job import default_cfg
from ..trust_engine.sketch import compare_base
from ..trust_engine.verify import check_threshold
from ..trust_engine.verify import verify as run_verify
from . import delta_script, host, run


@dataclasses.dataclass
class VerifyRequest:
    """The inputs of Verify, as the tab and POST /trust/v1/verify take them."""

    delta: str  # a TRuST delta in the Lora folder, by its tag name (as GET /trust/v1/deltas lists them)
    aligner: str = ""  # a CLIP folder in models/concept_aligners: judges whether an image shows the concept
    concept: str = ""  # empty = the first concept the delta erases
    strength: float = 1.0
    attacks: str = ", ".join(attacks.ATTACKS)
    budget: str = "quick"
    threshold: float = 0.2
    seed: int = 0
    paraphrases: str = ""  # one per line; empty = a default list of framings of the concept
    resolution: int = 0


def attack_names(text: str) -> list[str]:
    return [n.strip() for n in text.replace("\n", ",").split(",") if n.strip()]


def concept_of(request: VerifyRequest, delta: Delta) -> str:
    if request.concept.strip():
        return request.concept.strip()
    try:
        erased = json.loads(delta.metadata.get("concepts", "[]"))
    except ValueError:
        erased = []
    if not erased:
        raise ValueError(f"{request.delta} does not record what it erases: type the concept to attack")
    return str(erased[0])


def verify(request: VerifyRequest, modules=None) -> dict:
    """Attack the erasure of `request.delta` on the loaded checkpoint. Returns the report, pass / fail, the JSON
    report and the worst cases as an H x W x 3 uint8 array. Raises ValueError (bad input, a delta for another base
    model, a checkpoint TRuST cannot use), host.Interrupted (Interrupt pressed; nothing changed)."""
    import numpy as np
    import torch

    modules = modules or run.web_ui_modules()
    shared = modules.shared
    names = attack_names(request.attacks)
    if not request.delta or request.delta == delta_script.NONE:
        raise ValueError("choose the TRuST delta to verify")
    ranges.check_inputs({"strength": request.strength, "seed": request.seed, "resolution": request.resolution})
    check_threshold(request.threshold)
    attacks.check_inputs("x", names, request.budget, request.seed)
    if not request.aligner or request.aligner == run.NO_ALIGNER:
        raise ValueError("Verify judges images with a concept aligner (a CLIP in models/concept_aligners): choose one")
    delta = Delta.load(delta_script.delta_file(shared, request.delta))
    concept = concept_of(request, delta)
    attacks.check_inputs(concept, names, request.budget, request.seed)
    sd_model = shared.sd_model
    family = host.model_family(sd_model, shared.cmd_opts)
    host.check_unet_replacement(getattr(modules, "sd_unet", None))
    model_fp, model_sketch = delta_script.model_fingerprint(sd_model)
    check = compare_base(delta.base_fingerprint, delta.metadata, model_fp, model_sketch)
    if not (check.exact or check.close):
        raise ValueError(f"{request.delta} was made for another base model (fingerprint {delta.base_fingerprint[:12]})."
                         f"{check.mismatch_detail()} Load the checkpoint it was trained on: attacking it here says "
                         f"nothing about the erasure.")
    from ..trust_engine.loading import load_aligner

    device = next(sd_model.model.diffusion_model.parameters()).device
    aligner = load_aligner(os.path.join(run.aligner_root(shared), request.aligner), device)
    lines = [p for p in request.paraphrases.splitlines() if p.strip()] or None
    progress = host.HostProgress(shared.state, 0, 0, by_stage=True, job="TRuST verify")
    with host.attention_for_training(modules.sd_hijack, shared.opts):
        host.restore_lora_patches(sd_model)
        with host.a1111_parts(sd_model, modules, request.resolution) as base, \
                host.a1111_parts(sd_model, modules, request.resolution) as patched:
            host.put_delta(patched.unet, delta, float(request.strength))
            with torch.enable_grad():
                verdict = run_verify(patched, concept, names, threshold=float(request.threshold),
                                     budget=request.budget, seed=int(request.seed), base=base, aligner=aligner,
                                     paraphrases=lines, cfg=default_cfg(family), progress=progress)
    report = verdict.report() + f"\ndelta: {request.delta} at strength {float(request.strength):g} on the loaded " \
                                f"checkpoint; base model: the checkpoint without it"
    if check.close:
        report += f"\nnote: this checkpoint is {check.close_note()}"
    grid = (verdict.grid()[0].numpy() * 255).round().astype(np.uint8)
    return {"report": report, "passed": verdict.passed, "json": verdict.to_json(), "grid": grid, "concept": concept}
