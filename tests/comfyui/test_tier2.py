"""Tier 2 in a real ComfyUI (see conftest.py): the pack loads through ComfyUI's own loader; the patched MODEL
differs from the base only at cross-attention sites; the base MODEL is bit-identical after a run, an
interruption and an exception; the stock LoraLoaderModelOnly reading the saved file gives base + the engine's own
reading of that file (SD1.5- and SDXL-shaped checkpoints, and every method's file on SD1.5), as does the node's
MODEL; a delta for another base warns; every example workflow executes through ComfyUI's executor."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .tier2_support import CHECKPOINT, CHECKPOINT_SDXL, REPO
from .workflow_api import set_inputs, ui_to_api

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
FAST = {"steps": 2, "resolution": 64, "training_images": 4}  # a CPU-sized run of every graph


def base_graph(extra: dict, checkpoint: str = CHECKPOINT) -> dict:
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    graph.update(extra)
    return graph


def unlearn_node(concept: str, file_name: str, **overrides) -> dict:
    inputs = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "concepts": concept,
              "mode": "individual", "loss": "CIP", "steps": 2, "learning_rate": 0.005, "beta": 0.0, "xi": 2.0,
              "mask_refresh": 1, "training_seed": 0, "file_name": file_name, "preserve": "", "resolution": 64,
              "training_images": 4}
    inputs.update(overrides)
    return {"class_type": "TrustUnlearn", "inputs": inputs}


def probe(model, label: str, reference=None, after=None) -> dict:
    inputs = {"model": model, "label": label}
    if reference:
        inputs["reference"] = reference
    if after:
        inputs["after"] = after
    return {"class_type": "TrustProbeWeights", "inputs": inputs}


def outputs(entry: dict, label: str) -> dict:
    for out in entry["outputs"].values():
        if out.get("label") == [label]:
            return out
    raise KeyError(f"no probe labelled {label!r} in {list(entry['outputs'])}")


@pytest.fixture(scope="module")
def base_digest(comfy):
    entry = comfy.run(base_graph({"p": probe(["ckpt", 0], "base")}))
    return outputs(entry, "base")["digest"][0]


def test_the_pack_loads_through_comfyuis_own_loader(comfy):
    info = comfy.object_info()
    names = {k: info[k]["display_name"] for k in ("TrustConceptSaliency", "TrustUnlearn", "TrustApplyDelta",
                                                   "TrustLoadAligner", "TrustBeforeAfterGrid")}
    assert names["TrustConceptSaliency"] == "Concept Saliency"
    assert names["TrustUnlearn"] == "TRUST Unlearn" and names["TrustApplyDelta"] == "Apply Unlearned Delta"
    assert all(info[k]["category"] == "unlearning/TRuST" for k in names)
    failed = [line for line in comfy.log.read_text().splitlines()
              if "trust_unlearning" in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failed, failed


def test_patched_model_differs_only_at_cross_attention_and_base_stays_identical(comfy, base_digest):
    entry = comfy.run(base_graph({
        "u": unlearn_node("a cat", "tier2_cat"),
        "diff": probe(["u", 0], "patched", reference=["ckpt", 0]),
        "after": probe(["ckpt", 0], "base after", after=["u", 3]),
    }))
    changed = outputs(entry, "patched")["changed"]
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k or ".attn2.to_q." in k for k in changed)
    assert outputs(entry, "base after")["digest"][0] == base_digest


def _ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of values.dtype at each element's magnitude (as float32): one rounding step of that dtype."""
    info = torch.finfo(values.dtype)
    _, exponent = torch.frexp(values.float())
    spacing = torch.ldexp(torch.full(values.shape, info.eps), exponent - 1)
    return spacing.clamp_min(info.smallest_normal * info.eps)  # subnormals: the fixed smallest step


def assert_base_plus_engine_delta(base: dict, patched: dict, delta, what: str) -> None:
    """patched == base + the delta's dense difference at every parameter the delta changes (row-sparse LoRA sites
    and `.diff` / `.diff_b` parameters alike), rounded to the model's dtype; every other key bit-identical to base."""
    assert set(patched) == set(base), f"{what}: not the same UNet keys as the base"
    diffs = delta.diffs()  # LDM parameter name -> full difference (sites as <site>.weight)
    assert diffs and set(diffs) <= set(base), f"{what}: delta keys not in the UNet: {sorted(set(diffs) - set(base))[:3]}"
    changed = {k for k in base if not torch.equal(base[k], patched[k])}
    assert changed <= set(diffs), f"{what}: keys changed that the delta does not change: {sorted(changed - set(diffs))[:3]}"
    for key, diff in diffs.items():
        w = base[key]
        expected = (w.float() + diff.float()).to(w.dtype)
        if not torch.equal(expected, w):
            assert key in changed, f"{what}: {key} is in the delta but the loaded model left it unchanged"
        error = (patched[key].float() - expected.float()).abs()
        worst = float((error - _ulp(expected)).max())
        assert worst <= 0, f"{what}: {key} is off base + delta by more than one {w.dtype} step ({float(error.max()):.3g})"


