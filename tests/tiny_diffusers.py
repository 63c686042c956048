"""Small random-init diffusers models built on the spot (no download): an SD2-style v-prediction pipeline folder, an
SDXL pipeline folder and an in-memory SD1.5-layout pipeline, with the testbed's tokenizer. Shapes follow their
families at toy width; the weights mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "trust_engine" / "testbed" / "weights" / "pipeline" / "tokenizer"


# build_sdxl's UNet: SDXL's layout (no attention at the first level, 2 transformer blocks at the last) at toy width
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=16 + 32, attention_head_dim=(2, 4),
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=6 * 4 + 24,
)


class LdmCallUNet:
    """Mixin for a diffusers UNet2DConditionModel called the way ldm / sgm / ComfyUI call their UNet: (x, timesteps,
    context, y), `y` the ADM vector (pooled text + size embeddings), which the UNet's label embedding (diffusers:
    add_embedding) takes as it is. The hosts' fakes build on it."""

    def ldm_call(self, x, timesteps=None, context=None, y=None):
        added = {"y": y} if y is not None else None
        return super().forward(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added,
                               return_dict=False)[0]

    def get_aug_embed(self, emb, encoder_hidden_states, added_cond_kwargs):
        if added_cond_kwargs and "y" in added_cond_kwargs:
            return self.add_embedding(added_cond_kwargs["y"].to(emb.dtype))
        return super().get_aug_embed(emb, encoder_hidden_states, added_cond_kwargs)


def _tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER)


def _text_config(tokenizer, hidden: int, projection: int = 16, layers: int = 3):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, projection_dim=projection, hidden_act="gelu")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, sample_size=16)


def build_sd2_v(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder shaped like SD2.x-768-v: linear projections, v-prediction DDIM schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def sd15_unet(seed: int = 0):
    """A UNet2DConditionModel with SD1.5's layout at toy width: diffusers' default block types (three cross-attention
    down levels, a plain one, mirrored up), two layers per level, 16 transformer blocks, one per attention, and
    SD1.x's text width 768."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8, 16, 16),
                                layers_per_block=2, cross_attention_dim=768, attention_head_dim=2, norm_num_groups=4)


def sd15_pipeline(seed: int = 0):
    """An in-memory StableDiffusionPipeline around sd15_unet (a toy 768-wide text encoder, DDIM epsilon schedule)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet = sd15_unet(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, 768, layers=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl_unet(seed: int = 0):
    """The UNet of build_sdxl, alone."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SDXL_UNET)


def sdxl_pipeline(seed: int = 0):
    """An in-memory StableDiffusionXLPipeline: two text encoders (the second with a projection: pooled embeds), a UNet
    with text_time added conditioning, an epsilon schedule, force_zeros_for_empty_prompt as in SDXL base."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, 16))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, 32, projection=24))
    unet = UNet2DConditionModel(**SDXL_UNET)
    # SDXL base ships an EulerDiscreteScheduler config; the engine builds its own DDIM from the same schedule
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline folder of `sdxl_pipeline`."""
    sdxl_pipeline(seed).save_pretrained(folder)
    return folder
