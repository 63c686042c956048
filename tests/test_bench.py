"""bench-scale's harness on a tiny UNet: every method runs a step, TRuST's is the engine's own and trains a small
share, and the runner reports ratios and per-sample slopes."""

import torch

from trust_engine import bench, unlearn


def test_every_method_measures_a_step_on_a_tiny_unet(monkeypatch):
    calls = []
    original = unlearn.TrustRun.step
    monkeypatch.setattr(unlearn.TrustRun, "step", lambda self, i: calls.append(i) or original(self, i))
    rows = {m: bench.measure_one("tiny", m, 1, "cpu", torch.float32) for m in bench.METHODS}
    assert all(r["flops"] > 0 and r["cpu_s"] > 0 and r["weights_bytes"] > 0 for r in rows.values())
    assert rows["trust_cip"]["trainable"] < 0.1 * rows["full_ft"]["trainable"]
    assert rows["trust_csr"]["flops"] > rows["trust_cip"]["flops"]  # the Hessian-vector product costs extra passes
    assert len(calls) == 4, "TRuST's step is the engine's own TrustRun.step (counted + timed, for CIP and CSR)"
    assert rows["trust_cip"]["weights_bytes"] > rows["full_ft"]["weights_bytes"]  # + the VAE and the aligner


def test_runner_gives_ratios_and_per_sample_slopes(monkeypatch):
    import json
    import subprocess

    def fake(cmd, **_):
        arch, method, steps, device, dtype, batch = cmd[3:9]
        peak = {"full_ft": 10.0, "esd": 6.0, "trust_cip": 4.0, "trust_csr": 5.0}[method] + int(batch)
        row = {"arch": arch, "method": method, "batch": int(batch), "flops": 1.0, "peak_bytes": peak,
               "trainable": 1, "weights_bytes": 1, "cpu_s": 1.0, "wall_s": 1.0}
        return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake)
    rows = bench.run(["tiny"], 1, "cpu", "float32", progress=lambda m: None, batches=(1, 2))
    cip2 = next(r for r in rows if r["method"] == "trust_cip" and r["batch"] == 2)
    assert cip2["peak_bytes_vs_full_ft"] == 6.0 / 12.0
    assert cip2["peak_bytes_per_sample"] == 1.0


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
