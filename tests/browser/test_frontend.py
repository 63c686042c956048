"""Tier 3 (see conftest.py): every example workflow in ComfyUI's real front-end. It is listed in the template browser
and loads from there with no missing nodes or widget errors; queued at CPU size from the UI it completes; the
chart and the report render on the node; the prompt the UI sends carries no report; queueing again executes
nothing (served from ComfyUI's cache). Screenshots of the real UI go to the test's temp folder, or, with
TRUST_SCREENSHOTS=1 (tools/screenshots.py), to docs/workflows/<name>.jpg and example_workflows/<name>.jpg.
"""

from __future__ import annotations

import io
import json
import os
import re
import time

import pytest
from comfyui.test_tier2 import FAST, base_graph, unlearn_node
from comfyui.tier2_support import CHECKPOINT, REPO

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
PACK = "trust_unlearning"  # the pack's folder name in the tier-2 server's custom_nodes
SHARED_DELTA = "tier3_shared"
CPU_SIZE = {  # widget values a CPU run needs, as tier 2 sets them
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "KSampler": {"steps": 2},
    "TrustUnlearn": FAST,
    "TrustConceptSaliency": {"steps": 2, "images": 1, "resolution": 64},
    "TrustApplyDelta": {"delta_file": SHARED_DELTA + ".safetensors"},
}
REPORTING = ("TrustUnlearn", "TrustApplyDelta", "TrustConceptSaliency")
LOSS_COLOUR = (0x5A, 0xAA, 0xFF)  # web/trust.js draws the loss line in this colour


@pytest.fixture(scope="module")
def shared_delta(comfy):
    """A delta file for Apply Unlearned Delta's list, made before any page loads (the list is read at page load)."""
    comfy.run(base_graph({"u": unlearn_node("a tier three bird", SHARED_DELTA)}))
    return SHARED_DELTA


@pytest.fixture
def page(comfy, browser, shared_delta):
    page = browser.new_page()
    page.trust_errors = []
    page.on("console", lambda m: page.trust_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.trust_errors.append(f"page error: {e}"))
    page.trust_ws = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: _keep_json(page.trust_ws, frame)))
    page.trust_prompts = []
    page.on("request", lambda r: page.trust_prompts.append(r.post_data) if r.method == "POST" and
            r.url.endswith("/prompt") else None)
    page.goto(comfy.base)
    page.wait_for_function("window.app?.graph && window.app.extensionManager?.command", timeout=120000)
    page.wait_for_function("window.app.extensions?.some(e => e.name === 'trust.unlearning')", timeout=60000)
    page.wait_for_timeout(3000)
    for _ in range(10):  # close the first-run template dialog, so that each test opens the browser itself
        if page.get_by_role("dialog").count() == 0:
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)
    # clearer pictures: no minimap, and full node detail at the zoom that fits a whole workflow on the screen
    page.evaluate("""async () => { const s = window.app.extensionManager.setting;
        await s.set('Comfy.Minimap.Visible', false); await s.set('LiteGraph.Canvas.MinFontSizeForLOD', 0); }""")
    yield page
    page.close()


def _keep_json(store: list, frame) -> None:
    if isinstance(frame, str):
        try:
            store.append(json.loads(frame))
        except ValueError:
            pass


def _save(page, path, clip=None, size=None) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB")
    if size:
        image.thumbnail(size)
    image.save(path, "JPEG", quality=82, optimize=True)


def _pictures(tmp_path, name):
    if os.environ.get("TRUST_SCREENSHOTS") == "1":
        (REPO / "docs" / "workflows").mkdir(parents=True, exist_ok=True)
        return REPO / "docs" / "workflows" / f"{name}.jpg", REPO / "example_workflows" / f"{name}.jpg"
    return tmp_path / f"{name}.jpg", tmp_path / f"{name}_thumbnail.jpg"


