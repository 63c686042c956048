"""The one table of allowed values for every numeric or choice input of a run, named like the config fields, shared
by the Python API (unlearn checks its config), the CLI and the host nodes (ComfyUI's INPUT_TYPES min/max/combos).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


class InputRangeError(ValueError):
    """An input outside its allowed range; the message names the input, its value and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        super().__init__(f"{name} = {value!r} is not allowed: {name} must be {allowed}")
        self.name, self.value, self.allowed = name, value, allowed


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of one input: a number in [low, high] (an integer when `integer`, a multiple of `multiple_of`,
    or one of `special`), one of `choices`, or a non-empty string of distinct `letters`; None when `optional`."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    choices: tuple[str, ...] = ()
    letters: str = ""
    optional: bool = False  # None allowed: "the default"
    multiple_of: int = 0
    special: tuple[float, ...] = ()  # values allowed outside [low, high], e.g. resolution 0 = native
    note: str = ""  # what a special or None value means, for the message

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.letters:
            text = f"a non-empty string of distinct letters from {self.letters!r}"
        else:
            text = f"{'an integer' if self.integer else 'a number'} from {_num(self.low)} to {_num(self.high)}"
            if self.multiple_of:
                text += f" in multiples of {self.multiple_of}"
            if self.special:
                text += ", or " + " or ".join(_num(s) for s in self.special)
        if self.optional:
            text += ", or None"
        return text + (f" ({self.note})" if self.note else "")

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.choices:
            return isinstance(value, str) and value in self.choices
        if self.letters:
            return (isinstance(value, str) and bool(value) and set(value) <= set(self.letters)
                    and len(set(value)) == len(value))
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value):
            return False
        if self.integer and int(value) != value:
            return False
        if value in self.special:
            return True
        if self.multiple_of and int(value) % self.multiple_of:
            return False
        return self.low <= value <= self.high


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# Every numeric or choice input, under the name of its config field (trust_engine.unlearn.UnlearnConfig,
# trust_engine.saliency.SaliencyConfig); inputs no config has (resolution, strength, seeds, mode) under the name the
# hosts and the CLI give them. Bounds are what the engine can run, not what is wise: defaults live in the configs.
RANGES: dict[str, Range] = {
    "loss": Range(choices=("cip", "csr")),
    "steps": Range(1, 10_000, integer=True),
    "lr": Range(1e-6, 1.0, optional=True, note="None = relative_lr times each site's weight RMS"),
    "relative_lr": Range(1e-4, 1.0),
    "beta": Range(0.0, 100.0),
    "alpha": Range(0.0, 100.0),
    "retain_target": Range(choices=("base", "noise")),
    "negative_guidance": Range(0.0, 10.0),
    "mask_every": Range(0, 10_000, integer=True, note="0 = never re-estimate"),
    "cip_update": Range(choices=("gradient", "proximal")),
    "saliency_momentum": Range(0.0, 0.99),
    "mask_rows": Range(0, 1_000_000, integer=True, note="0 = z > xi"),
    "mask_source": Range(choices=("saliency", "random")),
    "row_budget": Range(0.0, 1.0, note="0 = no budget"),
    "csr_probes": Range(1, 64, integer=True),
    "csr_scale": Range(choices=("batch", "sample")),
    "csr_data": Range(choices=("forget", "retain")),
    "preserve_projection": Range(0.0, 1.0, note="0 = off"),
    "batch": Range(1, 256, integer=True),
    "forget_images": Range(1, 1024, integer=True),
    "preserve_images": Range(0, 2048, integer=True),
    "gen_steps": Range(1, 200, integer=True),
    "cfg": Range(0.0, 30.0, optional=True, note="None = the model's default"),
    "early_stop": Range(0.0, 1.0, optional=True, note="None = never stop early"),
    "eval_every": Range(1, 10_000, integer=True),
    "projections": Range(letters="qkvo"),
    "seed": Range(0, 2**31 - 1, integer=True),
    # SaliencyConfig
    "xi": Range(0.5, 6.0),
    "saliency_steps": Range(2, 100, integer=True),
    "saliency_images": Range(1, 64, integer=True),
    "saliency_cfg": Range(0.0, 30.0, optional=True, note="None = the run's guidance scale"),
    "saliency_mode": Range(choices=("auto", "clip", "noise")),
    "saliency_precision": Range(choices=("host", "bfloat16")),
    "saliency_source": Range(choices=("generate", "forget_set")),
    "stop_fraction": Range(0.0, 1.0),
    # host and CLI inputs
    "mode": Range(choices=("individual", "combination", "conditional")),
    "learning_rate": Range(1e-6, 1.0, special=(0,), note="0 = use relative_lr"),
    "resolution": Range(32, 2048, integer=True, multiple_of=8, special=(0,), note="0 = the model's native size"),
    "strength": Range(-2.0, 2.0),
    "seeds": Range(1, 64, integer=True),
    "cell": Range(32, 1024, integer=True),
}

# config field path -> table name, where they differ (SaliencyConfig's fields share names with UnlearnConfig's)
CONFIG_NAMES = {"saliency.steps": "saliency_steps", "saliency.images": "saliency_images", "saliency.cfg": "saliency_cfg",
                "saliency.mode": "saliency_mode", "saliency.xi": "xi",
                "saliency.decode_precision": "saliency_precision", "saliency.source": "saliency_source"}


def check(name: str, value: Any, label: str | None = None) -> None:
    """Raise InputRangeError (named `label`, default `name`) unless the table allows `value` for input `name`."""
    allowed = RANGES[name]
    if not allowed.allows(value):
        raise InputRangeError(label or name, value, allowed.describe())


def check_inputs(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """Check every entry of `values` the table knows; `names` maps an input's own name (e.g. a node's
    'learning_rate') to its table name ('lr'). The message names the input as given."""
    names = names or {}
    for key, value in values.items():
        table = names.get(key, key)
        if table in RANGES:
            check(table, value, key)


def check_config(config: Any, prefix: str = "", _path: str = "") -> None:
    """Check every field of an engine config dataclass (nested ones too) that the table knows; the message names the
    field as `prefix` + its path, e.g. 'saliency.steps'."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        path = f"{_path}{f.name}"
        if dataclasses.is_dataclass(value):
            check_config(value, prefix, f"{path}.")
        elif f.name == "stop_range":
            _check_stop_range(value, prefix + path)
        elif CONFIG_NAMES.get(path, f.name) in RANGES:
            check(CONFIG_NAMES.get(path, f.name), value, prefix + path)


def _check_stop_range(value: Any, path: str) -> None:
    ok = isinstance(value, tuple | list) and len(value) == 2 and all(RANGES["stop_fraction"].allows(v) for v in value)
    if not ok or value[0] > value[1]:
        raise InputRangeError(path, value, "a pair (low, high) with 0 <= low <= high <= 1")
