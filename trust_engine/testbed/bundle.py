"""Loading the bundled testbed: the diffusers pipeline, the aligner (a transformers CLIPModel) and the judge.
All offline, from the weights committed inside the package; nothing is ever fetched from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import paths
from .models import Judge


class MissingWeightsError(FileNotFoundError):
    """The bundled weights are not where the package expects them."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise MissingWeightsError(
            f"testbed weights not found at {path}. They ship with the repository; if you deleted them, "
            f"rebuild them with `python -m trust_engine.testbed.train` (about 1.5 h on 2 CPU cores)."
        )
    return path


def load_pipeline(folder: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The text-to-image model as a stock `StableDiffusionPipeline` (the bundled one by default)."""
    from diffusers import StableDiffusionPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = _require(Path(folder) if folder else paths.PIPELINE)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    _reload_flat_text_encoder(pipe.text_encoder, folder / "text_encoder" / "model.safetensors")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _reload_flat_text_encoder(encoder, weights: Path) -> None:
    """The bundled text encoder was saved by transformers 5, whose CLIPTextModel has no `text_model.` level; older
    transformers (AUTOMATIC1111 pins 4.30.2) then load none of its weights (and only warn). Load them here."""
    if not hasattr(encoder, "text_model") or not weights.exists():
        return
    state = load_file(str(weights))
    if not state or any(k.startswith("text_model.") for k in state):
        return
    prefixed = {f"text_model.{k}": v for k, v in state.items()}
    wanted = encoder.state_dict()
    missing = [k for k in wanted if k not in prefixed and not k.endswith("position_ids")]
    if missing:
        raise MissingWeightsError(f"the bundled text encoder does not fit this transformers version (missing {missing[0]})")
    encoder.load_state_dict({k: v.to(wanted[k].dtype) for k, v in prefixed.items()}, strict=False)


def load_aligner(folder: str | Path | None = None, device: str | torch.device = "cpu"):
    """(CLIPModel, CLIPTokenizer, CLIPImageProcessor) of the aligner."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = _require(Path(folder) if folder else paths.ALIGNER)
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
    return model, CLIPTokenizer.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)


def load_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
    judge = Judge()
    judge.load_state_dict(load_file(_require(Path(path) if path else paths.JUDGE)))
    return judge.eval().requires_grad_(False).to(device)


def load_parts(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, folder: str | Path | None = None):
    """(pipeline, engine DiffusionParts, engine Aligner) of the bundled testbed; prompts are vocabulary-checked."""
    from ..parts import Aligner, from_pipeline
    from . import world

    pipe = load_pipeline(folder, device, dtype)
    parts = from_pipeline(pipe, name="bundled testbed", check_prompt=world.check_words)
    model, tokenizer, processor = load_aligner(device=device)
    aligner = Aligner(model.requires_grad_(False), tokenizer, list(processor.image_mean), list(processor.image_std),
                      int(processor.crop_size["height"]))
    return pipe, parts, aligner
