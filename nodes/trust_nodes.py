"""The ComfyUI nodes (V1 API): Concept Saliency, TRUST Unlearn, Apply Unlearned Delta, Load Concept Aligner and a
before/after grid. Thin: they translate host objects to engine calls (trust_engine) and back; no algorithm here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import torch

from ..trust_engine import concepts as concept_specs
from ..trust_engine import job, methods, ranges
from ..trust_engine.delta import BaseMismatchError, Delta, DeltaFileError, fingerprint
from ..trust_engine.functional import SiteDeltas
from ..trust_engine.parts import Aligner
from ..trust_engine.render import labelled_grid, saliency_heatmap, training_curves
from ..trust_engine.saliency import SaliencyConfig, SaliencyResult, estimate
from ..trust_engine.sketch import SKETCH_KEY, compare_base, sketch
from ..trust_engine.unet_view import find_sites
from . import host

CATEGORY = "unlearning/TRuST"
NO_FILE = "(none: use the delta input)"
MODES = list(ranges.RANGES["mode"].choices)
METHOD_NAMES = methods.names()
_METHOD_TOOLTIP = (
    "the eraser. trust (default): TRuST, fine-tunes only the concept neurons; every input above is TRuST's. The "
    "others use only concepts, mode, preserve, training_seed, file_name and method_settings: esd (ESD-x, fine-tunes "
    "cross-attention), uce (closed-form edit of cross-attention K/V, seconds), salun (saliency-masked fine-tune), "
    "fia and conceptprune (training-free: zero feed-forward weights)")
CONCEPT_TYPES = list(concept_specs.CONCEPT_TYPES)
_CONCEPT_TYPE_TOOLTIP = (
    "preserve prompts and an anchor for a common kind of concept, written for real checkpoints (added to your "
    "preserve prompts; your anchor wins). " + "; ".join(f"{name}: {kind.help}"
                                                        for name, kind in concept_specs.CONCEPT_TYPES.items()))
# node input -> its name in the table of allowed values (trust_engine.ranges), where they differ
_TABLE_NAMES = {"mask_refresh": "mask_every", "training_seed": "seed", "saliency_seed": "seed",
                "training_images": "forget_images"}
_SALIENCY_NAMES = {**_TABLE_NAMES, "steps": "saliency_steps", "images": "saliency_images"}
log = logging.getLogger("trust_unlearning")


@dataclasses.dataclass
class ConceptNeurons:
    """What flows on a CONCEPT_NEURONS socket: the saliency result, for TRUST Unlearn's first step and for display."""

    concept: str
    result: SaliencyResult
    base_fingerprint: str

    def __repr__(self) -> str:  # ComfyUI may print socket values
        return f"ConceptNeurons({self.concept!r}, {self.result.total()} neurons)"


@dataclasses.dataclass
class UnlearnedDelta:
    """What flows on an UNLEARNED_DELTA socket: the engine's Delta and the file it was saved to."""

    delta: Delta
    path: str = ""

    def __repr__(self) -> str:
        return f"UnlearnedDelta({os.path.basename(self.path) or 'unsaved'}, {len(self.delta.sites)} sites)"


