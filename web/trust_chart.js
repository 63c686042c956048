// Pure helpers of the TRuST front-end extension: keep per-node run state from "trust.progress" events and turn it
// into sparkline points. No ComfyUI imports, so tests can run them under Node.

export const EVENT = "trust.progress";

/** Fold one event's detail into the state map (node id -> run state); returns the node id, or null to ignore. */
export function applyEvent(states, detail) {
  if (!detail || detail.node === undefined || detail.node === null) return null;
  const id = String(detail.node);
  if (detail.warning) {
    const s = states.get(id) ?? newState();
    s.warning = String(detail.warning);
    states.set(id, s);
    return id;
  }
  const step = Number(detail.step);
  const total = Number(detail.total);
  if (!Number.isFinite(step) || !Number.isFinite(total)) return null;
  let s = states.get(id);
  if (!s || (detail.stage === "prepare" && step === 0)) s = newState();
  s.stage = String(detail.stage ?? "");
  s.message = String(detail.message ?? "");
  if (s.stage === "unlearn") {
    s.step = step;
    s.total = total;
    if (Number.isFinite(detail.loss)) s.loss.push([step, detail.loss]);
    if (Number.isFinite(detail.forget_score)) s.score.push([step, detail.forget_score]);
  } else {
    s.prepared = total > 0 ? step / total : 0;
  }
  states.set(id, s);
  return id;
}

export function newState() {
  return { stage: "", message: "", step: 0, total: 0, prepared: 0, loss: [], score: [], warning: "" };
}

/** Points [x, y] of a series scaled into a w x h box (y grows downwards); [] when there is nothing to draw. */
export function sparkline(series, lastStep, w, h) {
  const ys = series.map((p) => p[1]).filter(Number.isFinite);
  if (ys.length === 0 || w <= 0 || h <= 0) return [];
  const lo = Math.min(...ys);
  const hi = Math.max(...ys);
  const span = hi - lo || 1;
  const steps = Math.max(lastStep, series[series.length - 1][0], 2);
  return series
    .filter((p) => Number.isFinite(p[1]))
    .map(([x, y]) => [((x - 1) / (steps - 1)) * w, h - ((y - lo) / span) * h]);
}

/** The one-line status shown on the node. */
export function statusLine(s) {
  if (s.stage === "unlearn") {
    const loss = s.loss.length ? ` loss ${s.loss[s.loss.length - 1][1].toPrecision(3)}` : "";
    const score = s.score.length ? ` forget ${s.score[s.score.length - 1][1].toFixed(1)}` : "";
    return `step ${s.step}/${s.total}${loss}${score}`;
  }
  if (s.stage) return `${s.message || s.stage} ${Math.round(100 * s.prepared)}%`;
  return "";
}

/**
 * The node an execution id names in a graph: "12" is node 12 of the root graph, "5:3" node 3 inside the subgraph
 * of node 5 (the front-end flattens subgraphs into the prompt with such ids). null when any step is missing.
 */
export function resolveNode(graph, id) {
  if (!graph || id === undefined || id === null || id === "") return null;
  let current = graph;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!current || typeof current.getNodeById !== "function") return null;
    node = current.getNodeById(part) ?? (/^\d+$/.test(part) ? current.getNodeById(Number(part)) : null) ?? null;
    if (!node) return null;
    current = node.subgraph ?? null;
  }
  return node;
}