# Per method: method_settings that make a CPU-sized run (seconds on the tiny checkpoints) still change weights (only
# the file's layout and how stock loaders read it matter here), and the tensor kinds its file must hold: the exact
# row-sparse LoRA (TRuST), a dense `.diff` per site (ESD-x changes every attn2 row), `.diff` of other weights (UCE's
# K/V edit, FIA's and ConceptPrune's pruned ff.net.2 weights) and `.diff_b` of biases (SalUn).
METHOD_RUNS = {
    "trust": ("", {"lora_up.weight", "lora_down.weight", "alpha"}),
    "esd": ("iterations=2, ddim_steps=2, lr=1e-3", {"diff"}),
    "uce": ("", {"diff"}),
    "salun": ("forget_images=2, preserve_images=2, gen_steps=2, batch=2, lr=1e-3", {"diff", "diff_b"}),
    "fia": ("samples=2, steps=2, timesteps=1, batch=2", {"diff"}),
    "conceptprune": ("samples=2, steps=2, timesteps=1, batch=2", {"diff"}),
}
STOCK_CASES = [(CHECKPOINT, "trust"), (CHECKPOINT_SDXL, "trust")] + [(CHECKPOINT, m) for m in METHOD_RUNS if m != "trust"]


def _kind(key: str) -> str:
    """`lora_unet_x.lora_up.weight` -> `lora_up.weight`; `lora_unet_x.diff_b` -> `diff_b`."""
    parts = key.split(".")
    return ".".join(parts[1:])


@pytest.mark.parametrize("checkpoint,method", STOCK_CASES,
                         ids=[f"{'sdxl' if c == CHECKPOINT_SDXL else 'sd15'}-{m}" for c, m in STOCK_CASES])
