"""Builds the example workflows (ComfyUI UI format, in example_workflows/) from short graph descriptions and the
nodes' INPUT_TYPES. Run: python tools/workflows.py (pictures of them: tools/screenshots.py, in a real ComfyUI).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"

# Stock nodes: (sockets in, sockets out, widget names in order). "+control" marks the seed's control widget.
STOCK = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], ["ckpt_name"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], ["text"]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")],
                 ["seed", "+control", "steps", "cfg", "sampler_name", "scheduler", "denoise"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], []),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "LoraLoaderModelOnly": ([("model", "MODEL")], [("MODEL", "MODEL")], ["lora_name", "strength_model"]),
    "CheckpointSave": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")], [], ["filename_prefix"]),
    "Note": ([], [], ["text"]),
}


def _pack():
    """The pack's node module, with the pack root imported as a package whatever its folder is called."""
    import importlib.util

    name = "trust_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name + ".nodes.trust_nodes"]


def pack_nodes() -> dict:
    """Our nodes' sockets and widgets, read from their INPUT_TYPES (so workflows follow the code)."""
    pack = _pack()
    sockets_only = {"MODEL", "CLIP", "VAE", "IMAGE", "CONCEPT_NEURONS", "CONCEPT_ALIGNER", "UNLEARNED_DELTA"}
    table = {}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        inputs, widgets = [], []
        for group in ("required", "optional"):
            for input_name, (kind, *_) in spec.get(group, {}).items():
                if isinstance(kind, str) and kind in sockets_only:
                    inputs.append((input_name, kind))
                else:
                    widgets.append(input_name)
        outputs = list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))
        table[name] = (inputs, outputs, widgets)
    return table


def build(description: dict, table: dict) -> dict:
    """UI-format workflow from {"nodes": {key: (type, [x, y], {widget: value}, title?)}, "links": [...]}.
    A link is (from_key, output_index, to_key, input_name)."""
    ids = {key: i + 1 for i, key in enumerate(description["nodes"])}
    nodes, links = [], []
    sockets: dict[int, dict] = {}
    for key, (kind, pos, values, *title) in description["nodes"].items():
        ins, outs, widgets = table[kind]
        widget_values = []
        for w in widgets:
            if w == "+control":
                widget_values.append("fixed")
            else:
                widget_values.append(values[w] if w in values else _default(kind, w))
        node = {
            "id": ids[key], "type": kind, "pos": pos, "size": [320 if kind != "Note" else 400, 0], "flags": {},
            "order": ids[key] - 1, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in ins],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outs)],
            "properties": {"Node name for S&R": kind}, "widgets_values": widget_values,
        }
        if title:
            node["title"] = title[0]
        if kind == "Note":
            node["color"], node["bgcolor"] = "#432", "#653"
            node["size"] = [400, 180]
        nodes.append(node)
        sockets[ids[key]] = node
    for link_id, (src, out_index, dst, input_name) in enumerate(description["links"], start=1):
        a, b = sockets[ids[src]], sockets[ids[dst]]
        slot = next(i for i, s in enumerate(b["inputs"]) if s["name"] == input_name)
        kind = a["outputs"][out_index]["type"]
        a["outputs"][out_index]["links"].append(link_id)
        b["inputs"][slot]["link"] = link_id
        links.append([link_id, ids[src], out_index, ids[dst], slot, kind])
    for node in nodes:  # a node's height follows its sockets and widgets, as the front-end would size it
        if node["type"] != "Note":
            rows = max(len(node["inputs"]), len(node["outputs"])) + len(node["widgets_values"])
            node["size"][1] = max(30 + 22 * rows, FRONTEND_HEIGHT.get(node["type"], 0))
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


# Heights ComfyUI's front-end (1.27.10) gives our nodes at width 320: multiline text boxes, the report box and the
# chart row of web/trust.js. The layouts below leave that room; tier 3 checks that no node overlaps another.
FRONTEND_HEIGHT = {"TrustUnlearn": 600, "TrustConceptSaliency": 320, "TrustApplyDelta": 220}

DEFAULTS = {
    ("EmptyLatentImage", "width"): 512, ("EmptyLatentImage", "height"): 512, ("EmptyLatentImage", "batch_size"): 4,
    ("KSampler", "seed"): 42, ("KSampler", "steps"): 20, ("KSampler", "cfg"): 7.0,
    ("KSampler", "sampler_name"): "euler", ("KSampler", "scheduler"): "normal", ("KSampler", "denoise"): 1.0,
    ("CheckpointLoaderSimple", "ckpt_name"): CHECKPOINT, ("SaveImage", "filename_prefix"): "trust",
    ("LoraLoaderModelOnly", "strength_model"): 1.0,
}


