"""UI-format workflow (what the front-end saves and example_workflows hold) -> API-format prompt (what POST /prompt
takes), using the server's /object_info for the order of each node's widgets."""

from __future__ import annotations

SOCKET_ONLY = object()
SKIPPED_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _has_control(name: str, spec) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    # the front-end's rule: a control widget follows such an INT, and also every INT named seed / noise_seed
    return spec[0] == "INT" and (bool(options.get("control_after_generate")) or name in ("seed", "noise_seed"))


def ui_to_api(flow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in flow["links"]}
    prompt = {}
    for node in flow["nodes"]:
        if node["type"] in SKIPPED_TYPES or node.get("mode", 0) in (2, 4):  # notes, muted, bypassed
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node type {node['type']!r} is not installed on this server")
        linked = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, src, src_slot, _, _, _ = links[socket["link"]]
                linked[socket["name"]] = [str(src), src_slot]
        values = list(node.get("widgets_values", []))
        inputs = {}
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                if _is_widget(spec):
                    if not values:
                        raise ValueError(f"node {node['id']} ({node['type']}) has fewer widget values than widgets")
                    value = values.pop(0)
                    if _has_control(name, spec) and values:
                        values.pop(0)  # "fixed" / "randomize": front-end only
                    inputs[name] = linked.get(name, value)
                elif name in linked:
                    inputs[name] = linked[name]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def set_inputs(prompt: dict, class_type: str, **values) -> None:
    """Override widget values of every node of a type (e.g. fewer steps for a CPU test)."""
    for node in prompt.values():
        if node["class_type"] == class_type:
            node["inputs"].update(values)
