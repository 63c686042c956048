// TRuST front-end extension for ComfyUI: a live loss / forget-score sparkline and a step counter on TRUST Unlearn
// (from the "trust.progress" events the nodes send), and the nodes' text reports. Without events it draws nothing.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { EVENT, applyEvent, sparkline, statusLine } from "./trust_chart.js";

const states = new Map();
const CHART_HEIGHT = 54;
const REPORTING = new Set(["TrustUnlearn", "TrustApplyDelta", "TrustConceptSaliency"]);

function findNode(id) {
  const graph = app.graph;
  if (!graph) return null;
  return graph.getNodeById(Number(id)) ?? graph.getNodeById(id) ?? null;
}

function drawChart(ctx, node, s) {
  const pad = 8;
  const w = node.size[0] - 2 * pad;
  const top = node.size[1] - CHART_HEIGHT - pad;
  if (w < 40 || top < 0) return;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(pad, top, w, CHART_HEIGHT);
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
  ctx.fillStyle = s.warning ? "#ff7060" : "#ddd";
  ctx.font = "11px sans-serif";
  ctx.fillText(s.warning ? s.warning.slice(0, 80) : statusLine(s), pad + 4, top + 12);
  ctx.restore();
}

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === "trust_report");
  if (!widget) {
    const made = ComfyWidgetsOrNull()?.STRING?.(node, "trust_report", ["STRING", { multiline: true }], app);
    widget = made?.widget;
    if (!widget) return;
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.8;
    }
    widget.serialize = false; // a report is output, not an input: keep it out of saved workflows
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

let widgetsModule = null;
function ComfyWidgetsOrNull() {
  return widgetsModule?.ComfyWidgets ?? null;
}

app.registerExtension({
  name: "trust.unlearning",
  async setup() {
    try {
      widgetsModule = await import("../../scripts/widgets.js");
    } catch {
      widgetsModule = null; // older or newer front-ends: reports stay in the STRING output only
    }
    api.addEventListener(EVENT, (event) => {
      const id = applyEvent(states, event.detail);
      if (id !== null) findNode(id)?.setDirtyCanvas?.(true, false);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "TrustUnlearn" || nodeData.name === "TrustApplyDelta") {
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        const result = onDrawForeground?.apply(this, arguments);
        const s = states.get(String(this.id));
        if (s && !this.flags?.collapsed) drawChart(ctx, this, s);
        return result;
      };
    }
    if (REPORTING.has(nodeData.name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const text = message?.text;
        if (Array.isArray(text) && text.length) showText(this, text.join("\n"));
      };
    }
  },
});
