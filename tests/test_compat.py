"""Compatibility fixtures: files users already have must keep working. tests/fixtures holds the three demo delta files
and the five example workflows as the pack wrote them at commit 98383af (before the validation table, the relative
learning rate and the sketch). Every later change must still load and apply those deltas to the same weights, and
read those workflows' widget values into the same inputs; a change that cannot must say so in its note and bump the
expectations here on purpose."""

import hashlib
import json

import pytest
import torch
from conftest import ROOT
from safetensors import safe_open

from trust_engine.delta import Delta, fingerprint, lora_key
from trust_engine.unet_view import find_sites, site_weights

FIXTURES = ROOT / "tests" / "fixtures"
DELTAS = sorted((FIXTURES / "deltas").glob("*.safetensors"))
WORKFLOWS = sorted((FIXTURES / "workflows").glob("*.json"))
# sha256 of every changed site weight after applying the file at strength 1 to the bundled testbed (float32, in
# sorted site order): what the files applied to when they were written
APPLIED = {
    "erase_circle_on_a_square": "c68c1210c067ee4c3385b7d1f9ad4e062f9b6b7480440ca932b508140546432a",
    "erase_red_circle": "aef502cbee1a31157f690367758e99137b76c16d38a38f513957c54b0278e4a8",
    "erase_triangle": "b01c56d90239cd6691c35430eab5e993b2574c332d404d8a747b4eda39419b01",
}


def _sha(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _as_a_stock_loader_reads_it(path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """base + the file's own tensors, the way kohya-format loaders compute it (up @ down * alpha / rank, or diff),
    without the engine's Delta class."""
    out = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for name, weight in base.items():
            key = lora_key(name)
            if f"{key}.diff" in keys:
                out[name] = weight + f.get_tensor(f"{key}.diff").float()
            elif f"{key}.lora_up.weight" in keys:
                up, down = f.get_tensor(f"{key}.lora_up.weight").float(), f.get_tensor(f"{key}.lora_down.weight").float()
                alpha = float(f.get_tensor(f"{key}.alpha")) if f"{key}.alpha" in keys else down.shape[0]
                out[name] = weight + up @ down * (alpha / down.shape[0])
    return out


@pytest.mark.parametrize("path", DELTAS, ids=lambda p: p.stem)
def test_old_delta_files_load_and_apply_to_the_same_weights(testbed, path):
    pipe = testbed[0]
    base = site_weights(pipe.unet, find_sites(pipe.unet))
    delta = Delta.load(path)
    delta.check_base(fingerprint(base))  # still recognised as made for the bundled testbed
    applied = delta.apply_to({n: base[n] for n in delta.sites})
    stock = _as_a_stock_loader_reads_it(path, base)
    assert sorted(applied) == sorted(stock) and applied
    for name in applied:
        torch.testing.assert_close(applied[name], stock[name], rtol=0, atol=1e-6)
    assert _sha(applied) == APPLIED[path.stem]


def _widget_values_by_name(pack, flow: dict) -> dict:
    from comfyui.workflow_api import _has_control, _is_widget

    per = {}
    for node in flow["nodes"]:
        cls = pack.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        spec, values, named = cls.INPUT_TYPES(), list(node.get("widgets_values", [])), {}
        for group in ("required", "optional"):
            for name, s in spec.get(group, {}).items():
                if _is_widget(s) and values:
                    named[name] = values.pop(0)
                    if _has_control(name, s) and values:
                        values.pop(0)
        assert not values, f"node {node['id']} ({node['type']}) has more widget values than widgets"
        per[str(node["id"])] = {"type": node["type"], "inputs": named}
    return per


def test_old_workflows_keep_their_widget_values_in_place(pack):
    saved = json.loads((FIXTURES / "workflows" / "widgets_as_saved.json").read_text())
    assert sorted(saved) == sorted(p.stem for p in WORKFLOWS if p.stem != "widgets_as_saved")
    for path in WORKFLOWS:
        if path.stem == "widgets_as_saved":
            continue
        now = _widget_values_by_name(pack, json.loads(path.read_text()))
        assert now == saved[path.stem], path.stem
        for node in now.values():  # inputs added since are optional and take their defaults
            spec = pack.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
            missing = set(spec["required"]) - set(node["inputs"])
            assert all(spec["required"][m][0] in ("MODEL", "CLIP", "VAE", "IMAGE", "UNLEARNED_DELTA", "CONCEPT_NEURONS",
                                                  "CONCEPT_ALIGNER") for m in missing), missing


def test_an_old_workflows_absolute_learning_rate_keeps_its_meaning(pack):
    """Workflows saved before relative_lr hold learning_rate 0.005: still an absolute rate, not 'relative'."""
    saved = json.loads((FIXTURES / "workflows" / "widgets_as_saved.json").read_text())
    rates = [n["inputs"]["learning_rate"] for flow in saved.values() for n in flow.values() if n["type"] == "TrustUnlearn"]
    assert rates and all(r == 0.005 for r in rates)
    spec = pack.NODE_CLASS_MAPPINGS["TrustUnlearn"].INPUT_TYPES()
    assert "relative_lr" in spec["optional"] and "relative_lr" not in spec["required"]


def test_an_old_workflow_has_no_concept_type_and_keeps_meaning_none(pack):
    """Workflows saved before concept types carry no value for it: the node's default, 'none', the old expansion."""
    saved = json.loads((FIXTURES / "workflows" / "widgets_as_saved.json").read_text())
    unlearns = [n["inputs"] for flow in saved.values() for n in flow.values() if n["type"] == "TrustUnlearn"]
    assert unlearns and all("concept_type" not in inputs for inputs in unlearns)
    spec = pack.NODE_CLASS_MAPPINGS["TrustUnlearn"].INPUT_TYPES()
    assert "concept_type" not in spec["required"] and spec["optional"]["concept_type"][1]["default"] == "none"
    import inspect

    signature = inspect.signature(pack.NODE_CLASS_MAPPINGS["TrustUnlearn"].unlearn)
    assert signature.parameters["concept_type"].default == "none"
