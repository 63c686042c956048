"""TRuST node pack: ComfyUI entry point. ComfyUI imports this folder as a package under its folder name,
so everything here is imported relatively; it must import cleanly without ComfyUI (tests do so).
"""

from .trust_engine import __version__

# The nodes (Concept Saliency, TRUST Unlearn, Apply Unlearned Delta) are registered here once they exist.
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
