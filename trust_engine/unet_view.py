"""UNet view: the cross-attention sites (attn2 to_q/to_k/to_v, optionally to_out.0) of a Stable-Diffusion UNet.
A site is named by its LDM path (what ComfyUI and AUTOMATIC1111 use); a two-way map gives diffusers' names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

SiteKind = Literal["q", "k", "v", "out"]

SUPPORTED = (
    "SD1.x, SD2.x and SDXL UNets (diffusers UNet2DConditionModel built from CrossAttnDownBlock2D/DownBlock2D, "
    "UNetMidBlock2DCrossAttn and CrossAttnUpBlock2D/UpBlock2D, or the LDM UNetModel layout of ComfyUI, "
    "AUTOMATIC1111 and single-file checkpoints)"
)

_KINDS: dict[str, SiteKind] = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has cross-attention
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False, None: False}
# diffusers' own defaults, for configs that leave a key out
_DEFAULTS: dict[str, Any] = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
}
LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")

_LDM_SITE = re.compile(
    r"(?P<block>input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
    r"\.transformer_blocks\.(?P<j>\d+)\.attn2\.(?P<kind>to_q|to_k|to_v|to_out\.0)"
)
_LDM_KEY = re.compile(
    r"(?P<prefix>model\.diffusion_model\.|diffusion_model\.)?(?P<name>" + _LDM_SITE.pattern + r")\.weight"
)


class UnknownArchitectureError(ValueError):
    """The model has no cross-attention sites, or a layout this engine does not map."""


@dataclass(frozen=True)
class Site:
    """One cross-attention linear layer. `name` is canonical (LDM path); the weight is out_features x in_features."""

    name: str
    diffusers_name: str
    kind: SiteKind
    out_features: int
    in_features: int


@dataclass(frozen=True)
class _Layout:
    """Transformer depth of every attention slot, level by level (0 = that layer has no cross-attention)."""

    down: tuple[tuple[int, ...], ...]  # per down level: one entry per resnet layer
    mid: int
    up: tuple[tuple[int, ...], ...]  # per up level: layers_per_block + 1 entries


def _unknown(found: str) -> UnknownArchitectureError:
    return UnknownArchitectureError(f"{found}. Supported: {SUPPORTED}.")


def _per_layer(spec: Any, num_layers: int) -> tuple[int, ...]:
    if isinstance(spec, int):
        return (spec,) * num_layers
    spec = tuple(int(d) for d in spec)
    if len(spec) != num_layers:
        raise _unknown(f"transformer_layers_per_block entry {spec} does not have one depth per layer ({num_layers})")
    return spec


def _layout_from_config(config: Mapping[str, Any]) -> _Layout:
    cfg = {**_DEFAULTS, **{k: v for k, v in dict(config).items() if v is not None or k == "mid_block_type"}}
    # diffusers accepts 'UNetRes'-prefixed block names as aliases
    down_types = [t[7:] if t.startswith("UNetRes") else t for t in cfg["down_block_types"]]
    up_types = [t[7:] if t.startswith("UNetRes") else t for t in cfg["up_block_types"]]
    bad = [t for t in down_types if t not in _DOWN_BLOCKS] + [t for t in up_types if t not in _UP_BLOCKS]
    if cfg.get("mid_block_type") not in _MID_BLOCKS:
        bad.append(str(cfg.get("mid_block_type")))
    if bad or len(down_types) != len(up_types) or cfg.get("dual_cross_attention"):
        raise _unknown(
            f"found a UNet with down blocks {down_types}, mid block {cfg.get('mid_block_type')}, up blocks {up_types}"
            + (", dual cross-attention" if cfg.get("dual_cross_attention") else "")
        )
    n = len(down_types)
    lpb = cfg["layers_per_block"]
    lpb = [lpb] * n if isinstance(lpb, int) else list(lpb)
    tl = cfg["transformer_layers_per_block"]
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    rtl = cfg.get("reverse_transformer_layers_per_block") or list(reversed(tl))
    rlpb = list(reversed(lpb))
    down = tuple(_per_layer(tl[b], lpb[b]) if _DOWN_BLOCKS[t] else (0,) * lpb[b] for b, t in enumerate(down_types))
    up = tuple(
        _per_layer(rtl[b], rlpb[b] + 1) if _UP_BLOCKS[t] else (0,) * (rlpb[b] + 1) for b, t in enumerate(up_types)
    )
    # the mid block has a single attention layer, whose depth is the last level's
    mid_depth = tl[-1] if isinstance(tl[-1], int) else tl[-1][0]
    mid = mid_depth if _MID_BLOCKS[cfg.get("mid_block_type")] else 0
    return _Layout(down, mid, up)


def _name_table(layout: _Layout, include_out: bool) -> dict[str, str]:
    """Canonical LDM name -> diffusers name, in forward order. Index arithmetic as in diffusers' converter:
    input block = 1 + sum over earlier levels of (layers + 1 downsampler) + layer; output block likewise, no gap."""
    kinds = [k for k in _KINDS if include_out or k != "to_out.0"]
    slots: list[tuple[str, str, int]] = []
    index = 1  # input_blocks.0 is conv_in
    for b, level in enumerate(layout.down):
        for layer, depth in enumerate(level):
            slots.append((f"input_blocks.{index}.1", f"down_blocks.{b}.attentions.{layer}", depth))
            index += 1
        index += 1  # the level's downsampler is an input block of its own
    slots.append(("middle_block.1", "mid_block.attentions.0", layout.mid))
    index = 0  # an up level's upsampler sits inside its last output block
    for b, level in enumerate(layout.up):
        for layer, depth in enumerate(level):
            slots.append((f"output_blocks.{index}.1", f"up_blocks.{b}.attentions.{layer}", depth))
            index += 1
    return {
        f"{ldm}.transformer_blocks.{j}.attn2.{k}": f"{dif}.transformer_blocks.{j}.attn2.{k}"
        for ldm, dif, depth in slots
        for j in range(depth)
        for k in kinds
    }


def name_map(config: Mapping[str, Any], include_out: bool = True) -> dict[str, str]:
    """Every site of a UNet with this diffusers config: canonical LDM name -> diffusers module name."""
    return _name_table(_layout_from_config(config), include_out)


def ldm_to_diffusers(name: str, config: Mapping[str, Any]) -> str:
    """`input_blocks.1.1.transformer_blocks.0.attn2.to_k` -> `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`."""
    table = name_map(config)
    if name not in table:
        raise ValueError(f"{name!r} is not a cross-attention site of this UNet (it has {len(table)} sites)")
    return table[name]


def diffusers_to_ldm(name: str, config: Mapping[str, Any]) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k` -> `input_blocks.1.1.transformer_blocks.0.attn2.to_k`."""
    table = {d: ldm for ldm, d in name_map(config).items()}
    if name not in table:
        raise ValueError(f"{name!r} is not a cross-attention site of this UNet (it has {len(table)} sites)")
    return table[name]


