"""UNet view: cross-attention sites get canonical LDM names that map both ways to diffusers names, as diffusers' converter does."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from trust_engine import unet_view
from trust_engine.unet_view import Site, UnknownArchitectureError

torch.set_num_threads(1)

SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
}
SDXL = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "layers_per_block": 2,
}
TINY = {  # the bundled testbed's shape
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
CONFIGS = {"sd15": SD15, "sdxl": SDXL, "tiny": TINY}
# input / output block counts of the LDM UNetModel, as in the original checkpoints: levels * (layers + 1)
LDM_BLOCKS = {"sd15": 12, "sdxl": 9, "tiny": 6}

# The transformer blocks of an original SD1.5 checkpoint (v1-5-pruned.safetensors), written out by hand
SD15_LDM_BLOCKS = [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
SD15_LDM_BLOCKS += [f"output_blocks.{i}.1" for i in range(3, 12)]


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[request.param])
    return request.param, unet


@pytest.fixture(scope="module")
def sd15():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15)


def test_every_attn2_projection_is_a_site_and_names_round_trip(model):
    key, unet = model
    sites = unet_view.find_sites(unet, include_out=True)
    linear = {n for n, m in unet.named_modules() if ".attn2." in n and isinstance(m, torch.nn.Linear)}
    assert {s.diffusers_name for s in sites} == linear
    assert len({s.name for s in sites}) == len(sites)
    for s in sites:
        assert unet_view.ldm_to_diffusers(s.name, unet.config) == s.diffusers_name
        assert unet_view.diffusers_to_ldm(s.diffusers_name, unet.config) == s.name
        weight = unet.get_submodule(s.diffusers_name).weight
        assert (s.out_features, s.in_features) == tuple(weight.shape)
        assert unet_view.site_weight(unet, s) is weight


def test_map_agrees_with_diffusers_ldm_checkpoint_converter(model):
    """Feed our LDM names to diffusers' own LDM -> diffusers converter: it must put each where we say."""
    key, unet = model
    sites = unet_view.find_sites(unet, include_out=True)
    n = LDM_BLOCKS[key]
    ldm = {f"model.diffusion_model.{s.name}.weight": torch.tensor([float(i)]) for i, s in enumerate(sites)}
    # one resnet key per block so the converter sees every block (it counts them)
    for i in range(n):
        ldm[f"model.diffusion_model.input_blocks.{i}.0.in_layers.0.weight"] = torch.zeros(1)
        ldm[f"model.diffusion_model.output_blocks.{i}.0.in_layers.0.weight"] = torch.zeros(1)
    for i in range(3):
        ldm[f"model.diffusion_model.middle_block.{i}.in_layers.0.weight"] = torch.zeros(1)
    converted = convert_ldm_unet_checkpoint(ldm, {"layers_per_block": unet.config.layers_per_block})
    placed = {int(t.item()): k.removesuffix(".weight") for k, t in converted.items() if ".attn2." in k}
    assert placed == {i: s.diffusers_name for i, s in enumerate(sites)}


def test_sd15_has_the_well_known_48_sites(sd15):
    sites = unet_view.find_sites(sd15)
    assert len(sites) == 48 and unet_view.family(sites) == "SD1.x"
    assert {s.name for s in sites} == {
        f"{b}.transformer_blocks.0.attn2.{k}" for b in SD15_LDM_BLOCKS for k in ("to_q", "to_k", "to_v")
    }
    by_name = {s.name: s for s in sites}
    assert by_name["input_blocks.1.1.transformer_blocks.0.attn2.to_k"] == Site(
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "k",
        320,
        768,
    )
    assert by_name["middle_block.1.transformer_blocks.0.attn2.to_q"].diffusers_name == (
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"
    )
    assert by_name["output_blocks.11.1.transformer_blocks.0.attn2.to_v"].diffusers_name == (
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"
    )
    assert by_name["output_blocks.3.1.transformer_blocks.0.attn2.to_v"].diffusers_name == (
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    )
    assert {s.kind for s in sites} == {"q", "k", "v"}


def test_sdxl_has_70_transformer_blocks():
    with torch.device("meta"):
        sites = unet_view.find_sites(UNet2DConditionModel(**SDXL))
    blocks = {s.name.split(".attn2.")[0] for s in sites}
    assert len(blocks) == 70 and len(sites) == 210 and unet_view.family(sites) == "SDXL"
    assert "input_blocks.8.1.transformer_blocks.9.attn2.to_k" in {s.name for s in sites}
    assert unet_view.ldm_to_diffusers("output_blocks.2.1.transformer_blocks.9.attn2.to_k", SDXL) == (
        "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k"
    )
    assert unet_view.ldm_to_diffusers("input_blocks.4.1.transformer_blocks.1.attn2.to_q", SDXL) == (
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_q"
    )