def _image(array: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> ComfyUI IMAGE (1xHxWx3 float in [0, 1])."""
    return torch.from_numpy(array.astype(np.float32) / 255.0)[None]


def _ranged(kind: str, name: str, default, tooltip: str, **extra) -> tuple:
    """A widget whose min/max come from the table of allowed values (ComfyUI then refuses values outside them)."""
    allowed = ranges.RANGES[name]
    return (kind, {"default": default, "min": min((allowed.low, *allowed.special)), "max": allowed.high, **extra,
                   "tooltip": tooltip})


def _fingerprint_of(model) -> str:
    """Fingerprint of the MODEL as it samples (its patches applied), from its Q/K/V weights where they are."""
    return fingerprint(host.effective_site_weights(model))


def _run(what: str, resolution: int, fn):
    """Run fn, turning out-of-memory into an error that says what to do (the MODEL is untouched either way)."""
    try:
        return fn()
    except (concept_specs.ConceptError, host.HostModelError, DeltaFileError, BaseMismatchError) as e:
        raise ValueError(str(e)) from None
    except RuntimeError as e:
        if host.is_out_of_memory(e):
            raise RuntimeError(host.out_of_memory_message(what, resolution)) from None
        if "derivative for" in str(e) and "not implemented" in str(e):
            raise RuntimeError(
                "CSR needs second derivatives through attention, which this ComfyUI attention backend lacks: choose "
                "loss CIP, or start ComfyUI with --use-pytorch-cross-attention"
            ) from None
        raise


class TrustLoadAligner:
    DESCRIPTION = (
        "Loads a CLIP model with both towers (e.g. openai/clip-vit-large-patch14 saved as a transformers folder) "
        "from models/concept_aligners/. Concept Saliency and TRUST Unlearn use it to score how much an image shows "
        "the concept; without one they fall back to noise-contrast saliency and say so."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONCEPT_ALIGNER",)
    RETURN_NAMES = ("aligner",)
    OUTPUT_TOOLTIPS = ("a CLIP scorer for Concept Saliency and TRUST Unlearn",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"aligner_name": (_aligner_folders(), {
            "tooltip": "a folder in models/concept_aligners/ holding config.json, model.safetensors and the "
                       "tokenizer files of a transformers CLIPModel"})}}

    def load(self, aligner_name: str):
        import comfy.model_management as mm
        import folder_paths
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        folder = next((os.path.join(root, aligner_name) for root in folder_paths.get_folder_paths("concept_aligners")
                       if os.path.isfile(os.path.join(root, aligner_name, "config.json"))), None)
        if folder is None:
            raise ValueError(f"no aligner folder {aligner_name!r} with a config.json in models/concept_aligners/; "
                             f"put a transformers CLIPModel folder there and press R to refresh")
        device = mm.get_torch_device()
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        with torch.inference_mode(False):  # kept on the offload device; the nodes move it to the GPU for a run only
            model = CLIPModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype).eval()
            model.requires_grad_(False).to(mm.unet_offload_device())
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        try:
            processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            mean, std, size = list(processor.image_mean), list(processor.image_std), int(processor.crop_size["height"])
        except OSError:  # no preprocessor_config.json: CLIP's published defaults
            mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
            size = model.config.vision_config.image_size
        return (Aligner(model, tokenizer, mean, std, size),)


def _aligner_folders() -> list[str]:
    try:
        import folder_paths

        roots = folder_paths.get_folder_paths("concept_aligners")
    except (ImportError, KeyError):
        return []
    found = []
    for root in roots:
        if os.path.isdir(root):
            found += [d for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "config.json"))]
    return found


_MODEL_INPUTS = {
    "model": ("MODEL", {"tooltip": "the model to inspect or unlearn from (e.g. Load Checkpoint's MODEL); it is never "
                                   "modified"}),
    "clip": ("CLIP", {"tooltip": "the checkpoint's text encoder (Load Checkpoint's CLIP)"}),
    "vae": ("VAE", {"tooltip": "the checkpoint's VAE (Load Checkpoint's VAE)"}),
}
_RESOLUTION = _ranged("INT", "resolution", 0, "image size the concept neurons are measured and trained at; 0 = the "
                      "model's native size (SD1.x 512, SD2.x 768, SDXL 1024). Lower it when memory is short", step=64)
# Not named "seed": the front-end gives every input of that name a randomize-after-queue control, and a changed seed
# means training again instead of reusing the saved delta.
_SEED = _ranged("INT", "seed", 0, "seed of the generated images and of training; it stays as set between queues, so the "
                "same inputs reuse the saved delta")
_XI = _ranged("FLOAT", "xi", 2.0, "z-score threshold: an output row is a concept neuron when its saliency is more than xi "
              "standard deviations above the mean of its projection type (paper: 2.0). Higher = fewer neurons", step=0.1)


class TrustConceptSaliency:
    DESCRIPTION = (
        "Finds the concept neurons: the rows of the cross-attention Q/K/V projections whose gradient of the CLIP "
        "score (image vs. concept) stands out (z-score above xi). Shows them as a heatmap per layer. Feed the "
        "result to TRUST Unlearn to start from these neurons."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONCEPT_NEURONS", "IMAGE", "STRING")
    RETURN_NAMES = ("concept_neurons", "heatmap", "summary")
    OUTPUT_TOOLTIPS = ("the concept neurons (a mask per layer) for TRUST Unlearn",
                       "layers x Q/K/V: concept neurons per block and their max z-score",
                       "a one-paragraph summary")
    FUNCTION = "find"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_MODEL_INPUTS,
                "concept": ("STRING", {"default": "", "multiline": False, "tooltip":
                                       "what to look for, in plain words (e.g. 'nudity', 'a cat', 'red circle')"}),
                "xi": _XI,
                "saliency_seed": _SEED,
                "steps": _ranged("INT", "saliency_steps", 10, "sampling steps of the images the saliency is measured on"),
                "images": _ranged("INT", "saliency_images", 4, "images per estimate; more = steadier neurons, slower"),
            },
            "optional": {
                "anchor": ("STRING", {"default": "", "tooltip": "what the concept should become (noise-contrast mode "
                                                                "compares with it); empty = the unconditional prompt"}),
                "aligner": ("CONCEPT_ALIGNER", {"tooltip": "a CLIP from Load Concept Aligner; without one the node "
                                                           "uses noise-contrast saliency"}),
                "resolution": _RESOLUTION,
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, concept=None):  # no **kwargs: ComfyUI then still checks every other input's min/max
        if isinstance(concept, str) and not concept.strip():
            return "concept is empty: type what to look for, e.g. 'a cat'"
        return True

    def find(self, model, clip, vae, concept, xi, saliency_seed, steps, images, anchor="", aligner=None,
             resolution=0, unique_id=None):
        ranges.check_inputs({"xi": xi, "saliency_seed": saliency_seed, "steps": steps, "images": images,
                             "resolution": resolution}, _SALIENCY_NAMES)

        def work():
            expanded = concept_specs.expand(concept, "individual")
            family = host.model_family(model)
            progress = host.HostProgress(unique_id, 0, steps)
            with host.comfy_parts(model, clip, vae, resolution, need_decoder=aligner is not None) as parts, \
                    host.aligner_on_device(aligner):
                config = SaliencyConfig(xi=xi, steps=steps, images=images)
                # ComfyUI runs nodes under inference mode: the private tree and its probes must be normal tensors
                with torch.inference_mode(False), torch.enable_grad():
                    deltas = SiteDeltas(parts.unet, find_sites(parts.unet))
                    result = estimate(parts, deltas, list(expanded.forget), config, aligner, anchor or "",
                                      torch.Generator().manual_seed(saliency_seed), job.default_cfg(family), progress)
                return ConceptNeurons(concept, _detach(result), fingerprint(deltas.base))

        neurons = _run("measuring saliency", resolution, work)
        mode = "CLIP score" if neurons.result.mode == "clip" else "noise contrast (no aligner connected)"
        summary = f"{concept!r}: {neurons.result.summary()}\nsaliency: {mode}; xi {xi}"
        heat = saliency_heatmap(neurons.result, f"concept neurons of {concept!r}")
        return {"ui": {"images": _preview(heat, "trust_saliency"), "text": [summary]},
                "result": (neurons, _image(heat), summary)}


def _detach(result: SaliencyResult) -> SaliencyResult:
    cpu = {k: v.detach().cpu() for k, v in result.mask.items()}
    return dataclasses.replace(result, mask=cpu, scores={k: v.detach().cpu() for k, v in result.scores.items()},
                               z={k: v.detach().cpu() for k, v in result.z.items()}, images=None)


def _preview(array: np.ndarray, prefix: str) -> list[dict]:
    """Save a PNG to ComfyUI's temp folder and describe it the way PreviewImage does, so the node shows it."""
    try:
        import folder_paths
        from PIL import Image
    except ImportError:
        return []
    folder = folder_paths.get_temp_directory()
    full, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder, array.shape[1], array.shape[0])
    os.makedirs(full, exist_ok=True)
    file = f"{name}_{counter:05}_.png"
    Image.fromarray(array).save(os.path.join(full, file))
    return [{"filename": file, "subfolder": subfolder, "type": "temp"}]


