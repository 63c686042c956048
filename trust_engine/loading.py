"""The user's own checkpoint for the CLI: a diffusers Stable Diffusion folder (SD1.x, SD2.x incl. v-prediction, SDXL)
and a transformers CLIP folder as the aligner, on a chosen device and dtype. Every input is checked before loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from .parts import Aligner, DiffusionParts, from_pipeline, native_resolution

# pipeline class in model_index.json -> the components the engine needs from the folder
PIPELINES = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                  "scheduler"),
}
DEFAULT_CFG = {"SDXL": 5.0}  # the pipelines' own default guidance scales (StableDiffusionPipeline: 7.5)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A --model, --aligner, --device or --dtype the CLI cannot use; the message says what is wrong and what to pass."""


@dataclasses.dataclass
class ModelFolder:
    path: Path
    pipeline_class: str
    family: str  # "SD1.x", "SD2.x", "SDXL", or "SD-shaped" for other text widths (e.g. a small test model)
    prediction_type: str


@dataclasses.dataclass
class LoadedModel:
    pipe: object
    parts: DiffusionParts
    folder: ModelFolder
    cfg: float
    resolution: int


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is not readable JSON ({e})") from None


def inspect_model(folder: str | os.PathLike[str]) -> ModelFolder:
    """What kind of diffusers folder this is, from its model_index.json and component configs; nothing is loaded."""
    path = Path(folder)
    hint = ("--model takes a diffusers Stable Diffusion folder (the one holding model_index.json, unet/, vae/, "
            "text_encoder/ ...), e.g. what StableDiffusionPipeline.save_pretrained writes")
    if not path.exists():
        raise CheckpointError(f"--model {path} does not exist; {hint}")
    if not path.is_dir():
        raise CheckpointError(f"--model {path} is a file, not a folder; {hint}. A single .safetensors/.ckpt "
                              f"checkpoint must first be converted with diffusers (from_single_file + save_pretrained)")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"--model {path} has no model_index.json; {hint}")
    index = _read_json(index_path, "model index")
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise CheckpointError(f"--model {path} holds a {name}; the engine supports {' and '.join(PIPELINES)} "
                              f"folders (SD1.x, SD2.x, SDXL)")
    missing = [c for c in PIPELINES[name] if not (path / c).is_dir() or not isinstance(index.get(c), list)
               or index[c][0] is None]
    if missing:
        raise CheckpointError(f"--model {path} ({name}) lacks the component(s) {', '.join(missing)}")
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"--model {path} predicts {prediction!r}; the engine supports epsilon and v_prediction")
    if name == "StableDiffusionXLPipeline":
        family = "SDXL"
    else:
        width = _read_json(path / "unet" / "config.json", "UNet config").get("cross_attention_dim")
        family = {768: "SD1.x", 1024: "SD2.x"}.get(width, "SD-shaped")
    return ModelFolder(path, name, family, prediction)


def inspect_aligner(folder: str | os.PathLike[str]) -> Path:
    """Check that --aligner is a transformers CLIPModel folder (both towers and the image preprocessing)."""
    path = Path(folder)
    hint = "--aligner takes a transformers CLIPModel folder (config.json, model weights, tokenizer, preprocessor_config.json)"
    if not path.is_dir():
        raise CheckpointError(f"--aligner {path} is not a folder; {hint}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"--aligner {path} has no config.json; {hint}")
    model_type = _read_json(path / "config.json", "aligner config").get("model_type")
    if model_type != "clip":
        raise CheckpointError(f"--aligner {path} is a {model_type!r} model; the aligner must be a CLIPModel "
                              f"(model_type 'clip', with both the text and the image tower)")
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"--aligner {path} has no preprocessor_config.json (the image mean, std and size)")
    return path


def resolve_device(name: str = "auto") -> torch.device:
    """auto = CUDA if available, else MPS if available, else CPU; an unavailable choice is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda: this torch has no CUDA device available (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise CheckpointError("--device mps: MPS is not available here (use --device cpu or auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise CheckpointError(f"--device {name}: use auto, cpu, cuda or mps")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = float16 on CUDA (how SD checkpoints are run there), float32 otherwise."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CheckpointError(f"--dtype {name}: use auto, float32, float16 or bfloat16")
    return DTYPES[name]


def load_model(folder: str | os.PathLike[str], device: torch.device, dtype: torch.dtype, clip_skip: int | None = None,
               resolution: int | None = None) -> LoadedModel:
    """Load a checked folder with the stock DiffusionPipeline.from_pretrained (offline) and build its parts.
    The SDXL VAE stays in float32 when its config asks for it (force_upcast), as StableDiffusionXLPipeline does."""
    info = inspect_model(folder)
    if resolution is not None:
        vae = _read_json(info.path / "vae" / "config.json", "VAE config")
        factor = 2 ** (len(vae.get("block_out_channels", (0,))) - 1)  # what the pipelines call vae_scale_factor
        if resolution <= 0 or resolution % factor:
            raise CheckpointError(f"--resolution must be a positive multiple of {factor} (this VAE's scale factor), "
                                  f"got {resolution}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype; older ones know only torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(info.path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"could not load --model {info.path} with diffusers: {e}") from None
    if info.family == "SDXL" and dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16; the pipeline itself decodes it in float32
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():  # the CLI's own copy: frozen, no gradients into its weights
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe = pipe.to(device)
    size = resolution or native_resolution(pipe)
    parts = from_pipeline(pipe, name=f"{info.path.name} ({info.family}, {info.prediction_type})",
                          clip_skip=clip_skip, resolution=size)
    return LoadedModel(pipe, parts, info, DEFAULT_CFG.get(info.family, 7.5), size)


def load_aligner(folder: str | os.PathLike[str], device: torch.device) -> Aligner:
    """A transformers CLIPModel folder as the engine's Aligner (float32: it scores and back-propagates)."""
    from .testbed import bundle

    path = inspect_aligner(folder)
    try:
        model, tokenizer, processor = bundle.load_aligner(path, device=device)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"could not load --aligner {path} with transformers: {e}") from None
    return Aligner(model.requires_grad_(False), tokenizer, list(processor.image_mean), list(processor.image_std),
                   int(processor.crop_size["height"]))
