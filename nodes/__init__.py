"""ComfyUI node classes of the pack: thin adapters from host objects to trust_engine (see DESIGN.md §1)."""

from .trust_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
