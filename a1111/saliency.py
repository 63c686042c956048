"""Concept saliency in AUTOMATIC1111: where a concept lives in the loaded checkpoint (the concept neurons of
trust_engine.saliency, as ComfyUI's Concept Saliency node finds them), as a heatmap and a summary. Used by the tab's
"Find concept neurons" button; the caller holds the queue lock. Read only: the model is never written."""

from __future__ import annotations

import dataclasses
import os

from ..trust_engine import concepts as concept_specs
from ..trust_engine import ranges
from ..trust_engine.job import default_cfg
from . import host, run

# input -> its name in the table of allowed values (trust_engine.ranges), where they differ
TABLE_NAMES = {"steps": "saliency_steps", "images": "saliency_images"}


@dataclasses.dataclass
class SaliencyRequest:
    concept: str
    xi: float = 2.0
    seed: int = 0
    steps: int = 10
    images: int = 4
    anchor: str = ""  # what the concept should become (noise-contrast mode compares with it); empty = unconditional
    aligner: str = ""  # a CLIP folder in models/concept_aligners; none = noise-contrast saliency
    resolution: int = 0


def find(request: SaliencyRequest, modules=None) -> dict:
    """The concept neurons of `request.concept` on the loaded checkpoint: the heatmap (H x W x 3 uint8), a summary and
    the neurons per site. Raises ValueError for bad input or a checkpoint TRuST cannot use, host.Interrupted."""
    import torch

    from ..trust_engine.functional import SiteDeltas
    from ..trust_engine.render import saliency_heatmap
    from ..trust_engine.saliency import SaliencyConfig, estimate
    from ..trust_engine.unet_view import find_sites

    modules = modules or run.web_ui_modules()
    shared = modules.shared
    if not request.concept.strip():
        raise ValueError("concept is empty: type what to look for, e.g. 'a cat'")
    ranges.check_inputs({"xi": request.xi, "seed": request.seed, "steps": request.steps, "images": request.images,
                         "resolution": request.resolution}, TABLE_NAMES)
    expanded = concept_specs.expand(request.concept.strip(), "individual")
    sd_model = shared.sd_model
    family = host.model_family(sd_model, shared.cmd_opts)
    host.check_unet_replacement(getattr(modules, "sd_unet", None))
    aligner = None
    if request.aligner and request.aligner != run.NO_ALIGNER:
        from ..trust_engine.loading import load_aligner

        aligner = load_aligner(os.path.join(run.aligner_root(shared), request.aligner),
                               next(sd_model.model.diffusion_model.parameters()).device)
    progress = host.HostProgress(shared.state, 0, 0, by_stage=True, job="TRuST concept saliency")
    with host.attention_for_training(modules.sd_hijack, shared.opts):
        host.restore_lora_patches(sd_model)
        with host.a1111_parts(sd_model, modules, request.resolution, need_decoder=aligner is not None) as parts, \
                torch.enable_grad():
            deltas = SiteDeltas(parts.unet, find_sites(parts.unet))
            config = SaliencyConfig(xi=float(request.xi), steps=int(request.steps), images=int(request.images))
            result = estimate(parts, deltas, list(expanded.forget), config, aligner, request.anchor or "",
                              torch.Generator().manual_seed(int(request.seed)), default_cfg(family), progress)
    how = "CLIP score" if result.mode == "clip" else "noise contrast (no aligner chosen)"
    summary = f"{request.concept.strip()!r}: {result.summary()}\nsaliency: {how}; xi {float(request.xi):g}"
    heat = saliency_heatmap(result, f"concept neurons of {request.concept.strip()!r}")
    neurons = {name: int(m.sum()) for name, m in result.mask.items() if int(m.sum())}
    return {"heatmap": heat, "summary": summary, "neurons": neurons, "mode": result.mode}
