"""The example workflows: valid UI-format graphs, in step with the nodes' inputs (regenerating them changes
nothing), each explained by a note, and each with a picture for the README."""

import importlib.util
import json
import sys

import pytest
from conftest import ROOT

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


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
            "inspect_saliency"} <= names


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
    assert (ROOT / "docs" / "workflows" / f"{path.stem}.png").is_file()


def test_workflows_are_in_step_with_the_nodes(tool):
    table = {**tool.STOCK, **tool.pack_nodes()}
    for name, description in tool.WORKFLOWS.items():
        expected = tool.build(description, table)
        saved = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        assert saved == expected, f"workflows/{name}.json is stale: run python tools/workflows.py"
