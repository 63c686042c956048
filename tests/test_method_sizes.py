"""trust_engine.methods.sizes writes each method's file layout from a UNet's shapes (the README's SD1.5 sizes): on the
bundled testbed, that layout must be the file a real short run of the method writes (same tensors, shapes, dtypes)."""

import pytest
import torch

from trust_engine import concepts
from trust_engine.methods import METHODS, sizes

torch.set_num_threads(1)

SHORT = {  # the least work that still writes the method's whole file
    "uce": {},
    "esd": dict(iterations=1, ddim_steps=2),
    "salun": dict(forget_images=2, preserve_images=2, gen_steps=2, batch=2, epochs=1),
    "fia": dict(samples=1, timesteps=1, steps=2),
    "conceptprune": dict(samples=1, timesteps=1, steps=2),
}


def layout_of(tensors: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


@pytest.mark.parametrize("method", list(SHORT))
def test_layout_from_shapes_is_the_file_a_real_run_writes(testbed, method):
    _, parts, _ = testbed
    cls, run = METHODS[method]
    real = layout_of(run(parts, [concepts.expand("triangle", preserve=("a circle", "a square"))],
                         cls(**SHORT[method])).to_lora())
    made = layout_of(sizes.layout(method, parts.unet).to_lora())
    if method == "salun":  # an upper bound: a tensor the saliency mask misses entirely is not written
        assert real.items() <= made.items() and len(real) >= 0.9 * len(made)
    else:
        assert made == real


def test_trust_layout_has_the_sites_and_dtype_of_a_real_delta(testbed):
    """TRuST's size depends on how many rows it changes: the layout gives every Q/K/V site a share of its rows, as
    row-sparse LoRA factors in float32 (what a CPU run writes; tests/fixtures holds one)."""
    from conftest import ROOT

    from trust_engine.delta import Delta

    _, parts, _ = testbed
    real = Delta.load(ROOT / "tests" / "fixtures" / "deltas" / "erase_red_circle.safetensors").to_lora()
    made = sizes.layout("trust", parts.unet, row_share=0.05).to_lora()
    assert {k.rsplit(".", 2)[0] for k in real} <= {k.rsplit(".", 2)[0] for k in made}
    assert {v.dtype for k, v in made.items() if "lora_down" in k} == {v.dtype for k, v in real.items()
                                                                       if "lora_down" in k}
    small, large = (sizes.file_bytes(sizes.layout("trust", parts.unet, row_share=s)) for s in (0.01, 0.5))
    assert small < large


def test_sizes_table_names_every_method():
    from diffusers import UNet2DConditionModel

    from trust_engine.bench import ARCHS

    rows = sizes.table(UNet2DConditionModel(**ARCHS["tiny"]["unet"]))
    assert {r["method"] for r in rows} == set(METHODS)
    assert all(r["bytes"] > 0 for r in rows)