class TrustUnlearn:
    DESCRIPTION = (
        "Erases concepts from the model by fine-tuning only their concept neurons (TRuST), re-finding them as "
        "training moves them. Returns a patched copy of the MODEL (the input stays as it was) and saves a small "
        "LoRA file to models/unlearned_deltas/ that any LoRA loader applies. Same inputs on the same model reuse "
        "that file instead of training again."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "UNLEARNED_DELTA", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "delta", "curves", "report")
    OUTPUT_TOOLTIPS = ("a patched copy of the model without the concept", "the change, for Apply Unlearned Delta",
                       "loss and forget score per step", "what was erased, kept, changed and measured")
    FUNCTION = "unlearn"
    OUTPUT_NODE = True  # it writes the delta file, so it runs even when nothing downstream is connected

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_MODEL_INPUTS,
                "concepts": ("STRING", {"default": "", "multiline": True, "tooltip":
                                        "what to erase, one concept per line ('nudity', 'red circle', "
                                        "'cat on the table')"}),
                "mode": (MODES, {"default": MODES[0], "tooltip":
                                 "individual: erase the concept everywhere. combination: erase only the combination "
                                 "('red circle') and keep its parts ('a circle', 'a red object'). conditional: erase "
                                 "only the composition ('cat on the table') and keep each side"}),
                "loss": ([c.upper() for c in ranges.RANGES["loss"].choices], {"default": "CIP", "tooltip":
                                          "CIP (hard): pushes the concept neurons' weights towards zero. CSR (soft): "
                                          "makes the prediction insensitive to them; gentler, slower per step"}),
                "steps": _ranged("INT", "steps", 60, "fine-tuning steps; an early stop may end sooner when an aligner "
                                 "is connected"),
                "learning_rate": _ranged("FLOAT", "learning_rate", 0.0, "absolute learning rate of the "
                                         "concept-neuron rows (each masked weight moves about this much per step); 0 = "
                                         "use relative_lr, which scales with the model's weights", step=1e-4,
                                         round=False),
                "beta": _ranged("FLOAT", "beta", 0.0, "weight of the CIP/CSR term; 0 = the loss's default (CIP 0.1, "
                                "CSR 0.02)", step=0.01),
                "xi": _XI,
                "mask_refresh": _ranged("INT", "mask_every", 1, "re-find the concept neurons every this many steps "
                                        "(paper: every step); 0 = never (keep the first mask)"),
                "training_seed": _SEED,
                "file_name": ("STRING", {"default": "", "tooltip":
                                         "name of the delta file in models/unlearned_deltas/ (also listed by LoRA "
                                         "loaders); empty = from the concept. An existing different file is never "
                                         "overwritten: a number is added"}),
            },
            "optional": {
                "preserve": ("STRING", {"default": "", "multiline": True, "tooltip":
                                        "prompts that must keep working, one per line (the parts of a combination "
                                        "or conditional concept are kept anyway)"}),
                "concept_neurons": ("CONCEPT_NEURONS", {"tooltip": "from Concept Saliency: used for the first step"}),
                "aligner": ("CONCEPT_ALIGNER", {"tooltip": "a CLIP from Load Concept Aligner: CLIP-score saliency and "
                                                           "an early stop; without it, noise-contrast saliency"}),
                "resolution": _RESOLUTION,
                # optional and last, so workflows saved before it existed keep their widget values in place
                "training_images": _ranged("INT", "forget_images", 32, "images the model first generates of the "
                                           "concepts to learn from (the forget set); twice as many are generated of "
                                           "what to keep. Fewer = a faster start and a rougher erasure"),
                # optional and last: workflows saved before it hold an absolute learning_rate and keep its meaning
                "relative_lr": _ranged("FLOAT", "relative_lr", 0.1, "learning rate as a fraction of each layer's weight "
                                       "size (RMS), used when learning_rate is 0: the same value moves rows by about the "
                                       "same fraction on SD1.5, SDXL or the testbed. The report prints the change per "
                                       "step", step=0.01),
                # optional and last (saved workflows keep their widget values in place): the other erasers
                "method": (list(METHOD_NAMES), {"default": "trust", "tooltip": _METHOD_TOOLTIP}),
                "method_settings": ("STRING", {"default": "", "multiline": True, "tooltip":
                                               "the chosen method's settings, key=value, one per line or "
                                               "comma-separated (e.g. 'iterations=200, lr=1e-4' for esd; for TRuST "
                                               "the ones without an input above, e.g. 'row_budget=0.15, "
                                               "preserve_projection=0.99'); empty = the defaults. The report lists "
                                               "every setting used"}),
                # optional and last: saved workflows lack it and keep meaning "none", the expansion they had
                "concept_type": (CONCEPT_TYPES, {"default": concept_specs.NO_CONCEPT_TYPE,
                                                 "tooltip": _CONCEPT_TYPE_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, concepts=None):  # no **kwargs: ComfyUI then still checks every other input's min/max
        if isinstance(concepts, str) and not concepts.strip():
            return "concepts is empty: type what to erase, one concept per line"
        return True

    def unlearn(self, model, clip, vae, concepts, mode, loss, steps, learning_rate, beta, xi, mask_refresh,
                training_seed, file_name, preserve="", concept_neurons=None, aligner=None, resolution=0,
                training_images=32, relative_lr=0.1, method="trust", method_settings="",
                concept_type=concept_specs.NO_CONCEPT_TYPE, unique_id=None):
        ranges.check_inputs({"mode": mode, "loss": str(loss).lower(), "steps": steps, "learning_rate": learning_rate,
                             "beta": beta, "xi": xi, "mask_refresh": mask_refresh, "training_seed": training_seed,
                             "resolution": resolution, "training_images": training_images,
                             "relative_lr": relative_lr}, _TABLE_NAMES)
        config = job.method_config(method, method_settings, training_seed)  # None for TRuST
        expanded = _run("reading the concepts", resolution,
                        lambda: concept_specs.expand_all(concepts, mode, preserve=preserve,
                                                         concept_type=concept_type))
        family = _run("checking the model", resolution, lambda: host.model_family(model))
        if config is None:
            config = job.build_config(loss, steps, learning_rate, relative_lr, beta, xi, mask_refresh, training_seed,
                                      training_images, method_settings)
        base = _run("reading the model", resolution, lambda: host.effective_site_weights(model))
        base_fp = fingerprint(base)
        if concept_neurons is not None and concept_neurons.base_fingerprint != base_fp:
            raise ValueError("the concept_neurons input was measured on another model: connect the same MODEL to "
                             "Concept Saliency and TRUST Unlearn")
        if method != "trust":
            concept_neurons = aligner = None  # TRuST's inputs: the other methods do not read them
        key = job.cache_key(expanded, config, resolution, job.aligner_id(aligner),
                            job.mask_digest(concept_neurons.result.mask if concept_neurons is not None else None),
                            base_fp, method)
        folder = host.delta_dir()
        found = job.find_cached(folder, key)
        lines = [e.explain() for e in expanded]
        if found:
            delta = Delta.load(found)
            lines.insert(0, f"Reused {os.path.basename(found)}: same inputs on the same base model, so nothing was "
                            f"retrained. Delete the file (models/{host.DELTA_FOLDER}/) to train again.")
            path = found
        else:
            if method == "trust":
                progress = host.HostProgress(unique_id, config.forget_images + config.preserve_images, config.steps)
            else:
                progress = host.HostProgress(unique_id, 0, 0, by_stage=True)

            def work():
                with host.comfy_parts(model, clip, vae, resolution, need_decoder=aligner is not None) as parts, \
                        host.aligner_on_device(aligner):
                    initial = concept_neurons.result.mask if concept_neurons is not None else None
                    return methods.run(method, parts, expanded, config, progress, aligner=aligner,
                                       default_cfg=job.default_cfg(family), initial_mask=initial,
                                       metadata={"mode": mode, "model": parts.name, "cache_key": key,
                                                 "host": "ComfyUI", SKETCH_KEY: sketch(base)})

            delta = _run("unlearning", resolution, work)
            path = job.save(delta, folder, file_name or job.slug(expanded[0].text, method))
            lines.insert(0, f"Saved {os.path.basename(path)} in models/{host.DELTA_FOLDER}/ (LoRA loaders list it).")
            lines.append(methods.report(delta))
            if method == "trust":
                lines.append(job.saliency_line(delta.metadata.get("saliency_mode", ""),
                                               "connect Load Concept Aligner"))
            else:
                lines.append(f"settings: {delta.metadata.get('config', '')}")
        history = json.loads(delta.metadata.get("history", "[]"))
        lines.append(job.share_line(delta, model.model.diffusion_model))
        patched = _patched(model, delta, 1.0)
        report = "\n".join(lines)
        title = f"TRUST Unlearn ({loss if method == 'trust' else method})"
        curves = training_curves(history, f"{title}: {', '.join(e.text for e in expanded)}")
        return {"ui": {"text": [report]}, "result": (patched, UnlearnedDelta(delta, path), _image(curves), report)}


def _patched(model, delta: Delta, strength: float):
    """model.clone() with the delta added through ComfyUI's own LoRA path (what LoraLoaderModelOnly does)."""
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, delta.to_lora(), strength, 0)
    return patched


class TrustApplyDelta:
    DESCRIPTION = (
        "Applies an unlearned delta (from TRUST Unlearn, or a shared .safetensors file in models/unlearned_deltas/) "
        "to a MODEL with a strength. Warns when the delta was made for another base model."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("a patched copy of the model", "what the delta erases, and any warning")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the model to patch; it is never modified"}),
                "delta_file": ([NO_FILE] + _delta_files(), {"tooltip":
                               "a delta file in models/unlearned_deltas/ (ignored when the delta input is connected)"}),
                "strength": _ranged("FLOAT", "strength", 1.0, "1 = as trained; lower = partly erased; 0 = no change",
                                    step=0.05),
            },
            "optional": {"delta": ("UNLEARNED_DELTA", {"tooltip": "the delta output of TRUST Unlearn"})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, model=None, delta_file=NO_FILE, strength=1.0, delta=None, unique_id=None):
        path = _delta_path(delta_file)
        return f"{path}:{os.path.getmtime(path)}" if path and os.path.exists(path) else delta_file

    def apply(self, model, delta_file, strength, delta=None, unique_id=None):
        ranges.check_inputs({"strength": strength})
        if delta is not None:
            loaded, source = delta.delta, os.path.basename(delta.path) or "the delta input"
        elif delta_file != NO_FILE:
            path = _delta_path(delta_file)
            loaded = _run("reading the delta", 0, lambda: Delta.load(path))
            source = delta_file
        else:
            raise ValueError("no delta: connect TRUST Unlearn's delta output or choose a delta_file")
        unet = model.model.diffusion_model
        shapes = {s.name: (s.out_features, s.in_features) for s in find_sites(unet)}
        wrong = [n for n, d in loaded.sites.items() if shapes.get(n) != (d.out_features, d.in_features)]
        if wrong:
            raise ValueError(f"{source} does not fit this model's architecture (e.g. layer {wrong[0]}): it was made "
                             f"for another model family. Use it with the kind of model it was trained on.")
        lines = [f"{source}: erases {loaded.metadata.get('concepts', '?')} ({loaded.metadata.get('modes', '?')}), "
                 f"{loaded.metadata.get('loss', '?').upper()}, {sum(d.rank for d in loaded.sites.values())} rows, "
                 f"strength {strength}"]
        weights = host.effective_site_weights(model) if loaded.base_fingerprint else {}
        check = compare_base(loaded.base_fingerprint, loaded.metadata, fingerprint(weights) if weights else "",
                             weights)
        if check.close:
            lines.append(f"Note: this model is {check.close_note()}. Applied.")
        elif not check.exact:
            warning = ("WARNING: this delta was made for another base model (fingerprint "
                       f"{loaded.base_fingerprint[:12]}).{check.mismatch_detail()} It is applied anyway, but it may "
                       "not erase the concept and may damage other content; retrain on this model for a reliable "
                       "result.")
            log.warning("TRuST: %s: %s", source, warning)
            host.send_event({"node": unique_id, "warning": warning, "source": source})
            lines.append(warning)
        info = "\n".join(lines)
        return {"ui": {"text": [info]}, "result": (_patched(model, loaded, strength), info)}


def _delta_files() -> list[str]:
    try:
        import folder_paths

        return [f for f in folder_paths.get_filename_list(host.DELTA_FOLDER) if f.endswith(".safetensors")]
    except (ImportError, KeyError):
        return []


def _delta_path(name: str) -> str | None:
    if name == NO_FILE:
        return None
    import folder_paths

    path = folder_paths.get_full_path(host.DELTA_FOLDER, name)
    if path is None:
        raise ValueError(f"delta file {name!r} not found in models/{host.DELTA_FOLDER}/ (press R to refresh lists)")
    return path


class TrustBeforeAfterGrid:
    DESCRIPTION = "Puts the images of the original and the unlearned model side by side, one labelled row each."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("one image: the before row above the after row",)
    FUNCTION = "grid"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "before": ("IMAGE", {"tooltip": "images of the original model"}),
                "after": ("IMAGE", {"tooltip": "the same prompts and seeds on the unlearned model"}),
                "label_before": ("STRING", {"default": "before", "tooltip": "label of the first row"}),
                "label_after": ("STRING", {"default": "after", "tooltip": "label of the second row"}),
                "cell": _ranged("INT", "cell", 256, "size of each tile", step=32),
            }
        }

    def grid(self, before, after, label_before, label_after, cell):
        ranges.check_inputs({"cell": cell})
        sheet = labelled_grid([(label_before, before.cpu().numpy()), (label_after, after.cpu().numpy())], cell)
        return (_image(sheet),)


NODE_CLASS_MAPPINGS = {
    "TrustConceptSaliency": TrustConceptSaliency,
    "TrustUnlearn": TrustUnlearn,
    "TrustApplyDelta": TrustApplyDelta,
    "TrustLoadAligner": TrustLoadAligner,
    "TrustBeforeAfterGrid": TrustBeforeAfterGrid,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TrustConceptSaliency": "Concept Saliency",
    "TrustUnlearn": "TRUST Unlearn",
    "TrustApplyDelta": "Apply Unlearned Delta",
    "TrustLoadAligner": "Load Concept Aligner",
    "TrustBeforeAfterGrid": "Before/After Grid",
}
