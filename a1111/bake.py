"""Bake: a new checkpoint file with a TRuST delta merged into the base weights, for moderators who distribute a model
rather than a delta (the web UI has no built-in way to merge a LoRA into a checkpoint). Shared by the tab's Bake
button and POST /trust/v1/bake; the caller holds the queue lock.

The base is the loaded checkpoint's file, read again from disk (the web UI's own reader, so .ckpt goes through its
safe unpickler); the loaded model is never touched. Every tensor but the delta's is written unchanged; the delta's
are base + strength x difference, summed in float32 and rounded once to the file's dtype. Refused, before anything
is written, when the file's Q/K/V weights are not the ones the delta was made for. A model config (.yaml) beside
the base checkpoint is copied beside the new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from ..trust_engine import ranges
from ..trust_engine.delta import Delta, fingerprint
from ..trust_engine.job import free_path
from ..trust_engine.unet_view import LDM_PREFIXES, UnknownArchitectureError, find_sites, site_weights
from . import delta_script, host, run


@dataclasses.dataclass
class BakeRequest:
    """The inputs of Bake, as the tab and POST /trust/v1/bake take them."""

    delta: str  # a TRuST delta in the Lora folder, by its tag name (as GET /trust/v1/deltas lists them)
    strength: float = 1.0
    file_name: str = ""  # the new checkpoint's name; empty = "<checkpoint>_<delta>"


def checkpoint_folder(modules) -> str:
    folder = getattr(modules.shared.cmd_opts, "ckpt_dir", None)
    return folder or modules.sd_models.model_path


def _unet_prefix(state) -> str:
    sites = find_sites(state)
    probe = sites[0].name + ".weight"
    return next(p for p in LDM_PREFIXES if p + probe in state)


def _unshared(state: dict) -> dict:
    """safetensors refuses tensors that share memory (possible in a .ckpt): give each key its own contiguous tensor."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        t = tensor.detach()
        where = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if where is not None and where in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        elif where is not None:
            seen.add(where)
        out[key] = t
    return out


def bake(request: BakeRequest, modules=None) -> dict:
    """Write <checkpoint folder>/<name>.safetensors = the loaded checkpoint's file + strength x the delta; refresh the
    checkpoint list. Raises ValueError (bad input, another base model), host.Interrupted (nothing written)."""
    from safetensors.torch import save_file

    modules = modules or run.web_ui_modules()
    shared, sd_models = modules.shared, modules.sd_models
    ranges.check_inputs({"strength": request.strength})
    if not request.delta or request.delta == delta_script.NONE:
        raise ValueError("choose the TRuST delta to bake")
    delta_path = delta_script.delta_file(shared, request.delta)
    delta = Delta.load(delta_path)
    sd_model = shared.sd_model
    info = getattr(sd_model, "sd_checkpoint_info", None) if sd_model is not None else None
    if info is None or not os.path.isfile(getattr(info, "filename", "") or ""):
        raise ValueError("no checkpoint file is loaded: choose one in the Stable Diffusion checkpoint list")
    folder = checkpoint_folder(modules)
    stem = os.path.splitext(os.path.basename(info.filename))[0]
    name = os.path.basename(request.file_name.strip()).removesuffix(".safetensors") or f"{stem}_{request.delta}"
    state_obj = shared.state
    state_obj.job, state_obj.job_count, state_obj.job_no = "TRuST bake", 1, 0
    state_obj.sampling_steps, state_obj.sampling_step = 3, 0

    def stage(step: int, text: str) -> None:
        if state_obj.interrupted or getattr(state_obj, "stopping_generation", False):
            raise host.Interrupted("interrupted: no checkpoint was written")
        state_obj.sampling_step, state_obj.textinfo = step, f"TRuST bake: {text}"

    stage(0, f"reading {os.path.basename(info.filename)}")
    state = dict(sd_models.read_state_dict(info.filename, map_location="cpu"))
    stage(1, f"merging {request.delta}")
    try:
        prefix = _unet_prefix(state)
        base_fp = fingerprint(site_weights(state, find_sites(state)))
    except UnknownArchitectureError as e:
        raise ValueError(f"{os.path.basename(info.filename)}: {e}") from None
    if delta.base_fingerprint and delta.base_fingerprint != base_fp:
        raise ValueError(
            f"{request.delta} was made for another base model (fingerprint {delta.base_fingerprint[:12]}) than "
            f"{os.path.basename(info.filename)} ({base_fp[:12]}): nothing was written. Load the checkpoint the delta "
            f"was trained on, or retrain the delta on this one.")
    names = list(delta.diffs())
    params = {n: state[prefix + n] for n in names if prefix + n in state}
    merged = delta.apply_to_params(params, float(request.strength))  # BaseMismatchError (a ValueError) if missing
    for n, tensor in merged.items():
        state[prefix + n] = tensor
    stage(2, "writing")
    path = free_path(folder, name)
    os.makedirs(folder, exist_ok=True)
    metadata = {"trust_baked_delta": os.path.basename(delta_path), "trust_bake_strength": f"{float(request.strength):g}",
                "trust_bake_base": os.path.basename(info.filename), "trust_bake_base_fingerprint": base_fp,
                "trust_bake_concepts": delta.metadata.get("concepts", ""), "format": "pt"}
    partial = path + ".partial"
    try:
        save_file(_unshared(state), partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    config = os.path.splitext(info.filename)[0] + ".yaml"
    if os.path.isfile(config):  # the web UI reads a checkpoint's model config from a .yaml beside it: the new one too
        shutil.copyfile(config, os.path.splitext(path)[0] + ".yaml")
    state_obj.sampling_step = 3
    sd_models.list_models()  # the new file shows in the checkpoint list at once
    changed = sum(int((merged[n] != params[n]).any(dim=-1).sum()) if merged[n].dim() > 1 else
                  int((merged[n] != params[n]).sum()) for n in merged)
    report = (f"Baked {os.path.basename(delta_path)} (strength {float(request.strength):g}, erases "
              f"{', '.join(json.loads(delta.metadata.get('concepts', '[]')) or ['?'])}) into "
              f"{os.path.basename(info.filename)}: wrote {os.path.basename(path)} in the checkpoint folder "
              f"({len(merged)} tensors changed, {changed} rows). The loaded model is unchanged: choose the new "
              f"checkpoint in the list to use it; do not also apply the delta's <lora:...> tag on it.")
    return {"file": path, "name": os.path.splitext(os.path.basename(path))[0], "report": report}
