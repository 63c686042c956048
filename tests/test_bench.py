"""bench-scale's harness on a tiny UNet: every method runs a step, counts FLOPs, and TRuST trains a small share."""

import torch

from trust_engine import bench


def test_every_method_measures_a_step_on_a_tiny_unet():
    rows = {m: bench.measure_one("tiny", m, 1, "cpu", torch.float32) for m in bench.METHODS}
    assert all(r["flops"] > 0 and r["cpu_s"] > 0 for r in rows.values())
    assert rows["trust_cip"]["trainable"] < 0.1 * rows["full_ft"]["trainable"]
    assert rows["trust_csr"]["flops"] > rows["trust_cip"]["flops"]  # the double backprop costs extra