def test_stock_lora_loader_gives_base_plus_the_engines_delta(comfy, checkpoint, method):
    """LoraLoaderModelOnly reading the saved file must give base + the delta as the engine reads that file (its own
    rows and differences, not ComfyUI's LoRA code); the node's MODEL too. For every method, so every tensor kind a
    delta file holds goes through the stock loader. Compared in this process from the weights the server samples
    with, saved by a probe node."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from trust_engine.delta import Delta

    kind = "sdxl" if checkpoint == CHECKPOINT_SDXL else "sd15"
    name = f"tier2_stock_{kind}" + ("" if method == "trust" else f"_{method}")
    settings, kinds = METHOD_RUNS[method]
    node = unlearn_node("a tiger", name, method=method, method_settings=settings)
    entry = comfy.run(base_graph({"u": node}, checkpoint))
    report = entry["outputs"]["u"]["text"][0]
    assert report.startswith(f"Saved {name}.safetensors "), report[:300]  # trained here, not reused
    path = Path(comfy.base_dir) / "models" / "unlearned_deltas" / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert {_kind(k) for k in f.keys()} == kinds, f"{method}: the file holds {sorted({_kind(k) for k in f.keys()})}"
    delta = Delta.load(path)
    assert delta.metadata.get("method", "trust") == method
    save = {"base": ["ckpt", 0], "stock": ["lora", 0], "node": ["u", 0]}
    graph = {"lora": {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": ["ckpt", 0], "lora_name": f"{name}.safetensors", "strength_model": 1.0}},
             "u": node}
    graph.update({f"save_{label}": {"class_type": "TrustProbeSaveWeights",
                                    "inputs": {"model": model, "file_name": f"{name}_{label}"}}
                  for label, model in save.items()})
    comfy.run(base_graph(graph, checkpoint))
    weights = {label: load_file(str(Path(comfy.base_dir) / "output" / f"{name}_{label}.safetensors"))
               for label in save}
    assert "lora key not loaded" not in comfy.log.read_text()
    assert_base_plus_engine_delta(weights["base"], weights["stock"], delta, f"{kind} {method} stock LoraLoaderModelOnly")
    assert_base_plus_engine_delta(weights["base"], weights["node"], delta, f"{kind} {method} TrustUnlearn MODEL")


def test_same_inputs_reuse_the_saved_delta(comfy):
    graph = base_graph({"u": unlearn_node("a dog", "tier2_dog"),
                        "p": probe(["u", 0], "reuse", reference=["ckpt", 0])})
    comfy.run(graph)
    graph["u"]["inputs"]["concepts"] = "a dog\n"  # a new prompt (ComfyUI's cache would skip an identical one)
    comfy.run(graph)
    assert "Reused tier2_dog.safetensors" in comfy.log.read_text() or _reused(comfy, "tier2_dog")


def _reused(comfy, name: str) -> bool:
    history = comfy._call("/history")
    texts = [t for entry in history.values() for out in entry.get("outputs", {}).values() for t in out.get("text", [])]
    return any(f"Reused {name}.safetensors" in t for t in texts)


def test_interruption_leaves_the_base_model_bit_identical(comfy, base_digest):
    prompt_id = comfy.queue(base_graph({"u": unlearn_node("a bird", "tier2_cut", steps=2000)}))
    started = time.time()
    while time.time() - started < 300:
        if "generating" in comfy.log.read_text() or _running(comfy, prompt_id):
            break
        time.sleep(0.5)
    time.sleep(3)
    comfy.interrupt()
    entry = comfy.wait(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    entry = comfy.run(base_graph({"p": probe(["ckpt", 0], "after interrupt")}))
    assert outputs(entry, "after interrupt")["digest"][0] == base_digest
    assert not (Path(comfy.base_dir) / "models" / "unlearned_deltas" / "tier2_cut.safetensors").exists()


def _running(comfy, prompt_id: str) -> bool:
    queue = comfy._call("/queue")
    return any(item[1] == prompt_id for item in queue.get("queue_running", []))


def test_an_exception_mid_run_leaves_the_base_model_bit_identical(comfy, base_digest):
    comfy.run({"arm": {"class_type": "TrustProbeFailNextRun", "inputs": {"armed": True}}})
    entry = comfy.wait(comfy.queue(base_graph({"u": unlearn_node("a fish", "tier2_fail")})))
    assert entry["status"]["status_str"] == "error"
    assert "injected failure" in json.dumps(entry["status"]["messages"])
    entry = comfy.run(base_graph({"p": probe(["ckpt", 0], "after failure")}))
    assert outputs(entry, "after failure")["digest"][0] == base_digest


def test_a_delta_for_another_base_model_warns(comfy):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from trust_engine.sketch import SKETCH_KEY
    from trust_engine.sketch import VERSION as SKETCH_VERSION

    comfy.run(base_graph({"u": unlearn_node("a horse", "tier2_horse")}))
    folder = Path(comfy.base_dir) / "models" / "unlearned_deltas"
    with safe_open(str(folder / "tier2_horse.safetensors"), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    metadata["base_fingerprint"] = "0" * 64  # as if made on other weights: the exact fingerprint differs,
    # and so does the sign sketch (the tolerant check would otherwise recognise the same base): its bits XOR random
    # bits, about half of them flipped, as for an unrelated model
    stored = metadata[SKETCH_KEY]
    assert stored.startswith(SKETCH_VERSION), stored[:10]
    packed = np.frombuffer(base64.b64decode(stored[len(SKETCH_VERSION):]), dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, packed.size, dtype=np.uint8)
    metadata[SKETCH_KEY] = SKETCH_VERSION + base64.b64encode((packed ^ noise).tobytes()).decode()
    save_file(tensors, str(folder / "tier2_foreign.safetensors"), metadata=metadata)
    entry = comfy.run(base_graph({
        "a": {"class_type": "TrustApplyDelta",
              "inputs": {"model": ["ckpt", 0], "delta_file": "tier2_foreign.safetensors", "strength": 1.0}},
        "p": probe(["a", 0], "foreign"),
    }))
    texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    assert any("another base model" in t for t in texts), texts


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_example_workflow_executes(comfy, path):
    info = comfy.object_info()
    prompt = ui_to_api(json.loads(path.read_text()), info)
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    set_inputs(prompt, "EmptyLatentImage", width=64, height=64, batch_size=1)
    set_inputs(prompt, "KSampler", steps=2)
    set_inputs(prompt, "TrustUnlearn", **FAST)
    set_inputs(prompt, "TrustConceptSaliency", steps=2, images=1, resolution=64)
    if any(n["class_type"] == "TrustApplyDelta" for n in prompt.values()):
        # a concept no other test erases: same inputs would reuse that test's file under its name
        comfy.run(base_graph({"u": unlearn_node("a shared bird", "tier2_shared")}))
        set_inputs(prompt, "TrustApplyDelta", delta_file="tier2_shared.safetensors")
    comfy.run(prompt)


@pytest.mark.parametrize("inputs,reason", [
    ({"steps": 0}, "value_smaller_than_min"),
    ({"learning_rate": 3.0}, "value_bigger_than_max"),
    ({"resolution": 4096}, "value_bigger_than_max"),
    ({"training_images": 0}, "value_smaller_than_min"),
    ({"concepts": "   "}, "concepts is empty"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_comfyui_itself_refuses_out_of_range_inputs_before_running(comfy, inputs, reason):
    """ComfyUI's own validation (execution.validate_inputs) checks min/max only for nodes whose VALIDATE_INPUTS takes
    no **kwargs; a refused prompt is never queued (HTTP 400 naming the input)."""
    with pytest.raises(AssertionError, match="HTTP 400") as refused:
        comfy.queue(base_graph({"u": unlearn_node("a dog", "tier2_refused", **inputs)}))
    assert reason in str(refused.value) and next(iter(inputs)) in str(refused.value)
    assert not (comfy.base_dir / "models" / "unlearned_deltas" / "tier2_refused.safetensors").exists()
