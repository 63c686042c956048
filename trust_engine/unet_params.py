"""UNet parameters by canonical LDM name, beyond the cross-attention sites: every weight and bias inside the
transformer slots (attn1/attn2/ff/norms/proj_in/proj_out), for methods that change `ff.net.2` or all of `attn2`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .unet_view import LDM_PREFIXES, _layout_from_config, _name_table


def _slot_table(config: Mapping) -> dict[str, str]:
    """LDM transformer slot (`input_blocks.1.1`) -> diffusers slot (`down_blocks.0.attentions.0`), from the site table:
    both layouts name everything inside a slot alike (norm, proj_in, transformer_blocks.j..., proj_out)."""
    table = {}
    for ldm, dif in _name_table(_layout_from_config(config), include_out=False).items():
        table[ldm.split(".transformer_blocks.", 1)[0]] = dif.split(".transformer_blocks.", 1)[0]
    return table


def parameter_map(unet: nn.Module) -> dict[str, str]:
    """LDM parameter name -> the name of that parameter in `unet`, for every parameter inside a transformer slot.
    Works for a diffusers UNet2DConditionModel and for an LDM UNetModel (optionally under a `diffusion_model.` or
    `model.diffusion_model.` prefix); resnets, samplers and embeddings are not mapped (no method here changes them)."""
    names = [n for n, _ in unet.named_parameters()]
    config = getattr(unet, "config", None)
    if config is not None and "down_block_types" in config:
        out = {}
        for ldm_slot, dif_slot in _slot_table(config).items():
            prefix = dif_slot + "."
            for n in names:
                if n.startswith(prefix):
                    out[ldm_slot + "." + n[len(prefix):]] = n
        return out
    for prefix in LDM_PREFIXES:
        ldm = {n[len(prefix):]: n for n in names if n.startswith(prefix)}
        slots = {k.split(".transformer_blocks.", 1)[0] + "." for k in ldm if ".transformer_blocks." in k}
        if slots:
            return {k: n for k, n in ldm.items() if any(k.startswith(s) for s in slots)}
    raise ValueError(f"found a {type(unet).__name__} with no transformer blocks: neither a diffusers nor an LDM UNet")


def parameters(unet: nn.Module, ldm_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """LDM parameter name -> the live parameter (detached view, shared storage): all mapped ones, or `ldm_names`."""
    table = parameter_map(unet)
    params = dict(unet.named_parameters())
    wanted = list(table) if ldm_names is None else ldm_names
    missing = [n for n in wanted if n not in table]
    if missing:
        raise KeyError(f"this {type(unet).__name__} has no parameter {missing[0]!r} (LDM name)")
    return {n: params[table[n]].detach() for n in wanted}


def modules_named(unet: nn.Module, suffix: str) -> dict[str, nn.Module]:
    """LDM module name -> module, for the modules inside transformer slots whose name ends with `suffix`
    (e.g. `ff.net.2`, `attn2.to_k`), in LDM name order (input, middle, output blocks)."""
    table = parameter_map(unet)
    found = {}
    for ldm, real in table.items():
        module_ldm, _, kind = ldm.rpartition(".")
        module_real = real.rpartition(".")[0]
        if kind == "weight" and module_ldm.endswith(suffix):
            found[module_ldm] = unet.get_submodule(module_real)
    return dict(sorted(found.items(), key=lambda kv: _order(kv[0])))


def _order(name: str) -> tuple:
    """Sort key in forward order: input blocks, middle block, output blocks, by number."""
    block = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}.get(name.split(".", 1)[0], 3)
    return (block, *[int(p) if p.isdigit() else 0 for p in name.split(".")[1:]], name)
