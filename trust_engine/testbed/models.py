"""Architectures of the testbed's parts: real diffusers/transformers classes at toy sizes, plus the judge CNN.
Sizes are chosen so all of it trains on 2 CPU cores within the budget of `python -m trust_engine.testbed.train`.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from . import world
from .tokenizer import MAX_LENGTH

TEXT_WIDTH = 128
LATENT_CHANNELS = 4
LATENT_SIZE = world.IMAGE_SIZE // 4


def aligner(vocab_size: int) -> CLIPModel:
    """The testbed's CLIP: both towers and the joint projection; its text tower is the UNet's text encoder."""
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=world.IMAGE_SIZE,
            patch_size=4,
            num_channels=3,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        projection_dim=128,
    )
    return CLIPModel(config)


def image_processor() -> CLIPImageProcessor:
    """Pre-processing the aligner expects (saved with it, read the same way a real CLIP's is)."""
    size = world.IMAGE_SIZE
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def vae() -> AutoencoderKL:
    """32x32x3 pixels <-> 8x8x4 latents, like SD's VAE at a 4x (not 8x) reduction."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=world.IMAGE_SIZE,
    )


def unet() -> UNet2DConditionModel:
    """SD-shaped UNet: cross-attention transformer blocks (attn2 to_q/to_k/to_v, ff.net) at two resolutions."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def train_scheduler() -> DDPMScheduler:
    """SD's noise schedule (scaled-linear betas, 1000 steps, epsilon prediction)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler.from_config(train_scheduler().config, set_alpha_to_one=False, steps_offset=1)


class Judge(nn.Module):
    """Independent yardstick: a small CNN that reads layout, and shape and colour of up to two objects.

    Object slots follow `world.render`'s reading order: slot 0 is the single object, the upper object of
    "on", or the left object of "next to".
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            )

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.trunk = nn.Sequential(nn.Linear(16 * width, 256), nn.ReLU())
        n_s, n_c = len(world.SHAPE_NAMES), len(world.COLOUR_NAMES)
        self.head = nn.Linear(256, len(world.LAYOUTS) + 2 * (n_s + n_c))
        self.splits = [len(world.LAYOUTS), n_s, n_c, n_s, n_c]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: Bx3xHxW in [0, 1]. Returns logits [layout, shape0, colour0, shape1, colour1]."""
        return list(self.head(self.trunk(self.features(images * 2 - 1))).split(self.splits, dim=1))

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[world.Scene]:
        """What each image shows, as a concrete Scene."""
        layout, s0, c0, s1, c1 = (t.argmax(1).tolist() for t in self(images))
        scenes = []
        for i, lay in enumerate(layout):
            objects = [
                world.Obj(world.SHAPE_NAMES[s0[i]], world.COLOUR_NAMES[c0[i]]),
                world.Obj(world.SHAPE_NAMES[s1[i]], world.COLOUR_NAMES[c1[i]]),
            ]
            name = world.LAYOUTS[lay]
            count = {"empty": 0, "single": 1}.get(name, 2)
            scenes.append(world.Scene(tuple(objects[:count]), name if count == 2 else None))
        return scenes
