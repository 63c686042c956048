"""TRuST node pack: ComfyUI entry point. ComfyUI imports this folder as a package under its folder name,
so everything here is imported relatively; it must import cleanly without ComfyUI (tests do so).
"""

if __package__:  # ComfyUI (and the tests' pack fixture) import this folder as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .trust_engine import __version__

    WEB_DIRECTORY = "./web"

    try:  # inside ComfyUI: models/unlearned_deltas (also listed under loras) and models/concept_aligners
        import folder_paths  # noqa: F401  (only to know whether ComfyUI is here)
    except ImportError:
        pass
    else:
        from .nodes.host import register_folders

        register_folders()
else:  # a plain-module import: pytest collecting a checkout whose folder name is not a Python name (e.g. a "-")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY, __version__ = {}, {}, "./web", ""

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
