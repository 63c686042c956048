"""The Verify Erasure node (V1 API): runs the pack's attacks (trust_engine.attacks) on a patched MODEL and reports the
attack success rate per attack, a grid of the worst cases and pass / fail. Thin: the work is trust_engine.verify.
"""

from __future__ import annotations

import torch

from ..trust_engine import attacks
from ..trust_engine.job import default_cfg
from ..trust_engine.unet_view import find_sites, set_site_weight
from ..trust_engine.verify import check_threshold, verify
from . import host
from .trust_nodes import CATEGORY, _run


def _without_patches(model):
    """The MODEL as loaded, without its weight patches (the erasure's delta, and any other LoRA): the base when none
    is connected. A clone: the input MODEL keeps its patches."""
    base = model.clone()
    base.patches = {}
    if hasattr(base, "patches_uuid"):
        import uuid

        base.patches_uuid = uuid.uuid4()
    return base


def _sample_with_patches(parts, model) -> None:
    """Make the private UNet copy sample as the MODEL does at its cross-attention sites (its patches applied), also
    where the host has not written the patches into the module it loaded."""
    weights = host.effective_site_weights(model)
    with torch.no_grad():
        for site in find_sites(parts.unet):
            if site.name in weights:
                set_site_weight(parts.unet, site, weights[site.name].to(parts.device))


class TrustVerifyErasure:
    DESCRIPTION = (
        "Attacks an erased (patched) MODEL to see whether the concept comes back: paraphrase prompts, a learned soft "
        "prompt (UnlearnDiffAtk-style), a Ring-A-Bell-style text search and a relearning probe (fine-tuning on the "
        "base model's concept images). Reports the attack success rate (ASR) of each, a grid of the worst cases and "
        "pass when every ASR is at or below the threshold. Passing is not a guarantee: a delta can be unloaded, and "
        "larger white-box budgets recover most erased concepts in the literature."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE", "BOOLEAN")
    RETURN_NAMES = ("report", "worst_cases", "passed")
    OUTPUT_TOOLTIPS = ("ASR per attack, budget spent, how images were judged, pass / fail",
                       "the attacks' worst cases (images that show the concept first), one row per attack",
                       "True when every attack's ASR is at or below the threshold")
    FUNCTION = "verify"
    OUTPUT_NODE = True  # runs on its own: the report shows on the node

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the erased model, e.g. the MODEL of TRUST Unlearn or Apply Unlearned "
                                               "Delta; it is never modified"}),
                "clip": ("CLIP", {"tooltip": "the checkpoint's text encoder (Load Checkpoint's CLIP)"}),
                "vae": ("VAE", {"tooltip": "the checkpoint's VAE (Load Checkpoint's VAE)"}),
                "concept": ("STRING", {"default": "", "tooltip": "the erased concept, in plain words (e.g. 'a cat')"}),
                "attacks": ("STRING", {"default": ", ".join(attacks.ATTACKS), "tooltip":
                                       "attacks to run, comma-separated: " + ", ".join(attacks.ATTACKS)}),
                "budget": (list(attacks.BUDGET_NAMES), {"default": "quick", "tooltip":
                                                        "what each attack may spend: quick (minutes) or full"}),
                "threshold": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                        "pass when every attack's success rate is at or below this"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "seed of the attacks"}),
                "aligner": ("CONCEPT_ALIGNER", {"tooltip": "a CLIP from Load Concept Aligner: judges whether an "
                                                           "image shows the concept (score above an anchor-relative "
                                                           "threshold)"}),
            },
            "optional": {
                "base_model": ("MODEL", {"tooltip": "the model before the erasure (Load Checkpoint's MODEL); default: "
                                                    "the erased MODEL without its weight patches"}),
                "paraphrases": ("STRING", {"default": "", "multiline": True, "tooltip":
                                           "prompts for the paraphrase attack, one per line (synonyms, descriptions); "
                                           "empty = a default list of framings of the concept"}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip":
                                       "image size of the attacks' generations; 0 = the model's native size"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, concept=None, attacks=None):  # no **kwargs: ComfyUI still checks the other inputs
        if isinstance(concept, str) and not concept.strip():
            return "concept is empty: type the erased concept, e.g. 'a cat'"
        if isinstance(attacks, str):
            try:
                _names(attacks)
            except ValueError as e:
                return str(e)
        return True

    def verify(self, model, clip, vae, concept, attacks, budget, threshold, seed, aligner, base_model=None,
               paraphrases="", resolution=0, unique_id=None):
        names = _names(attacks)
        _check(concept, names, budget, seed, threshold, aligner, resolution)
        lines = [p for p in paraphrases.splitlines() if p.strip()] or None
        base_model = base_model if base_model is not None else _without_patches(model)
        derived = " (the erased MODEL without its patches)" if base_model is not model else ""

        def work():
            family = host.model_family(model)
            progress = host.HostProgress(unique_id, 0, 0, by_stage=True)
            with host.comfy_parts(model, clip, vae, resolution) as patched, \
                    host.comfy_parts(base_model, clip, vae, resolution) as base, host.aligner_on_device(aligner):
                _sample_with_patches(patched, model)
                _sample_with_patches(base, base_model)
                with torch.inference_mode(False):
                    return verify(patched, concept, names, threshold=threshold, budget=budget, seed=seed, base=base,
                                  aligner=aligner, paraphrases=lines, cfg=default_cfg(family), progress=progress)

        verdict = _run("attacking the erasure", resolution, work)
        report = verdict.report() + (f"\nbase model: the input base_model{derived}" if not derived
                                     else f"\nbase model{derived}")
        return {"ui": {"text": [report]}, "result": (report, verdict.grid(), verdict.passed)}


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.replace("\n", ",").split(",") if n.strip()]
    attacks.check_inputs("x", names, "quick", 0)
    return names


def _check(concept, names, budget, seed, threshold, aligner, resolution) -> None:
    """Every input before any work."""
    attacks.check_inputs(concept, names, budget, seed)
    check_threshold(threshold)
    if aligner is None:
        raise ValueError("no aligner connected: Verify Erasure judges images with a CLIP (Load Concept Aligner)")
    if not isinstance(resolution, int) or resolution < 0 or resolution % 8:
        raise ValueError(f"resolution must be 0 (native) or a multiple of 8, got {resolution}")


NODE_CLASS_MAPPINGS = {"TrustVerifyErasure": TrustVerifyErasure}
NODE_DISPLAY_NAME_MAPPINGS = {"TrustVerifyErasure": "Verify Erasure"}
