"""The erasers, one module per method: each a config dataclass (documented fields, paper defaults) and one
`run(parts, concepts, config, progress) -> Delta`; METHODS maps a method's name to (config class, run function).
"""

from __future__ import annotations

from collections.abc import Callable

from . import conceptprune, esd, fia, salun, uce

METHODS: dict[str, tuple[type, Callable]] = {
    "conceptprune": (conceptprune.ConceptPruneConfig, conceptprune.run),
    "esd": (esd.ESDConfig, esd.run),
    "fia": (fia.FIAConfig, fia.run),
    "salun": (salun.SalUnConfig, salun.run),
    "uce": (uce.UCEConfig, uce.run),
}