def _default(kind: str, widget: str):
    if (kind, widget) in DEFAULTS:
        return DEFAULTS[(kind, widget)]
    spec = _pack().NODE_CLASS_MAPPINGS[kind].INPUT_TYPES()
    for group in ("required", "optional"):
        if widget in spec.get(group, {}):
            kind_spec, *options = spec[group][widget]
            if isinstance(kind_spec, list):
                return (options[0] if options else {}).get("default", kind_spec[0] if kind_spec else "")
            return (options[0] if options else {}).get("default", "")
    raise KeyError(f"{kind}.{widget} has no default")


def erase_and_compare(concept: str, mode: str, prompt: str, note: str, preserve: str = "") -> dict:
    """Load Checkpoint -> TRUST Unlearn; the same prompt and seed sampled before and after; a labelled grid."""
    return {
        "nodes": {
            "note": ("Note", [20, -230], {"text": note}),
            "ckpt": ("CheckpointLoaderSimple", [20, 60], {}),
            "unlearn": ("TrustUnlearn", [400, 60], {"concepts": concept, "mode": mode, "preserve": preserve}),
            "pos": ("CLIPTextEncode", [400, 720], {"text": prompt}, "Prompt (shows the concept)"),
            "neg": ("CLIPTextEncode", [400, 880], {"text": "blurry, low quality"}, "Negative"),
            "latent": ("EmptyLatentImage", [20, 380], {}),
            "before": ("KSampler", [780, 60], {}, "KSampler (original model)"),
            "after": ("KSampler", [780, 400], {}, "KSampler (unlearned model)"),
            "dec1": ("VAEDecode", [1140, 60], {}),
            "dec2": ("VAEDecode", [1140, 220], {}),
            "grid": ("TrustBeforeAfterGrid", [1140, 360], {}),
            "save": ("SaveImage", [1480, 60], {"filename_prefix": "trust_before_after"}),
            "curves": ("PreviewImage", [1480, 420], {}, "Loss and forget score"),
        },
        "links": [
            ("ckpt", 0, "unlearn", "model"), ("ckpt", 1, "unlearn", "clip"), ("ckpt", 2, "unlearn", "vae"),
            ("ckpt", 1, "pos", "clip"), ("ckpt", 1, "neg", "clip"),
            ("ckpt", 0, "before", "model"), ("pos", 0, "before", "positive"), ("neg", 0, "before", "negative"),
            ("latent", 0, "before", "latent_image"),
            ("unlearn", 0, "after", "model"), ("pos", 0, "after", "positive"), ("neg", 0, "after", "negative"),
            ("latent", 0, "after", "latent_image"),
            ("before", 0, "dec1", "samples"), ("ckpt", 2, "dec1", "vae"),
            ("after", 0, "dec2", "samples"), ("ckpt", 2, "dec2", "vae"),
            ("dec1", 0, "grid", "before"), ("dec2", 0, "grid", "after"), ("grid", 0, "save", "images"),
            ("unlearn", 2, "curves", "images"),
        ],
    }