def _ldm_state_dict(key: str, unet: UNet2DConditionModel, prefix: str) -> dict[str, torch.Tensor]:
    """An LDM-layout state dict built independently of the map: block skeleton by hand, attention weights
    placed by diffusers' converter arithmetic (checked in the test above)."""
    lpb = unet.config.layers_per_block
    n = LDM_BLOCKS[key]
    sd = {f"{prefix}input_blocks.{i}.0.weight": torch.empty(1, device="meta") for i in range(n)}
    sd |= {f"{prefix}output_blocks.{i}.0.in_layers.0.weight": torch.empty(1, device="meta") for i in range(n)}
    levels = n // (lpb + 1)
    for level in range(levels - 1):
        sd[f"{prefix}input_blocks.{(level + 1) * (lpb + 1)}.0.op.weight"] = torch.empty(1, device="meta")
        sd[f"{prefix}output_blocks.{level * (lpb + 1) + lpb}.2.conv.weight"] = torch.empty(1, device="meta")
    for site in unet_view.find_sites(unet, include_out=True):
        sd[f"{prefix}{site.name}.weight"] = unet.get_submodule(site.diffusers_name).weight
    return sd


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_ldm_state_dict_sites_match_the_diffusers_model(model, prefix):
    key, unet = model
    sd = _ldm_state_dict(key, unet, prefix)
    assert unet_view.find_sites(sd) == unet_view.find_sites(unet)
    assert unet_view.sites_from_ldm_state_dict(sd, include_out=True) == unet_view.find_sites(unet, include_out=True)
    site = unet_view.find_sites(sd)[0]
    assert unet_view.site_weight(sd, site) is sd[f"{prefix}{site.name}.weight"]


def test_ldm_module_sites_and_weight_access():
    """A module in the LDM layout (like ComfyUI's diffusion_model) is read and written through its own paths."""
    attn2 = torch.nn.Module()
    for k in ("to_q", "to_k", "to_v"):
        setattr(attn2, k, torch.nn.Linear(8 if k == "to_q" else 6, 8, bias=False))
    spatial_transformer = torch.nn.Module()
    spatial_transformer.transformer_blocks = torch.nn.ModuleList([torch.nn.Module()])
    spatial_transformer.transformer_blocks[0].attn2 = attn2
    ldm = torch.nn.Module()  # one level: conv_in, one resnet + transformer; two output blocks
    ldm.input_blocks = torch.nn.ModuleList(
        [
            torch.nn.ModuleList([torch.nn.Conv2d(1, 1, 1)]),
            torch.nn.ModuleList([torch.nn.Identity(), spatial_transformer]),
        ]
    )
    ldm.output_blocks = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Conv2d(1, 1, 1)]) for _ in range(2)])
    sites = unet_view.find_sites(ldm)
    assert [s.name for s in sites] == [f"input_blocks.1.1.transformer_blocks.0.attn2.to_{k}" for k in "qkv"]
    assert sites[1].diffusers_name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert (sites[1].out_features, sites[1].in_features) == (8, 6)
    assert unet_view.site_weight(ldm, sites[1]) is attn2.to_k.weight
    new = torch.full((8, 6), 0.5)
    unet_view.set_site_weight(ldm, sites[1], new)
    assert torch.equal(attn2.to_k.weight, new)
    with pytest.raises(ValueError, match="shape"):
        unet_view.set_site_weight(ldm, sites[1], torch.zeros(6, 8))


def test_unknown_architectures_are_refused_with_what_is_supported():
    with pytest.raises(UnknownArchitectureError, match="SD1.x, SD2.x and SDXL"):
        unet_view.find_sites(torch.nn.Linear(4, 4))
    with pytest.raises(UnknownArchitectureError, match="SimpleCrossAttnDownBlock2D"):
        unet_view.name_map({**SD15, "down_block_types": ("SimpleCrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)})
    with pytest.raises(UnknownArchitectureError, match="no LDM cross-attention keys"):
        unet_view.find_sites({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(UnknownArchitectureError, match="without cross-attention"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(
                **{**TINY, "down_block_types": ("DownBlock2D",) * 3, "up_block_types": ("UpBlock2D",) * 3},
                mid_block_type=None,
            )
        unet_view.find_sites(unet)


def test_names_that_are_not_sites_are_rejected(sd15):
    with pytest.raises(ValueError, match="not a cross-attention site"):
        unet_view.ldm_to_diffusers("input_blocks.3.1.transformer_blocks.0.attn2.to_k", sd15.config)  # a downsampler
    with pytest.raises(ValueError, match="not a cross-attention site"):
        unet_view.diffusers_to_ldm("down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k", sd15.config)
