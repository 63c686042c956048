"""UNet parameters by LDM name inside the transformer slots, and the testbed's apply_delta for dense differences."""

import torch

from trust_engine.delta import Delta
from trust_engine.testbed.evaluate import apply_delta
from trust_engine.unet_params import modules_named, parameter_map, parameters
from trust_engine.unet_view import name_map

torch.set_num_threads(1)


def test_parameter_map_covers_every_transformer_slot_parameter_and_agrees_with_the_site_table(pipe):
    table = parameter_map(pipe.unet)
    inside = [n for n, _ in pipe.unet.named_parameters() if ".attentions." in n]
    assert sorted(table.values()) == sorted(inside)
    for ldm, dif in name_map(pipe.unet.config).items():
        assert table[ldm + ".weight"] == dif + ".weight"
    ff = modules_named(pipe.unet, "ff.net.2")
    assert len(ff) == len({n.rsplit(".attn2.", 1)[0] for n in name_map(pipe.unet.config)})
    assert all(isinstance(m, torch.nn.Linear) for m in ff.values())
    assert list(ff)[0].startswith("input_blocks.") and list(ff)[-1].startswith("output_blocks.")


def test_parameter_map_of_an_ldm_layout_state_names(pipe):
    """An LDM-layout module (as ComfyUI holds it) maps to itself under its prefix; resnets and samplers stay out."""
    table = parameter_map(pipe.unet)
    holder = torch.nn.Module()
    inner = torch.nn.Module()
    holder.add_module("diffusion_model", inner)
    outside = ["input_blocks.0.0.weight", "input_blocks.2.0.op.weight", "middle_block.0.in_layers.0.weight"]
    for ldm in [*table, *outside]:
        *path, leaf = ldm.split(".")
        module = inner
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(1)))
    mapped = parameter_map(holder)
    assert mapped == {ldm: "diffusion_model." + ldm for ldm in table}


def test_apply_delta_writes_dense_weight_and_bias_differences(pipe):
    from trust_engine.testbed import bundle

    fresh = bundle.load_pipeline()
    name = next(iter(modules_named(fresh.unet, "ff.net.2")))
    base = parameters(fresh.unet, [f"{name}.weight", f"{name}.bias"])
    before = {k: v.clone() for k, v in base.items()}
    mask = torch.zeros_like(before[f"{name}.weight"], dtype=torch.bool)
    mask[0, :3] = True
    delta = Delta({}, params={f"{name}.weight": -before[f"{name}.weight"] * mask,
                              f"{name}.bias": torch.full_like(before[f"{name}.bias"], 0.5)})
    apply_delta(fresh, delta)
    after = parameters(fresh.unet, [f"{name}.weight", f"{name}.bias"])
    assert bool((after[f"{name}.weight"][mask] == 0).all())
    assert torch.equal(after[f"{name}.weight"][~mask], before[f"{name}.weight"][~mask])
    assert torch.allclose(after[f"{name}.bias"], before[f"{name}.bias"] + 0.5)
