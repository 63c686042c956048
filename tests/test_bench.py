"""bench-scale's harness on a tiny UNet: every method runs a step, TRuST's is the engine's own and trains a small
share, and the runner reports ratios and per-sample slopes."""

import torch

from trust_engine import bench, unlearn


def test_every_method_measures_a_step_on_a_tiny_unet(monkeypatch):
    calls = []
    original = unlearn.TrustRun.step
    monkeypatch.setattr(unlearn.TrustRun, "step", lambda self, i: calls.append(i) or original(self, i))
    rows = {m: bench.measure_one("tiny", m, 1, "cpu", torch.float32) for m in bench.METHODS}
    flops = {m: bench.measure_one("tiny", m, 1, "cpu", torch.float32, what="flops") for m in bench.METHODS}
    assert all(r["cpu_s"] > 0 and r["weights_bytes"] > 0 and r["peak_bytes"] >= r["rss_before"] > 0
               for r in rows.values())
    assert all(r["flops"] > 0 for r in flops.values())
    assert rows["trust_cip"]["trainable"] < 0.1 * rows["full_ft"]["trainable"]
    assert flops["trust_csr"]["flops"] > flops["trust_cip"]["flops"]  # the Hessian-vector product costs extra passes
    assert len(calls) == 4, "TRuST's step is the engine's own TrustRun.step (memory + FLOPs, for CIP and CSR)"
    assert rows["trust_cip"]["weights_bytes"] > rows["full_ft"]["weights_bytes"]  # + the VAE and the aligner
    assert {"saliency: decode (x0 -> image)", "loss: forward + backward"} <= set(rows["trust_cip"]["phases"])


def test_memory_is_measured_without_the_flop_counter(monkeypatch):
    """The memory process runs the step with no dispatch mode (FlopCounterMode is one) active; FLOPs are counted in
    a process of their own."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    modes = []
    original = unlearn.TrustRun.step
    monkeypatch.setattr(unlearn.TrustRun, "step",
                        lambda self, i: modes.append(_get_current_dispatch_mode()) or original(self, i))
    row = bench.measure_one("tiny", "trust_cip", 1, "cpu", torch.float32, what="memory")
    assert modes == [None] and "flops" not in row and row["state_bytes"] == row["peak_bytes"] - row["rss_before"]
    bench.measure_one("tiny", "trust_cip", 1, "cpu", torch.float32, what="flops")
    assert modes[1] is not None


def test_runner_gives_ratios_and_per_sample_slopes(monkeypatch):
    import json
    import subprocess

    whats = []

    def fake(cmd, **_):
        arch, method, steps, device, dtype, batch, latent, what = cmd[3:11]
        whats.append(what)
        peak = {"full_ft": 10.0, "esd": 6.0, "trust_cip": 4.0, "trust_csr": 5.0}[method] + int(batch)
        row = {"arch": arch, "method": method, "batch": int(batch), "trainable": 1, "weights_bytes": 1}
        row.update({"flops": 1.0} if what == "flops" else
                   {"peak_bytes": peak, "rss_before": 1.0, "state_bytes": peak - 1, "cpu_s": 1.0, "wall_s": 1.0})
        return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake)
    rows = bench.run(["tiny"], 1, "cpu", "float32", progress=lambda m: None, batches=(1, 2))
    cip2 = next(r for r in rows if r["method"] == "trust_cip" and r["batch"] == 2)
    assert cip2["peak_bytes_vs_full_ft"] == 6.0 / 12.0
    assert cip2["peak_bytes_per_sample"] == 1.0
    assert cip2["flops"] == 1.0 and whats[:2] == ["memory", "flops"], "memory and FLOPs in separate processes"


def test_gpu_check_refuses_without_cuda_and_dry_runs_on_the_cpu(capsys):
    from trust_engine.__main__ import main

    if not torch.cuda.is_available():
        assert main(["gpu-check"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    check = bench.erasure_check("tiny", "cpu", torch.float32, steps=2, images=2, progress=lambda m: None)
    assert check["steps"] == 2 and check["seconds_per_step"] > 0 and check["peak_bytes"] > 0
    assert any("relative row change per step" in n for n in check["notes"])


def test_scale_check_a_relative_rate_moves_rows_by_the_same_fraction_whatever_the_weights_size():
    """Adam's first step moves each entry by about lr, so a row moves by about lr / its RMS: 0.1 with the default
    relative rate on any model; an absolute rate moves rows of small weights more than rows of large ones."""
    relative = bench.erasure_check("tiny", "cpu", torch.float32, steps=1, images=2, progress=lambda m: None)
    assert 0.07 < relative["row_change"][0] < 0.14, relative
    tenth = bench.erasure_check("tiny", "cpu", torch.float32, steps=1, images=2, progress=lambda m: None,
                                lr=0.1 * relative["weight_rms"])
    assert abs(tenth["row_change"][0] - relative["row_change"][0]) < 0.02
    big = bench.erasure_check("tiny", "cpu", torch.float32, steps=1, images=2, progress=lambda m: None,
                              lr=0.5 * relative["weight_rms"])
    assert big["row_change"][0] > 3 * relative["row_change"][0]
