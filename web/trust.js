// TRuST front-end extension for ComfyUI: a live loss / forget-score chart and a step counter on TRUST Unlearn
// (from the "trust.progress" events the nodes send), and the nodes' text reports. Without events it draws nothing.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { EVENT, applyEvent, resolveNode, sparkline, statusLine } from "./trust_chart.js";

const states = new Map(); // execution id ("12", or "5:3" inside a subgraph) -> run state
const CHART_HEIGHT = 54;
const CHARTED = new Set(["TrustUnlearn", "TrustApplyDelta"]);
const REPORTING = new Set(["TrustUnlearn", "TrustApplyDelta", "TrustConceptSaliency"]);
const REPORT = "trust_report";
const CHART = "trust_chart";

function drawChart(ctx, width, top, s) {
  const pad = 10;
  const w = width - 2 * pad;
  if (w < 40) return;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(pad, top, w, CHART_HEIGHT);
  if (s) {
    const series = [
      [s.loss, "#5aaaff"],
      [s.score, "#ffaa3c"],
    ];
    for (const [points, colour] of series) {
      const xy = sparkline(points, s.total, w - 8, CHART_HEIGHT - 20);
      if (xy.length < 1) continue;
      ctx.strokeStyle = colour;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      xy.forEach(([x, y], i) => (i ? ctx.lineTo(pad + 4 + x, top + 16 + y) : ctx.moveTo(pad + 4 + x, top + 16 + y)));
      ctx.stroke();
    }
  }
  ctx.fillStyle = s?.warning ? "#ff7060" : "#ddd";
  ctx.font = "11px sans-serif";
  const line = s ? (s.warning ? s.warning.slice(0, 80) : statusLine(s)) : "loss / forget score while it runs";
  ctx.fillText(line, pad + 4, top + 12);
  ctx.restore();
}

// The chart is a widget of its own, so the node's layout gives it a row below the other widgets instead of the
// chart being painted over them. It holds no value: kept out of saved workflows and of the prompt.
function addChart(node) {
  node.addCustomWidget({
    name: CHART,
    type: "trust_chart",
    value: null,
    state: null, // the run state this node's chart shows (set by the progress events)
    serialize: false,
    options: { serialize: false },
    computeSize(width) {
      return [width ?? node.size[0], CHART_HEIGHT];
    },
    draw(ctx, _node, width, y) {
      drawChart(ctx, width, y, this.state);
    },
  });
}

// The report is a read-only text box made when the node is made, so that a report arriving later fills it in
// place instead of adding a widget that grows the node over its neighbours.
function addReport(node) {
  const made = widgetsModule?.ComfyWidgets?.STRING?.(node, REPORT, ["STRING", { multiline: true }], app);
  const widget = made?.widget;
  if (!widget) return;
  // widget.serialize: not in saved workflows; options.serialize: not in the prompt sent to /prompt (an input
  // there would change ComfyUI's cache key on every run and re-execute the node and everything after it)
  widget.serialize = false;
  widget.options ??= {};
  widget.options.serialize = false;
  if (widget.inputEl) {
    widget.inputEl.readOnly = true;
    widget.inputEl.placeholder = "report (after a run)";
    widget.inputEl.style.opacity = 0.8;
  }
}

function showText(node, text) {
  const widget = node.widgets?.find((w) => w.name === REPORT);
  if (!widget) return;
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

let widgetsModule = null;

app.registerExtension({
  name: "trust.unlearning",
  async init() {
    try {
      widgetsModule = await import("../../scripts/widgets.js");
    } catch {
      widgetsModule = null; // older or newer front-ends: reports stay in the STRING output only
    }
  },
  async setup() {
    api.addEventListener(EVENT, (event) => {
      const id = applyEvent(states, event.detail);
      if (id === null) return;
      const node = resolveNode(app.graph, id);
      const chart = node?.widgets?.find((w) => w.name === CHART);
      if (!chart) return;
      chart.state = states.get(id);
      node.setDirtyCanvas?.(true, false);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORTING.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (CHARTED.has(nodeData.name)) addChart(this);
      addReport(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (Array.isArray(text) && text.length) showText(this, text.join("\n"));
    };
  },
});
