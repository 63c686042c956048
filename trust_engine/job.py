"""Job logic every host shares around one unlearning run: the settings from the node/tab inputs, the cache key, reuse
of a saved delta with the same key, file naming (never overwriting), the kohya `ss_*` metadata LoRA browsers read,
and the report. Hosts only turn their model into DiffusionParts, bridge progress/interruption and pick the folder.

Both hosts compute the cache key here, so a delta made by one host is reused by the other for the same inputs on
the same base weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from . import __version__, methods
from .concepts import NO_CONCEPT_TYPE
from .delta import PARAM_DTYPE, Delta, fingerprint
from .parts import DiffusionParts
from .ranges import check_config
from .saliency import SaliencyConfig
from .sketch import SKETCH_KEY, sketch
from .unet_view import find_sites
from .unlearn import UnlearnConfig, config_for, unlearn

NATIVE_RESOLUTION = {"SD1.x": 512, "SD2.x": 768, "SDXL": 1024}
# kohya's ss_base_model_version values, which AUTOMATIC1111's Lora tab filters on (sd_v1 / sd_v2 / sdxl_base_v1-0)
KOHYA_VERSION = {"SD1.x": "sd_v1", "SD2.x": "sd_v2", "SDXL": "sdxl_base_v1-0"}


def default_cfg(family: str) -> float:
    return 5.0 if family == "SDXL" else 7.5


# TRuST config fields the hosts show as inputs of their own (field -> input name): method_settings may not set them
_TRUST_INPUTS = {"loss": "loss", "steps": "steps", "lr": "learning_rate", "relative_lr": "relative_lr",
                 "beta": "beta", "seed": "training_seed", "mask_every": "mask_refresh", "static_mask": "mask_refresh",
                 "forget_images": "training_images", "preserve_images": "training_images", "saliency": "xi"}


def trust_settings(settings: str) -> dict[str, Any]:
    """TRuST's `key=value` settings beyond the host's inputs (e.g. 'row_budget=0.15, preserve_projection=0.99');
    a clear error, before any work, for a setting that has an input of its own or is unknown or out of range."""
    values = methods.parse_options("trust", settings) if settings.strip() else {}
    for key in values:
        if key in _TRUST_INPUTS:
            raise ValueError(f"method_settings: {key} is TRuST's {_TRUST_INPUTS[key]} input: set it there (the "
                             "settings take only what has no input of its own)")
    check_config(config_for("cip", **values))
    return values


def build_config(loss: str, steps: int, learning_rate: float, relative_lr: float, beta: float, xi: float,
                 mask_refresh: int, seed: int, training_images: int, settings: str = "") -> UnlearnConfig:
    """The engine config from the inputs TRUST Unlearn (and the AUTOMATIC1111 tab) show, and `settings`: TRuST's
    other settings as method_settings text (trust_settings)."""
    overrides = {"steps": steps, "lr": learning_rate or None, "relative_lr": relative_lr, "seed": seed,
                 "mask_every": mask_refresh, "static_mask": mask_refresh == 0, "forget_images": training_images,
                 "preserve_images": 2 * training_images, **trust_settings(settings)}
    if beta > 0:
        overrides["beta"] = beta
    config = config_for(loss.lower(), **overrides)
    config.saliency = SaliencyConfig(xi=xi)
    return config


def method_config(method: str, settings: str, seed: int) -> Any:
    """The config of a method other than TRuST from its `key=value` settings (methods.parse_options), its seed the
    host's seed input unless the settings name one; None for TRuST, whose config the host builds from its own inputs
    (build_config, which applies TRuST's own settings). A clear error, before any work, for an unknown method or a
    bad setting."""
    if method not in methods.METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(methods.names())}")
    if method == "trust":
        trust_settings(settings)  # checked now, applied by build_config
        return None
    values = methods.parse_options(method, settings)
    if any(f.name == "seed" for f in dataclasses.fields(methods.METHODS[method][0])):
        values.setdefault("seed", seed)
    return methods.config_for(method, **values)


def aligner_id(aligner) -> str:
    if aligner is None:
        return ""
    return getattr(aligner.model.config, "_name_or_path", "") or type(aligner.model).__name__


def mask_digest(mask: dict[str, torch.Tensor] | None) -> str:
    if mask is None:
        return ""
    bits = torch.cat([m.flatten() for _, m in sorted(mask.items())]).to(torch.uint8)
    return hashlib.sha256(bits.numpy().tobytes()).hexdigest()


def _keyed(config) -> dict:
    """The config as the cache key holds it: TRuST fields added later (unlearn.LATER_FIELDS) are left out while they
    hold the value that means what runs did before they existed, so files saved before still match."""
    from .unlearn import LATER_FIELDS, UnlearnConfig

    values = dataclasses.asdict(config)
    if isinstance(config, UnlearnConfig):
        for path, old in LATER_FIELDS.items():
            *parents, leaf = path.split(".")
            owner = values
            for parent in parents:
                owner = owner[parent]
            if owner.get(leaf) == old:
                del owner[leaf]
    return values


def cache_key(expanded, config, resolution: int, aligner_name: str, neurons: str, base_fp: str,
              method: str = "trust") -> str:
    """The inputs that decide a run's result, hashed. `config`: any method's config dataclass. The method is part of
    the key only for the other methods, and the concept types only when one is not "none", so the keys of files
    saved before either existed still match."""
    types = [getattr(e, "concept_type", NO_CONCEPT_TYPE) for e in expanded]
    blob = json.dumps({
        "concepts": [(e.text, e.mode, e.forget, e.preserve, e.anchor) for e in expanded],
        "config": _keyed(config), "resolution": resolution, "aligner": aligner_name,
        "neurons": neurons, "base": base_fp, "engine": __version__, **({"method": method} if method != "trust" else {}),
        **({"concept_types": types} if any(t != NO_CONCEPT_TYPE for t in types) else {}),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def find_cached(folder: str, key: str) -> str | None:
    """A .safetensors file in `folder` (subfolders included) whose metadata holds this cache key."""
    from safetensors import safe_open

    if not os.path.isdir(folder):
        return None
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(root, name)
            try:
                with safe_open(path, framework="pt") as f:
                    if (f.metadata() or {}).get("cache_key") == key:
                        return path
            except Exception:  # not ours or unreadable: simply not a cache hit
                continue
    return None


def slug(text: str, method: str = "trust") -> str:
    """The default file name: trust_<concept>, or trust_<method>_<concept> for the other methods."""
    prefix = "trust_" if method == "trust" else f"trust_{method}_"
    return prefix + (re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "concept")


def free_path(folder: str, name: str) -> str:
    """folder/name.safetensors, or name_2, name_3, ... : an existing file is never overwritten."""
    name = os.path.basename(name.strip()).removesuffix(".safetensors") or "trust_delta"
    path = os.path.join(folder, name + ".safetensors")
    number = 1
    while os.path.exists(path):
        number += 1
        path = os.path.join(folder, f"{name}_{number}.safetensors")
    return path


def kohya_metadata(family: str, prediction_type: str, output_name: str, resolution: int) -> dict[str, str]:
    """The kohya ss_* keys AUTOMATIC1111's Lora tab reads (version filter, alias, SD2 v-prediction)."""
    return {"ss_base_model_version": KOHYA_VERSION[family], "ss_v2": str(family == "SD2.x"),
            "ss_output_name": output_name, "ss_network_module": "networks.lora",
            "ss_resolution": f"({resolution}, {resolution})", "ss_v_parameterization":
            str(prediction_type == "v_prediction"), "ss_training_comment": "TRuST concept erasure delta"}


def save(delta: Delta, folder: str, name: str, extra_metadata: dict[str, str] | None = None,
         param_dtype: torch.dtype | None = None) -> str:
    """Save under a free name in `folder`; `param_dtype`: the dtype of dense differences (Delta.to_lora's default
    when None)."""
    os.makedirs(folder, exist_ok=True)
    path = free_path(folder, name)
    stem = os.path.splitext(os.path.basename(path))[0]
    metadata = {k: (stem if k == "ss_output_name" else v) for k, v in (extra_metadata or {}).items()}
    dataclasses.replace(delta, metadata={**delta.metadata, **metadata}).save(path, param_dtype or PARAM_DTYPE)
    return path


def share_line(delta: Delta, unet) -> str:
    """How much of the model the delta changes: Q/K/V rows and, for the methods that change other weights, those."""
    sites = find_sites(unet)
    rows = sum(s.out_features for s in sites)
    changed = sum(d.rank for d in delta.sites.values())
    weights = sum(s.out_features * s.in_features for s in sites)
    changed_w = sum(d.rank * d.in_features for d in delta.sites.values())
    text = (f"changed {changed} of {rows} Q/K/V rows ({100 * changed_w / max(1, weights):.2f}% of the cross-attention "
            f"Q/K/V weights) in {len(delta.sites)} of {len(sites)} layers")
    if delta.params:
        total = sum(p.numel() for p in unet.parameters())
        dense = sum(int((d != 0).sum()) for d in delta.params.values())
        text += f"; {dense:,} other weights ({100 * dense / max(1, total):.2f}% of the UNet) in {len(delta.params)} tensors"
    return text


def saliency_line(mode: str, how_to_get_clip: str) -> str:
    """The report's saliency line; `mode` as a TRuST delta records it, `how_to_get_clip` in the host's words."""
    return "saliency: " + ("CLIP score" if mode == "clip" else
                           f"noise contrast ({how_to_get_clip} for CLIP-score saliency)" if mode == "noise" else mode)


@dataclasses.dataclass
class JobOutcome:
    delta: Delta
    path: str
    history: list[dict]
    report: str
    reused: bool


def run_unlearn(*, expanded, config: UnlearnConfig, base_weights: dict[str, torch.Tensor], folder: str,
                file_name: str, open_parts: Callable[[], AbstractContextManager[DiffusionParts]], progress,
                host: str, family: str, resolution: int, aligner=None, initial_mask=None,
                file_metadata: dict[str, str] | None = None, folder_label: str = "") -> JobOutcome:
    """Reuse the saved delta for these inputs, or train one (through `open_parts`) and save it. Nothing is written
    when training raises (an interruption included). `base_weights`: the site weights the host samples with."""
    base_fp = fingerprint(base_weights)
    key = cache_key(expanded, config, resolution, aligner_id(aligner), mask_digest(initial_mask), base_fp)
    lines = [e.explain() for e in expanded]
    where = folder_label or folder
    found = find_cached(folder, key)
    if found:
        delta = Delta.load(found)
        history = json.loads(delta.metadata.get("history", "[]"))
        lines.insert(0, f"Reused {os.path.basename(found)}: same inputs on the same base model, so nothing was "
                        f"retrained. Delete the file ({where}) to train again.")
        return JobOutcome(delta, found, history, "\n".join(lines), True)
    with open_parts() as parts:
        result = unlearn(parts, expanded, config, aligner, progress,
                         {"mode": expanded[0].mode, "model": parts.name, "cache_key": key, "host": host,
                          SKETCH_KEY: sketch(base_weights)},
                         default_cfg=default_cfg(family), initial_mask=initial_mask)
        share = share_line(result.delta, parts.unet)
    delta = dataclasses.replace(result.delta, metadata={**result.delta.metadata,
                                                        "history": json.dumps(result.history)})
    path = save(delta, folder, file_name or slug(expanded[0].text), file_metadata)
    lines.insert(0, f"Saved {os.path.basename(path)} in {where}.")
    mode = result.last_saliency.mode if result.last_saliency else "initial mask only"
    lines += [result.report(), saliency_line(mode, "choose an aligner"), share]
    return JobOutcome(delta, path, result.history, "\n".join(lines), False)


def run_method(*, method: str, expanded, config, base_weights: dict[str, torch.Tensor], folder: str, file_name: str,
               open_parts: Callable[[], AbstractContextManager[DiffusionParts]], progress, host: str, family: str,
               resolution: int, file_metadata: dict[str, str] | None = None, folder_label: str = "",
               param_dtype: torch.dtype | None = None) -> JobOutcome:
    """run_unlearn for the other methods (`method_config` gives their config): reuse the saved delta for these inputs,
    or run the method through methods.run and save it (default name trust_<method>_<concept>; dense differences in
    `param_dtype`, see `save`). The report names the method and its settings. `history`: the delta's recorded curve,
    empty for methods that record none."""
    base_fp = fingerprint(base_weights)
    key = cache_key(expanded, config, resolution, "", "", base_fp, method)
    lines = [e.explain() for e in expanded]
    where = folder_label or folder
    found = find_cached(folder, key)
    if found:
        delta = Delta.load(found)
        lines.insert(0, f"Reused {os.path.basename(found)}: same inputs on the same base model, so nothing was "
                        f"re-run. Delete the file ({where}) to run {method} again.")
        lines.append(methods.report(delta))
        return JobOutcome(delta, found, json.loads(delta.metadata.get("history", "[]")), "\n".join(lines), True)
    with open_parts() as parts:
        delta = methods.run(method, parts, expanded, config, progress, default_cfg=default_cfg(family),
                            metadata={"mode": expanded[0].mode, "model": parts.name, "cache_key": key, "host": host,
                                      SKETCH_KEY: sketch(base_weights)})
        share = share_line(delta, parts.unet)
    path = save(delta, folder, file_name or slug(expanded[0].text, method), file_metadata, param_dtype)
    lines.insert(0, f"Saved {os.path.basename(path)} in {where}.")
    lines += [methods.report(delta), f"settings: {delta.metadata.get('config', '')}", share]
    return JobOutcome(delta, path, json.loads(delta.metadata.get("history", "[]")), "\n".join(lines), False)