def _layout_from_ldm_keys(keys: set[str]) -> _Layout:
    """Infer the level structure from an LDM state dict's keys (prefix already stripped): levels end at the
    downsamplers (`input_blocks.i.0.op`) and upsamplers (`output_blocks.i.{1,2}.conv`)."""
    inputs = {int(m[1]) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    outputs = {int(m[1]) for k in keys if (m := re.match(r"output_blocks\.(\d+)\.", k))}
    if 0 not in inputs or not outputs:
        raise _unknown(
            "found cross-attention keys but not a whole LDM UNet (no input_blocks.0 / output_blocks); "
            "pass the UNet's full state dict"
        )
    depth: dict[str, int] = {}
    for k in keys:
        if m := _LDM_SITE.fullmatch(k.removesuffix(".weight")):
            depth[m["block"]] = max(depth.get(m["block"], 0), int(m["j"]) + 1)
    down_ends = sorted(i for i in inputs if f"input_blocks.{i}.0.op.weight" in keys) + [max(inputs) + 1]
    up_ends = sorted(
        i for i in outputs if f"output_blocks.{i}.1.conv.weight" in keys or f"output_blocks.{i}.2.conv.weight" in keys
    ) + [max(outputs)]
    down, start = [], 1
    for end in down_ends:
        down.append(tuple(depth.get(f"input_blocks.{i}.1", 0) for i in range(start, end)))
        start = end + 1
    up, start = [], 0
    for end in up_ends:
        up.append(tuple(depth.get(f"output_blocks.{i}.1", 0) for i in range(start, end + 1)))
        start = end + 1
    if len(up) != len(down) or any(len(u) != len(d) + 1 for u, d in zip(up, reversed(down), strict=True)):
        raise _unknown(
            f"found an LDM UNet whose levels do not mirror (input layers per level {[len(d) for d in down]}, "
            f"output layers per level {[len(u) for u in up]})"
        )
    return _Layout(tuple(down), depth.get("middle_block.1", 0), tuple(up))


def sites_from_ldm_state_dict(state_dict: Mapping[str, torch.Tensor], include_out: bool = False) -> list[Site]:
    """Sites of an LDM-layout UNet state dict (keys `input_blocks...`, optionally prefixed `model.diffusion_model.`
    or `diffusion_model.`), with shapes; a full single-file checkpoint works too (other keys are ignored)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if m := _LDM_KEY.fullmatch(key):
            found.setdefault(m["prefix"] or "", {})[m["name"]] = tensor
    if not found:
        sample = ", ".join(list(state_dict)[:3])
        if any(".attn2.to_k." in k and "down_blocks." in k for k in state_dict):
            raise _unknown(
                f"found a diffusers-layout state dict ({sample}, ...); load it into UNet2DConditionModel and call "
                f"find_sites on the model"
            )
        raise _unknown(
            f"found no LDM cross-attention keys (...attn2.to_k.weight) among {len(state_dict)} keys ({sample}, ...)"
        )
    prefix = next(p for p in LDM_PREFIXES if p in found)  # a checkpoint may hold copies; the model's own wins
    keys = {k[len(prefix) :] for k in state_dict if k.startswith(prefix)}
    table = _name_table(_layout_from_ldm_keys(keys), include_out=True)
    sites = []
    for name in table:
        if name not in found[prefix] or (name.endswith("to_out.0") and not include_out):
            continue
        weight = found[prefix][name]
        sites.append(Site(name, table[name], _KINDS[name.rsplit("attn2.", 1)[1]], weight.shape[0], weight.shape[1]))
    stray = set(found[prefix]) - set(table)
    if stray:
        raise _unknown(f"found cross-attention keys that do not fit the inferred UNet layout: {sorted(stray)[:3]}")
    return sites


def find_sites(unet: nn.Module | Mapping[str, torch.Tensor], include_out: bool = False) -> list[Site]:
    """Sites of a diffusers UNet2DConditionModel, an LDM UNetModel (e.g. ComfyUI's diffusion_model) or an LDM
    state dict, in forward order (input, middle, output blocks). Raises UnknownArchitectureError if there are none."""
    if isinstance(unet, Mapping):
        return sites_from_ldm_state_dict(unet, include_out)
    config = getattr(unet, "config", None)
    if config is None or "down_block_types" not in config:
        try:
            return sites_from_ldm_state_dict(unet.state_dict(keep_vars=True), include_out)
        except UnknownArchitectureError as e:
            raise _unknown(
                f"found a {type(unet).__name__} that is neither a diffusers UNet nor an LDM UNet ({e})"
            ) from None
    table = _name_table(_layout_from_config(config), include_out)
    sites = []
    for ldm, dif in table.items():
        try:
            weight = unet.get_submodule(dif).weight
        except AttributeError:
            raise _unknown(
                f"{type(unet).__name__}'s config implies {dif}, but the model has no such linear layer"
            ) from None
        sites.append(Site(ldm, dif, _KINDS[ldm.rsplit("attn2.", 1)[1]], weight.shape[0], weight.shape[1]))
    if not sites:
        raise _unknown(
            f"found a {type(unet).__name__} without cross-attention (down blocks {list(config['down_block_types'])})"
        )
    return sites


def family(sites: list[Site]) -> str:
    """'SD1.x', 'SD2.x', 'SDXL' or 'custom', from the number of transformer blocks and the text width."""
    blocks = len({s.name.rsplit(".attn2.", 1)[0] for s in sites})
    text_width = {s.in_features for s in sites if s.kind == "k"}
    known = {(16, 768): "SD1.x", (16, 1024): "SD2.x", (70, 2048): "SDXL"}
    return known.get((blocks, next(iter(text_width))), "custom") if len(text_width) == 1 else "custom"


def weight_path(unet: nn.Module | Mapping[str, torch.Tensor], site: Site) -> str:
    names = [p + site.name for p in LDM_PREFIXES] + [site.diffusers_name]
    if isinstance(unet, Mapping):
        hit = [n for n in names if n + ".weight" in unet]
    else:
        hit = [n for n in names if _has_module(unet, n)]
    if not hit:
        raise KeyError(f"site {site.name} ({site.diffusers_name}) is not in this {type(unet).__name__}")
    return hit[0]


def _has_module(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def site_weight(unet: nn.Module | Mapping[str, torch.Tensor], site: Site) -> torch.Tensor:
    """The site's weight (out x in) in a diffusers UNet, an LDM module or a state dict; the live tensor, not a copy."""
    path = weight_path(unet, site)
    if isinstance(unet, Mapping):
        return unet[path + ".weight"]
    return unet.get_submodule(path).weight


def set_site_weight(unet: nn.Module, site: Site, weight: torch.Tensor) -> None:
    """Overwrite the site's weight in place (cast to its dtype and device). Training never calls this: base weights
    stay untouched; it exists for hosts that bake a delta into a model they own."""
    target = site_weight(unet, site)
    if tuple(weight.shape) != tuple(target.shape):
        raise ValueError(f"site {site.name} has shape {tuple(target.shape)}, got {tuple(weight.shape)}")
    with torch.no_grad():
        target.copy_(weight.to(device=target.device, dtype=target.dtype))


def site_weights(unet: nn.Module | Mapping[str, torch.Tensor], sites: list[Site]) -> dict[str, torch.Tensor]:
    """Canonical name -> weight (detached, shared storage) for the given sites."""
    return {s.name: site_weight(unet, s).detach() for s in sites}
