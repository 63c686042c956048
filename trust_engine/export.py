"""A delta for diffusers users: `apply_to_pipeline` adds it to a pipeline's UNet in one call, `export_diffusers`
writes a LoRA file that diffusers' `pipe.load_lora_weights` reads (no `.diff` keys, diffusers module names).

diffusers 0.42's `load_lora_weights` needs the `peft` package (it is decorated `@require_peft_backend`); TRuST
does not depend on peft. `apply_to_pipeline` needs neither peft nor a file: it changes the UNet's weights directly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import ranges
from .delta import FINGERPRINT_KEY, LORA_PREFIX, BaseMismatchError, Delta, fingerprint, row_factors
from .sketch import compare_base
from .unet_view import UnknownArchitectureError, find_sites, name_map, set_site_weight, site_weights

EXPORT_KEY = "trust_export"  # metadata of an exported file: which loader it is written for
EXPORT_VALUE = "diffusers-kohya"
SD_TEXT_WIDTHS = (768, 1024)  # CLIP text widths of SD1.x and SD2.x: a delta with others needs its UNet's config


def _unet(pipe_or_unet: Any) -> nn.Module:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    config = getattr(unet, "config", None)
    if not isinstance(unet, nn.Module) or config is None or "down_block_types" not in config:
        raise UnknownArchitectureError(
            f"apply_to_pipeline takes a diffusers pipeline with a .unet or a UNet2DConditionModel, got "
            f"{type(pipe_or_unet).__name__}"
        )
    return unet


def _delta(path_or_delta: Delta | str | os.PathLike[str]) -> Delta:
    return path_or_delta if isinstance(path_or_delta, Delta) else Delta.load(path_or_delta)


def verify_base(delta: Delta, weights: Mapping[str, torch.Tensor]) -> str:
    """Raise BaseMismatchError unless `weights` (the model's Q/K/V site weights) are the delta's base: the exact
    fingerprint, or (if the delta carries a sketch of its base) 95% or more of the sampled weight signs, the same base
    lightly modified, e.g. with a LoRA fused in. Returns '' on an exact match (or a delta without a fingerprint),
    else a note saying how close the model is."""
    own = fingerprint(weights) if delta.base_fingerprint else ""
    check = compare_base(delta.base_fingerprint, delta.metadata, own, weights)
    if check.exact:
        return ""
    if check.close:
        return "this UNet is " + check.close_note()
    raise BaseMismatchError(
        f"this delta was made for another base model (fingerprint {delta.base_fingerprint[:12]}, this UNet "
        f"{own[:12]}).{check.mismatch_detail()} It would not erase the concept reliably and may damage other "
        f"content: apply it to the model it was trained on, retrain on this one, or pass check_base=False to apply "
        f"it anyway"
    )


def apply_to_pipeline(
    pipe_or_unet: Any, path_or_delta: Delta | str | os.PathLike[str], strength: float = 1.0, check_base: bool = True
) -> Delta:
    """Add `strength` x the delta to a diffusers UNet2DConditionModel's cross-attention weights, IN PLACE, as
    diffusers' own `fuse_lora` does: the pipeline (or UNet) you pass is changed, in its own dtype and on its own
    device; nothing else is touched and no peft is needed. Returns the delta (read from the file if a path was given).

        pipe = StableDiffusionPipeline.from_pretrained("./stable-diffusion-v1-5", torch_dtype=torch.float16)
        apply_to_pipeline(pipe, "cat.safetensors")          # pipe now generates without the concept

    The sum is formed in at least float32 and rounded once to the UNet's dtype. Applying it again adds it again;
    `strength=-1, check_base=False` takes it out, bit-exactly only in float32 (in half precision, reload the
    pipeline instead).

    With `check_base` (default) a delta made for another base model is refused (BaseMismatchError) by its
    fingerprint; the same base lightly modified (a LoRA fused in) is accepted with a warning if the delta carries a
    sketch of its base. `check_base=False` applies it regardless. A delta for another architecture (sites this UNet
    does not have, or of other shapes) is always refused, and the UNet is then left unchanged."""
    ranges.check("strength", strength)
    unet = _unet(pipe_or_unet)
    delta = _delta(path_or_delta)
    sites = {s.name: s for s in find_sites(unet, include_out=True)}
    qkv = [s for s in sites.values() if s.kind != "out"]
    weights = site_weights(unet, list(sites.values()))
    if check_base:
        note = verify_base(delta, {s.name: weights[s.name] for s in qkv})
        if note:
            warnings.warn(f"TRuST: {note}; applied", stacklevel=2)
    new = delta.apply_to(weights, strength)  # checks every site exists with the delta's shape before any write
    dense = {}
    if delta.params:  # dense differences (methods that change ff.net.2, all of attn2 or biases)
        from .unet_params import parameters

        live = parameters(unet, list(delta.params))  # KeyError before any write when one is missing
        for name, diff in delta.params.items():
            if tuple(diff.shape) != tuple(live[name].shape):
                raise UnknownArchitectureError(f"{name}: the delta's difference is {tuple(diff.shape)}, this UNet's "
                                               f"parameter {tuple(live[name].shape)}: made for another architecture")
            dense[name] = (live[name].float() + strength * diff.to(live[name].device).float()).to(live[name].dtype)
    for name, weight in new.items():
        set_site_weight(unet, sites[name], weight)
    for name, value in dense.items():
        live[name].copy_(value)
    return delta


def diffusers_lora_tensors(delta: Delta, unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `export_diffusers`: per changed site `lora_unet_<diffusers module path with '_'>` with
    lora_up.weight (one-hot row selector, out x R) and lora_down.weight (the R changed rows), and no alpha."""
    if unet_config is None:
        widths = {d.in_features for n, d in delta.sites.items() if n.endswith(("to_k", "to_v"))}
        if widths - set(SD_TEXT_WIDTHS):
            raise UnknownArchitectureError(
                f"this delta's text width is {sorted(widths)}, not SD1.x's or SD2.x's "
                f"({' or '.join(map(str, SD_TEXT_WIDTHS))}), so the default SD1.x/SD2.x layout may not be its UNet's: "
                f"pass the config of the UNet it was made for (pipe.unet.config, or --model on the command line), "
                f"e.g. for SDXL"
            )
    table = name_map(unet_config or {})
    missing = [n for n in delta.sites if n not in table]
    if missing:
        which = "the UNet with this config" if unet_config else "an SD1.x/SD2.x UNet (the default layout)"
        raise UnknownArchitectureError(
            f"this delta changes {len(missing)} sites that {which} does not have (e.g. {missing[0]}); pass the "
            f"config of the UNet it was made for (pipe.unet.config, or --model on the command line), e.g. for SDXL"
        )
    if delta.params:
        raise ValueError(f"this delta also changes {len(delta.dense_modules())} module(s) as dense differences (e.g. "
                         f"{delta.dense_modules()[0]}), which diffusers' LoRA loader cannot read: apply it with "
                         f"trust_engine.export.apply_to_pipeline instead")
    tensors: dict[str, torch.Tensor] = {}
    for name, d in delta.sites.items():
        if d.rank == 0:
            continue
        key = LORA_PREFIX + table[name].replace(".", "_")
        up, down, _ = row_factors(d)  # no alpha: see export_diffusers
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.lora_down.weight"] = down
    return tensors


def export_diffusers(
    path_or_delta: Delta | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the delta as a LoRA file that diffusers' `pipe.load_lora_weights(out_path)` takes:

        pipe.load_lora_weights("cat-diffusers.safetensors")   # needs `pip install peft` (diffusers' requirement)
        pipe.fuse_lora()                                       # optional: bake it into the weights

    Kohya-style keys with diffusers module names (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_
    to_k.lora_down.weight`, the names kohya-ss uses for SD1.x), which diffusers' kohya converter
    (`diffusers.loaders.lora_conversion_utils._convert_non_diffusers_lora_to_diffusers`) maps to the UNet's modules.
    Every site is exact rank-R factors of its R changed rows (no `.diff` keys, which that converter rejects), so the
    file can be larger than the delta file where a site changed most of its rows.

    No `.alpha` keys, so every site's scale is 1 (up @ down is the delta). With alphas, diffusers 0.42 keys the
    per-module alphas of such a file by the old `...attn2.processor.to_q_lora.down.weight` names, which match no
    module, so sites whose rank differs from the most common one would get scale (common alpha) / (own rank);
    without alphas it gives every module lora_alpha = its rank (diffusers' `get_peft_kwargs`). (Kohya-style
    loaders such as ComfyUI's read a missing alpha as scale 1 as well; not tested here.) Tested through diffusers'
    `lora_state_dict`, its kohya converter, its UNet-to-peft key renaming and `get_peft_kwargs`, and, where peft is
    installed (TRuST does not require it), through `load_lora_weights` + `fuse_lora`.

    `unet_config`: the config of the UNet the delta is for (`pipe.unet.config`); the default is diffusers' default
    UNet layout, which is SD1.x's and SD2.x's, taken only for a delta whose K/V text width is theirs (768 or 1024).
    SDXL, and any other layout, needs its config. The TRuST metadata (concepts, base fingerprint, ...) is kept,
    but the file is not a TRuST delta: keep the original for the ComfyUI nodes and the CLI."""
    delta = _delta(path_or_delta)
    tensors = diffusers_lora_tensors(delta, unet_config)
    metadata = {**delta.metadata, EXPORT_KEY: EXPORT_VALUE}
    if delta.base_fingerprint:
        metadata[FINGERPRINT_KEY] = delta.base_fingerprint
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out_path)
    return out_path
