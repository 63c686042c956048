"""The example workflows: valid UI-format graphs in example_workflows/ (the folder ComfyUI's template browser reads),
in step with the nodes' inputs (regenerating them changes nothing), each explained by a note, each with the
template browser's thumbnail beside it and a screenshot of the real UI for the README (tools/screenshots.py)."""

import importlib.util
import json
import sys

import pytest
from conftest import ROOT

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("workflow_tool", ROOT / "tools" / "workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for key in [k for k in sys.modules if k == "trust_pack" or k.startswith("trust_pack.")]:
        del sys.modules[key]


def test_there_is_a_workflow_for_each_use_case():
    names = {p.stem for p in WORKFLOWS}
    assert {"erase_concept_before_after", "erase_combination", "erase_conditional", "apply_shared_delta",
            "inspect_saliency", "bake_into_checkpoint"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_a_consistent_ui_graph_with_a_note(path):
    flow = json.loads(path.read_text())
    assert flow["version"] == 0.4 and flow["last_node_id"] == len(flow["nodes"])
    nodes = {n["id"]: n for n in flow["nodes"]}
    for link_id, src, out_i, dst, in_i, kind in flow["links"]:
        assert link_id in nodes[src]["outputs"][out_i]["links"]
        assert nodes[dst]["inputs"][in_i]["link"] == link_id
        assert nodes[src]["outputs"][out_i]["type"] == nodes[dst]["inputs"][in_i]["type"] == kind
    notes = [n for n in flow["nodes"] if n["type"] == "Note"]
    assert notes and len(notes[0]["widgets_values"][0]) > 80
    assert any(n["type"].startswith("Trust") for n in flow["nodes"])
    for picture in (ROOT / "example_workflows" / f"{path.stem}.jpg", ROOT / "docs" / "workflows" / f"{path.stem}.jpg"):
        assert picture.is_file() and picture.stat().st_size < 300_000, picture


def test_an_erasure_is_baked_into_a_checkpoint_by_the_stock_save_checkpoint_node():
    flow = json.loads((ROOT / "example_workflows" / "bake_into_checkpoint.json").read_text())
    nodes = {n["id"]: n for n in flow["nodes"]}
    save = next(n for n in flow["nodes"] if n["type"] == "CheckpointSave")
    sources = {s["name"]: nodes[next(link[1] for link in flow["links"] if link[0] == s["link"])]["type"]
               for s in save["inputs"]}
    assert sources == {"model": "TrustUnlearn", "clip": "CheckpointLoaderSimple", "vae": "CheckpointLoaderSimple"}


def test_workflows_are_in_step_with_the_nodes(tool):
    table = {**tool.STOCK, **tool.pack_nodes()}
    for name, description in tool.WORKFLOWS.items():
        expected = tool.build(description, table)
        saved = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
        assert saved == expected, f"example_workflows/{name}.json is stale: run python tools/workflows.py"
