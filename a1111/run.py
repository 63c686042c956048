"""One erasure in AUTOMATIC1111, shared by the tab and the API: inputs -> engine job (TRuST or another method of
trust_engine.methods) -> a file in the Lora folder.
The caller holds the queue lock (wrap_gradio_gpu_call for the tab, call_queue.queue_lock for the API)."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import types

import torch

from ..trust_engine import concepts as concept_specs
from ..trust_engine import job, ranges
from . import host

SUBFOLDER_OPTION = "trust_lora_subfolder"
DEFAULT_SUBFOLDER = "TRuST"
ALIGNER_FOLDER = "concept_aligners"  # under the web UI's models folder, as in ComfyUI
NO_ALIGNER = "None (noise-contrast saliency)"
# input -> its name in the table of allowed values (trust_engine.ranges), where they differ
TABLE_NAMES = {"mask_refresh": "mask_every", "training_images": "forget_images"}


@dataclasses.dataclass
class Request:
    """The inputs of TRUST Unlearn, as the tab and POST /trust/v1/unlearn take them. `method`: one of
    trust_engine.methods.names(); the methods other than TRuST read concepts, mode, preserve, seed, resolution,
    file_name and their `method_settings` (key=value lines) and ignore the rest."""

    concepts: str
    mode: str = "individual"
    loss: str = "CIP"
    steps: int = 60
    learning_rate: float = 0.0
    relative_lr: float = 0.1
    beta: float = 0.0
    xi: float = 2.0
    mask_refresh: int = 1
    seed: int = 0
    training_images: int = 32
    resolution: int = 0
    preserve: str = ""
    file_name: str = ""
    aligner: str = ""
    # last, so requests written before the other methods existed keep working (and run TRuST)
    method: str = "trust"
    method_settings: str = ""
    # last: requests without it keep their meaning ("none", the expansion they always had)
    concept_type: str = concept_specs.NO_CONCEPT_TYPE


def web_ui_modules() -> types.SimpleNamespace:
    """The web UI modules the adapter uses (imported only inside the web UI)."""
    from modules import devices, prompt_parser, sd_hijack, sd_models, shared

    try:
        from modules import sd_unet
    except ImportError:
        sd_unet = None
    return types.SimpleNamespace(shared=shared, devices=devices, prompt_parser=prompt_parser, sd_hijack=sd_hijack,
                                 sd_unet=sd_unet, sd_models=sd_models,
                                 paths=sys.modules.get("modules.paths"))


def lora_root(shared) -> str:
    folder = getattr(shared.cmd_opts, "lora_dir", None)
    if folder:
        return folder
    return os.path.join(shared.models_path if hasattr(shared, "models_path") else "models", "Lora")


def delta_folder(shared) -> str:
    sub = str(getattr(shared.opts, SUBFOLDER_OPTION, DEFAULT_SUBFOLDER) or "").strip().strip("/\\")
    if ".." in sub.replace("\\", "/").split("/"):
        raise host.HostModelError(f"the TRuST subfolder setting {sub!r} may not leave the Lora folder")
    return os.path.join(lora_root(shared), sub) if sub else lora_root(shared)


def aligner_root(shared) -> str:
    return os.path.join(os.path.dirname(lora_root(shared)), ALIGNER_FOLDER)


def aligner_names(shared) -> list[str]:
    root = aligner_root(shared)
    if not os.path.isdir(root):
        return []
    return [d for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "config.json"))]


def curves_title(request: Request) -> str:
    name = f"TRuST ({request.loss})" if request.method == "trust" else request.method
    return f"{name}: {request.concepts.strip().splitlines()[0] if request.concepts.strip() else ''}"


def refresh_lora_list() -> None:
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


def unlearn(request: Request, modules=None) -> dict:
    """Train (or reuse) the delta for `request` on the loaded checkpoint with its method and save it in the Lora
    folder. Raises host.Interrupted when interrupted (nothing saved), HostModelError / ValueError for bad inputs."""
    modules = modules or web_ui_modules()
    shared = modules.shared
    ranges.check_inputs({"mode": request.mode, "loss": request.loss.lower(), "steps": request.steps,
                         "learning_rate": request.learning_rate, "beta": request.beta, "xi": request.xi,
                         "mask_refresh": request.mask_refresh, "seed": request.seed, "resolution": request.resolution,
                         "training_images": request.training_images, "relative_lr": request.relative_lr},
                        TABLE_NAMES)
    method = request.method
    config = job.method_config(method, request.method_settings, request.seed)  # None for TRuST
    if not request.concepts.strip():
        raise ValueError("concepts is empty: type what to erase, one concept per line")
    expanded = concept_specs.expand_all(request.concepts, request.mode, preserve=request.preserve,
                                        concept_type=request.concept_type)
    sd_model = shared.sd_model
    family = host.model_family(sd_model, shared.cmd_opts)
    host.check_unet_replacement(getattr(modules, "sd_unet", None))
    resolution = request.resolution or job.NATIVE_RESOLUTION[family]
    folder = delta_folder(shared)
    common = dict(expanded=expanded, folder=folder, file_name=request.file_name, host="AUTOMATIC1111", family=family,
                  resolution=request.resolution,
                  file_metadata=job.kohya_metadata(family, host.prediction_type(sd_model), "", resolution),
                  folder_label=f"the Lora folder ({os.path.relpath(folder, os.path.dirname(lora_root(shared)))})")
    open_parts = functools.partial(host.a1111_parts, sd_model, modules, request.resolution)
    if method == "trust":
        config = job.build_config(request.loss, request.steps, request.learning_rate, request.relative_lr,
                                  request.beta, request.xi, request.mask_refresh, request.seed, request.training_images,
                                  request.method_settings)
        aligner = None
        if request.aligner and request.aligner != NO_ALIGNER:
            from ..trust_engine.loading import load_aligner

            aligner = load_aligner(os.path.join(aligner_root(shared), request.aligner),
                                   next(sd_model.model.diffusion_model.parameters()).device)
        progress = host.HostProgress(shared.state, config.forget_images + config.preserve_images, config.steps,
                                     curves_title(request))
        run_job = functools.partial(job.run_unlearn, config=config, progress=progress, aligner=aligner, **common,
                                    open_parts=functools.partial(open_parts, need_decoder=aligner is not None))
    else:  # the TRuST-only inputs (loss, steps, learning rates, β, ξ, mask refresh, images, aligner) are not read
        progress = host.HostProgress(shared.state, 0, 0, curves_title(request), by_stage=True, label=method)
        # the web UI adds a .diff in the .diff's dtype: float32 ones on a float32 model (--no-half), else float16
        weight = next(sd_model.model.diffusion_model.parameters())
        run_job = functools.partial(job.run_method, method=method, config=config, progress=progress, **common,
                                    open_parts=functools.partial(open_parts, need_decoder=False),
                                    param_dtype=torch.float32 if weight.dtype == torch.float32 else torch.float16)
    with host.attention_for_training(modules.sd_hijack, shared.opts):
        host.restore_lora_patches(sd_model)
        outcome = run_job(base_weights=host.effective_site_weights(sd_model))
    refresh_lora_list()
    name = os.path.splitext(os.path.relpath(outcome.path, lora_root(shared)))[0]
    stem = os.path.splitext(os.path.basename(outcome.path))[0]
    # ESD and SalUn record no curve in their delta: the one drawn live from their steps
    return {"file": outcome.path, "name": name, "tag": f"<lora:{stem}:1>", "report": outcome.report,
            "reused": outcome.reused, "history": outcome.history or progress.history, "family": family,
            "method": method}


def list_deltas(shared) -> list[dict]:
    """The deltas this extension made in the Lora folder, any method (files whose metadata says they are ours)."""
    from safetensors import safe_open

    root = lora_root(shared)
    out = []
    if not os.path.isdir(root):
        return out
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(folder, name)
            try:
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
            except Exception:
                continue
            if not any(k.startswith("trust") for k in meta):
                continue
            stem = os.path.splitext(name)[0]
            out.append({"name": stem, "file": path, "tag": f"<lora:{stem}:1>", "concepts": meta.get("concepts", ""),
                        "loss": meta.get("loss", ""), "method": meta.get("method", "trust"),
                        "base_model": meta.get("ss_base_model_version", ""), "host": meta.get("host", "")})
    return out
