"""What the engine needs from a host's model, host-agnostic: the UNet (never written), a text encoder, a
differentiable VAE decode, the noise schedule, and optionally an aligner (a CLIP with both towers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn


@dataclasses.dataclass
class DiffusionParts:
    """A text-to-image latent diffusion model as the engine sees it. Hosts build one; nothing here is mutated.

    `denoise(unet_call, latents, t, cond)` runs the UNet through `unet_call` (the engine passes a functional
    call that swaps in base + delta weights); it returns the model output of `prediction_type`.
    """

    unet: nn.Module
    denoise: Callable[[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    encode_text: Callable[[list[str]], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]  # scaled latents -> images in [0, 1], differentiable
    scheduler_config: dict  # a diffusers scheduler config of the model's own noise schedule
    latent_shape: tuple[int, int, int]
    prediction_type: str = "epsilon"  # or "v_prediction" (SD2.x 768)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    name: str = "model"
    check_prompt: Callable[[str], None] | None = None  # raises a clear error for prompts the model cannot read

    def ddim(self, steps: int):
        """A fresh diffusers DDIMScheduler on the model's schedule, set to `steps` sampling steps. It is told the
        model's own prediction type, and callers hand it the model's native output (`guided_output`): converting v to
        eps first would divide by sqrt(alpha_bar), which is 0 at the last step of a zero-terminal-SNR schedule."""
        from diffusers import DDIMScheduler

        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        config["prediction_type"] = self.prediction_type
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        return scheduler

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if not hasattr(self, "_alphas"):
            from diffusers import DDPMScheduler

            config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
            self._alphas = DDPMScheduler.from_config(config).alphas_cumprod.clone()
        return self._alphas

    def _alpha_sigma(self, latents: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast over a batch of latents (float32)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long().reshape(-1)
        a = self.alphas_cumprod[t].to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def eps_from_output(self, output: torch.Tensor, latents: torch.Tensor, t) -> torch.Tensor:
        """Noise prediction from the model output, whatever the model's prediction type (defined at every t)."""
        self._check_prediction_type()
        if self.prediction_type == "epsilon":
            return output
        alpha, sigma = self._alpha_sigma(latents, t)
        return alpha * output + sigma * latents.to(output.dtype)

    def x0_from_output(self, output: torch.Tensor, latents: torch.Tensor, t) -> torch.Tensor:
        """Clean-latent prediction from the model output. For v-prediction it never divides by sqrt(alpha_bar),
        so it stays finite on zero-terminal-SNR schedules."""
        self._check_prediction_type()
        alpha, sigma = self._alpha_sigma(latents, t)
        x = latents.to(output.dtype)
        if self.prediction_type == "epsilon":
            return (x - sigma * output) / alpha
        return alpha * x - sigma * output

    def _check_prediction_type(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r} (epsilon or v_prediction)")


@dataclasses.dataclass
class Aligner:
    """A CLIP with both towers and its joint projection: scores how well images show a prompt."""

    model: nn.Module  # transformers CLIPModel
    tokenizer: object
    image_mean: list[float]
    image_std: list[float]
    image_size: int

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return features_of(self.model.get_text_features(input_ids=ids))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xHxW in [0, 1], differentiable."""
        p = next(self.model.parameters())
        x = images.to(p.device, p.dtype)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return features_of(self.model.get_image_features(pixel_values=(x - mean) / std))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """CLIP score per image: 100 * cosine(image, its prompt)."""
        image = nn.functional.normalize(self.image_features(images), dim=-1)
        text = nn.functional.normalize(self.text_features(prompts), dim=-1).to(image.dtype)
        return 100 * (image * text).sum(-1)


def features_of(out) -> torch.Tensor:
    """transformers 4.x returns a tensor, 5.x a model output whose pooler_output holds the projection."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def from_pipeline(pipe, name: str = "diffusers pipeline", check_prompt=None) -> DiffusionParts:
    """Parts of a diffusers StableDiffusionPipeline (the testbed, or any SD1.x/2.x folder)."""
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device, dtype = unet.device, unet.dtype
    scale = vae.config.scaling_factor

    def encode_text(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        with torch.no_grad():
            return text_encoder(ids)[0].to(device, dtype)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode(latents.to(vae.dtype) / scale).sample
        return ((images + 1) / 2).clamp(0, 1)

    def denoise(unet_call, latents, t, cond):
        return unet_call(latents, t, encoder_hidden_states=cond, return_dict=False)[0]

    channels = unet.config.in_channels
    size = unet.config.sample_size
    return DiffusionParts(
        unet=unet, denoise=denoise, encode_text=encode_text, decode=decode,
        scheduler_config=dict(pipe.scheduler.config), latent_shape=(channels, size, size),
        prediction_type=pipe.scheduler.config.prediction_type, device=device, dtype=dtype, name=name,
        check_prompt=check_prompt,
    )
