"""The front-end extension: its pure helpers under Node (run state from events, sparkline, status), and that the
extension files parse. Skips when Node.js is not installed."""

import json
import shutil
import subprocess

import pytest
from conftest import ROOT

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension is not checked")


def run_js(body: str):
    script = f"import * as chart from {json.dumps((ROOT / 'web' / 'trust_chart.js').as_uri())};\n{body}"
    out = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_extension_files_parse():
    for name in ("trust.js", "trust_chart.js"):
        out = subprocess.run([NODE, "--check", str(ROOT / "web" / name)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_events_build_a_chart_and_a_status_line():
    result = run_js("""
const states = new Map();
chart.applyEvent(states, {node: "7", stage: "prepare", step: 0, total: 96, message: "generating the forget set"});
chart.applyEvent(states, {node: "7", stage: "prepare", step: 48, total: 96, message: "generating the forget set"});
const during = chart.statusLine(states.get("7"));
for (let i = 1; i <= 4; i++) chart.applyEvent(states, {node: 7, stage: "unlearn", step: i, total: 60, loss: 1 / i});
chart.applyEvent(states, {node: 7, stage: "unlearn", step: 5, total: 60, loss: 0.1, forget_score: 31.5});
const s = states.get("7");
console.log(JSON.stringify({during, status: chart.statusLine(s), points: chart.sparkline(s.loss, s.total, 100, 50)}));
""")
    assert result["during"] == "generating the forget set 50%"
    assert result["status"] == "step 5/60 loss 0.100 forget 31.5"
    xs = [p[0] for p in result["points"]]
    assert xs == sorted(xs) and result["points"][0] == [0, 0] and max(p[1] for p in result["points"]) == 50


def test_missing_or_malformed_events_change_nothing():
    result = run_js("""
const states = new Map();
const ids = [undefined, null, {}, {node: null}, {node: 3, step: "x", total: 2}].map(d => chart.applyEvent(states, d));
console.log(JSON.stringify({ids, size: states.size, empty: chart.sparkline([], 10, 100, 50),
                            blank: chart.statusLine(chart.newState())}));
""")
    assert result == {"ids": [None] * 5, "size": 0, "empty": [], "blank": ""}


def test_nodes_are_found_by_string_ids_including_subgraph_ids():
    result = run_js("""
const graph = (nodes) => ({getNodeById: (id) => nodes[id] ?? null});  // LiteGraph keys nodes by id
const inner = {id: 3, title: "inner unlearn"};
const root = graph({5: {id: 5, subgraph: graph({3: inner})}, 7: {id: 7, title: "top unlearn"}, 12: {id: 12}});
const find = (id) => chart.resolveNode(root, id)?.title ?? chart.resolveNode(root, id)?.id ?? null;
console.log(JSON.stringify(["7", 7, "5:3", "5:4", "12:3", "9", "", null, "5:3:1"].map(find)));
""")
    assert result == ["top unlearn", "top unlearn", "inner unlearn", None, None, None, None, None, None]

