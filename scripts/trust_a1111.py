"""AUTOMATIC1111 entry point: the web UI runs every scripts/*.py of an extension. The repository root is a Python
package (ComfyUI imports it by its folder name, which may contain '-'), so it is imported here under a fixed name and
the AUTOMATIC1111 side (a1111/) registers its tab, settings and API routes. The web UI also instantiates every
scripts.Script subclass found in this module: TrustDeltaScript is the AlwaysVisible "TRuST delta" of txt2img/img2img."""

import importlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "trust_unlearning_extension"


def _package():
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACKAGE]
            raise
    return sys.modules[PACKAGE]


_package()
importlib.import_module(PACKAGE + ".a1111.extension").register()
TrustDeltaScript = importlib.import_module(PACKAGE + ".a1111.delta_script").script_class()