def _wait_done(page, prompt_id: str, timeout: float = 900) -> list:
    end = time.time() + timeout
    while time.time() < end:
        mine = [m for m in page.trust_ws if (m.get("data") or {}).get("prompt_id") == prompt_id]
        kinds = {m["type"] for m in mine}
        if "execution_error" in kinds or "execution_interrupted" in kinds:
            raise AssertionError(f"prompt failed: {json.dumps(mine)[-3000:]}")
        if "execution_success" in kinds:
            return mine
        page.wait_for_timeout(500)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")


def _queue(page) -> str:
    """Queue from the UI (the Queue button's command) and return the id the server gave the prompt."""
    before = len(page.trust_prompts)
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as response:
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.QueuePrompt')")
    assert len(page.trust_prompts) == before + 1
    body = response.value.json()
    assert "prompt_id" in body, body
    return body["prompt_id"]


def _node_boxes(page) -> list:
    return page.evaluate("""() => window.app.graph._nodes.map(n => ({id: String(n.id), type: n.type,
        box: [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]}))""")


def _overlaps(a, b) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_in_the_real_front_end(page, path, tmp_path):
    name = path.stem
    saved = json.loads(path.read_text())
    picture, thumbnail = _pictures(tmp_path, name)

    # listed by the server and shown in the template browser under the pack's name; loading it from there
    listed = page.evaluate("async () => await (await fetch('/api/workflow_templates')).json()")
    assert name in listed.get(PACK, []), listed
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")
    dialog.first.wait_for(timeout=30000)
    dialog.get_by_text(PACK, exact=True).first.click()
    card = dialog.get_by_text(name, exact=True).first
    card.wait_for(timeout=30000)
    card.click()
    page.wait_for_function("(n) => window.app.graph._nodes.length === n", arg=len(saved["nodes"]), timeout=60000)
    page.wait_for_timeout(1500)

    # no missing nodes, every widget value in place (the report and chart hold none)
    state = page.evaluate("""() => window.app.graph._nodes.map(n => ({id: n.id, type: n.type,
        registered: !!LiteGraph.registered_node_types[n.type], errors: !!n.has_errors,
        values: (n.widgets ?? []).filter(w => w.serialize !== false).map(w => w.value)}))""")
    assert all(n["registered"] for n in state), [n["type"] for n in state if not n["registered"]]
    assert not any(n["errors"] for n in state)
    by_id = {n["id"]: n for n in state}
    for node in saved["nodes"]:
        assert by_id[node["id"]]["values"] == node["widgets_values"], (node["type"], by_id[node["id"]]["values"])
    missing = page.get_by_role("dialog").filter(has_text=re.compile("missing", re.IGNORECASE))
    assert missing.count() == 0, missing.first.inner_text()
    bad = [e for e in page.trust_errors if "trust" in e.lower() or "widget" in e.lower()]
    assert not bad, bad
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(500)
    _save(page, thumbnail, size=(640, 400))

    # CPU size (a training seed of its own, so no workflow reuses another's delta and each one trains), then queue
    sizes = {**CPU_SIZE, "TrustUnlearn": {**FAST, "training_seed": 1 + WORKFLOWS.index(path)}}
    page.evaluate("""(sizes) => { for (const n of window.app.graph._nodes) {
        for (const [k, v] of Object.entries(sizes[n.type] ?? {})) {
          const w = n.widgets?.find(w => w.name === k); if (w) w.value = v; } } }""", sizes)
    first = _queue(page)
    _wait_done(page, first)
    page.wait_for_timeout(1000)

    # the reports fill the boxes the nodes already had; nothing grew over a neighbour
    reports = page.evaluate("""(types) => window.app.graph._nodes.filter(n => types.includes(n.type))
        .map(n => ({id: String(n.id), type: n.type, text: n.widgets.find(w => w.name === 'trust_report')?.value ?? null,
                    chart: n.widgets.find(w => w.name === 'trust_chart')?.state ?? null}))""", list(REPORTING))
    assert reports and all(r["text"] for r in reports), reports
    boxes = _node_boxes(page)
    for a in boxes:
        if a["type"] in REPORTING:
            hit = [b["type"] for b in boxes if b is not a and _overlaps(a["box"], b["box"])]
            assert not hit, f"{a['type']} overlaps {hit}: {boxes}"
    # the live chart: progress events reached TRUST Unlearn's chart, and its loss line is on the screen
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(800)
    _save(page, picture)
    unlearn = [r for r in reports if r["type"] == "TrustUnlearn"]
    if unlearn:
        assert all(r["chart"] and len(r["chart"]["loss"]) == FAST["steps"] for r in unlearn), unlearn
        page.evaluate("""(id) => { const c = window.app.canvas; c.ds.scale = 1.5;
            c.centerOnNode(window.app.graph.getNodeById(id)); c.setDirty(true, true); }""", unlearn[0]["id"])
        page.wait_for_timeout(800)
        clip = page.evaluate("""(id) => { const c = window.app.canvas, n = window.app.graph.getNodeById(id);
            const w = n.widgets.find(w => w.name === 'trust_chart'); const r = c.canvas.getBoundingClientRect();
            const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] + w.y]);
            return {x: r.left + x, y: r.top + y, width: n.size[0] * c.ds.scale, height: 54 * c.ds.scale}; }""",
                             unlearn[0]["id"])
        assert _count_colour(page.screenshot(clip=clip), LOSS_COLOUR) > 50, clip

    # queue again: the prompt the UI sends has no report in it, and nothing executes
    second = _queue(page)
    sent = json.loads(page.trust_prompts[-1])
    for node in sent["prompt"].values():
        assert "trust_report" not in node["inputs"] and "trust_chart" not in node["inputs"]
    strings = [v for node in sent["prompt"].values() for v in node["inputs"].values() if isinstance(v, str)]
    for r in reports:
        assert not any(r["text"].splitlines()[0] in v for v in strings), r["type"]
    messages = _wait_done(page, second)
    executed = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"].get("node")]
    assert executed == [], f"re-executed {executed}"
    cached = next(m["data"]["nodes"] for m in messages if m["type"] == "execution_cached")
    assert set(cached) == set(sent["prompt"])