WORKFLOWS = {
    "erase_concept_before_after": erase_and_compare(
        "a cat", "individual", "a photo of a cat sitting on a sofa",
        "Erase a concept and compare.\n\n1. Pick your SD1.x/2.x/SDXL checkpoint in Load Checkpoint.\n2. Type the "
        "concept in TRUST Unlearn (one per line).\n3. Queue. The node trains for a few minutes on a GPU, saves a "
        "small LoRA file in models/unlearned_deltas/ and returns a patched copy of the model; the original is "
        "untouched.\n\nThe grid shows the same prompt and seed before (top) and after (bottom). Queue again with "
        "the same inputs: the saved file is reused instead of training again."),
    "erase_combination": erase_and_compare(
        "red car", "combination", "a red car parked in the street",
        "Combination: erase only 'red car'.\n\nMode 'combination' keeps the parts: cars of other colours and other "
        "red things still work (TRUST Unlearn trains on 'a car' and 'a red object' as preserve prompts; its report "
        "lists them). Try the prompts 'a blue car' and 'a red apple' after queueing to check.",
        "a blue car\na red apple"),
    "erase_conditional": erase_and_compare(
        "cat on the table", "conditional", "a cat on the table in a kitchen",
        "Conditional: erase 'cat on the table' but keep cats and tables.\n\nMode 'conditional' splits the concept "
        "at its relation ('on') and keeps each side ('a cat', 'the table') and the two in another relation ('a "
        "cat next to the table')."),
    "apply_shared_delta": {
        "nodes": {
            "note": ("Note", [20, -230], {"text":
                     "Apply a shared delta.\n\nPut a .safetensors delta someone shared into models/unlearned_deltas/ "
                     "(press R to refresh), choose it in Apply Unlearned Delta, set the strength. The node warns when "
                     "the delta was made for another base model. Stock Load LoRA nodes read the same file too."}),
            "ckpt": ("CheckpointLoaderSimple", [20, 60], {}),
            "apply": ("TrustApplyDelta", [400, 60], {}),
            "pos": ("CLIPTextEncode", [400, 340], {"text": "a photo of a cat sitting on a sofa"}, "Prompt"),
            "neg": ("CLIPTextEncode", [400, 500], {"text": "blurry, low quality"}, "Negative"),
            "latent": ("EmptyLatentImage", [20, 380], {}),
            "sampler": ("KSampler", [780, 60], {}),
            "dec": ("VAEDecode", [1140, 60], {}),
            "save": ("SaveImage", [1140, 200], {"filename_prefix": "trust_applied"}),
        },
        "links": [
            ("ckpt", 0, "apply", "model"), ("ckpt", 1, "pos", "clip"), ("ckpt", 1, "neg", "clip"),
            ("apply", 0, "sampler", "model"), ("pos", 0, "sampler", "positive"), ("neg", 0, "sampler", "negative"),
            ("latent", 0, "sampler", "latent_image"), ("sampler", 0, "dec", "samples"), ("ckpt", 2, "dec", "vae"),
            ("dec", 0, "save", "images"),
        ],
    },
    "bake_into_checkpoint": {
        "nodes": {
            "note": ("Note", [20, -230], {"text":
                     "Bake an erasure into a new checkpoint (for distributing a model rather than a delta).\n\n"
                     "TRUST Unlearn returns the patched model; ComfyUI's stock Save Checkpoint writes it with the "
                     "checkpoint's own CLIP and VAE to output/checkpoints/ (trust_erased_00001_.safetensors, ...). "
                     "The loaded checkpoint file is not changed. Move the new file to models/checkpoints/ to load it."}),
            "ckpt": ("CheckpointLoaderSimple", [20, 60], {}),
            "unlearn": ("TrustUnlearn", [400, 60], {"concepts": "a cat"}),
            "save": ("CheckpointSave", [780, 60], {"filename_prefix": "checkpoints/trust_erased"}),
            "curves": ("PreviewImage", [780, 260], {}, "Loss and forget score"),
        },
        "links": [
            ("ckpt", 0, "unlearn", "model"), ("ckpt", 1, "unlearn", "clip"), ("ckpt", 2, "unlearn", "vae"),
            ("unlearn", 0, "save", "model"), ("ckpt", 1, "save", "clip"), ("ckpt", 2, "save", "vae"),
            ("unlearn", 2, "curves", "images"),
        ],
    },
    "inspect_saliency": {
        "nodes": {
            "note": ("Note", [20, -230], {"text":
                     "Inspect concept neurons.\n\nConcept Saliency shows, per transformer block, how many Q/K/V rows "
                     "carry the concept (heatmap) and feeds them to TRUST Unlearn's first step. For CLIP-score "
                     "saliency (as in the paper) add Load Concept Aligner with a CLIP folder in "
                     "models/concept_aligners/ and connect it; without it the nodes use noise contrast."}),
            "ckpt": ("CheckpointLoaderSimple", [20, 60], {}),
            "saliency": ("TrustConceptSaliency", [400, 60], {"concept": "a cat"}),
            "unlearn": ("TrustUnlearn", [780, 60], {"concepts": "a cat"}),
            "heat": ("PreviewImage", [400, 900], {}, "Heatmap"),
            "curves": ("PreviewImage", [1140, 60], {}, "Loss and forget score"),
        },
        "links": [
            ("ckpt", 0, "saliency", "model"), ("ckpt", 1, "saliency", "clip"), ("ckpt", 2, "saliency", "vae"),
            ("ckpt", 0, "unlearn", "model"), ("ckpt", 1, "unlearn", "clip"), ("ckpt", 2, "unlearn", "vae"),
            ("saliency", 0, "unlearn", "concept_neurons"), ("saliency", 1, "heat", "images"),
            ("unlearn", 2, "curves", "images"),
        ],
    },
}

def main() -> None:
    table = {**STOCK, **pack_nodes()}
    out = ROOT / "example_workflows"
    out.mkdir(exist_ok=True)
    for name, description in WORKFLOWS.items():
        (out / f"{name}.json").write_text(json.dumps(build(description, table), indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json")


if __name__ == "__main__":
    main()
