"""Builds the example workflows (ComfyUI UI format, in workflows/) from short graph descriptions, and draws a
picture of each graph for the README (docs/workflows/*.png). Run: python tools/workflows.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

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
            node["size"][1] = 30 + 22 * rows
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


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
            "pos": ("CLIPTextEncode", [400, 560], {"text": prompt}, "Prompt (shows the concept)"),
            "neg": ("CLIPTextEncode", [400, 720], {"text": "blurry, low quality"}, "Negative"),
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
            "pos": ("CLIPTextEncode", [400, 300], {"text": "a photo of a cat sitting on a sofa"}, "Prompt"),
            "neg": ("CLIPTextEncode", [400, 460], {"text": "blurry, low quality"}, "Negative"),
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
            "heat": ("PreviewImage", [400, 460], {}, "Heatmap"),
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

COLOURS = {"MODEL": (180, 140, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110), "CONDITIONING": (255, 160, 60),
           "LATENT": (255, 130, 200), "IMAGE": (100, 180, 255), "CONCEPT_NEURONS": (120, 230, 160),
           "UNLEARNED_DELTA": (120, 230, 230), "CONCEPT_ALIGNER": (230, 230, 120)}


def render(workflow: dict, path: Path, table: dict) -> None:
    """A picture of the graph: nodes as boxes with title, sockets and widget values; links as coloured lines."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    display = sys.modules["trust_pack"].NODE_DISPLAY_NAME_MAPPINGS
    xs = [n["pos"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()]
    x0, y0 = min(xs) - 20, min(ys) - 20
    width = int(max(n["pos"][0] + n["size"][0] for n in nodes.values()) - x0 + 20)
    height = int(max(n["pos"][1] + n["size"][1] for n in nodes.values()) - y0 + 20)
    image = Image.new("RGB", (width, height), (32, 32, 36))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def socket(node, index, out):
        x = node["pos"][0] - x0 + (node["size"][0] if out else 0)
        return x, node["pos"][1] - y0 + 30 + 22 * index + 8

    for _, src, out_i, dst, in_i, kind in workflow["links"]:
        (ax, ay), (bx, by) = socket(nodes[src], out_i, True), socket(nodes[dst], in_i, False)
        mid = (ax + bx) / 2
        draw.line([(ax, ay), (mid, ay), (mid, by), (bx, by)], fill=COLOURS.get(kind, (200, 200, 200)), width=2)
    for n in nodes.values():
        x, y = n["pos"][0] - x0, n["pos"][1] - y0
        w, h = n["size"]
        note = n["type"] == "Note"
        draw.rounded_rectangle([x, y, x + w, y + h], 6, fill=(85, 68, 34) if note else (53, 53, 58),
                               outline=(90, 90, 96))
        draw.rectangle([x, y, x + w, y + 22], fill=(100, 80, 40) if note else (70, 70, 76))
        draw.text((x + 8, y + 5), n.get("title", display.get(n["type"], n["type"])), fill=(235, 235, 235), font=font)
        if note:
            text = n["widgets_values"][0]
            lines, line = [], ""
            for word in text.replace("\n", " \n ").split(" "):
                if word == "\n" or len(line) + len(word) > 60:
                    lines.append(line)
                    line = "" if word == "\n" else word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            for i, line in enumerate(lines[: int((h - 30) / 12)]):
                draw.text((x + 8, y + 28 + 12 * i), line, fill=(230, 220, 200), font=font)
            continue
        for i, s in enumerate(n["inputs"]):
            cx, cy = socket(n, i, False)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=COLOURS.get(s["type"], (200, 200, 200)))
            draw.text((cx + 8, cy - 6), s["name"], fill=(200, 200, 200), font=font)
        for i, s in enumerate(n["outputs"]):
            cx, cy = socket(n, i, True)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=COLOURS.get(s["type"], (200, 200, 200)))
            draw.text((cx - 8 - 6 * len(s["name"]), cy - 6), s["name"], fill=(200, 200, 200), font=font)
        top = y + 30 + 22 * max(len(n["inputs"]), len(n["outputs"]))
        names = [w if w != "+control" else "control after generate" for w in table[n["type"]][2]]
        for i, (name, value) in enumerate(zip(names, n["widgets_values"])):
            shown = f"{name}: {value}".replace("\n", " / ")
            draw.rounded_rectangle([x + 8, top + 22 * i, x + w - 8, top + 22 * i + 18], 4, fill=(34, 34, 38))
            draw.text((x + 14, top + 22 * i + 4), shown[:48], fill=(210, 210, 210), font=font)
    image.save(path)


def main() -> None:
    table = {**STOCK, **pack_nodes()}
    out = ROOT / "workflows"
    pictures = ROOT / "docs" / "workflows"
    out.mkdir(exist_ok=True)
    pictures.mkdir(parents=True, exist_ok=True)
    for name, description in WORKFLOWS.items():
        workflow = build(description, table)
        (out / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        render(workflow, pictures / f"{name}.png", table)
        print(f"wrote workflows/{name}.json and docs/workflows/{name}.png")


if __name__ == "__main__":
    main()