def _count_colour(png: bytes, colour, tolerance: int = 40) -> int:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(1 for p in image.getdata() if all(abs(a - b) <= tolerance for a, b in zip(p, colour)))


def test_progress_reaches_a_node_inside_a_subgraph(page):
    """The front-end names a node inside a subgraph "<subgraph node>:<inner node>" in the prompt; progress events
    carrying that id must reach the inner TRUST Unlearn's chart."""
    flow = json.loads((REPO / "example_workflows" / "erase_concept_before_after.json").read_text())
    page.evaluate("(g) => window.app.loadGraphData(g)", flow)
    page.wait_for_timeout(1500)
    result = page.evaluate("""async () => {
        const app = window.app, graph = app.graph;
        const unlearn = graph._nodes.find(n => n.type === 'TrustUnlearn');
        const { node } = graph.convertToSubgraph(new Set([unlearn]));
        const inner = node.subgraph.nodes.find(n => n.type === 'TrustUnlearn');
        const prompt = await app.graphToPrompt();
        const id = Object.keys(prompt.output).find(k => prompt.output[k].class_type === 'TrustUnlearn');
        for (const step of [1, 2]) {
          app.api.dispatchCustomEvent('trust.progress', {node: id, stage: 'unlearn', step, total: 2, loss: 1 / step});
        }
        const chart = inner.widgets.find(w => w.name === 'trust_chart');
        return {id, outer: String(node.id), inner: String(inner.id), loss: chart.state?.loss ?? null};
    }""")
    assert result["id"] == f"{result['outer']}:{result['inner']}", result
    assert result["loss"] == [[1, 1.0], [2, 0.5]], result
