"""Reproducible runs: the same seed, inputs and thread count give a bit-identical delta on the CPU (TRuST and ESD,
two short runs each, and ESD once more in a fresh process); a different seed gives a different delta."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trust_engine import concepts, methods

ROOT = Path(__file__).resolve().parents[1]

SHORT = {
    "trust": dict(steps=3, eval_every=100, forget_images=4, preserve_images=4, gen_steps=5),
    "esd": dict(iterations=3, ddim_steps=5),
}


def delta_tensors(delta) -> dict[str, torch.Tensor]:
    out = {f"site:{n}": d.dense() for n, d in delta.sites.items()}
    out.update({f"param:{n}": p for n, p in delta.params.items()})
    return out


def short_run(method: str, testbed, seed: int = 0) -> dict[str, torch.Tensor]:
    _, parts, aligner = testbed
    expanded = concepts.expand_all("triangle", "individual", preserve=["a circle"])
    config = methods.config_for(method, "paper", seed=seed, **SHORT[method])
    return delta_tensors(methods.run(method, parts, expanded, config, aligner=aligner))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[0]}"


@pytest.mark.parametrize("method", [pytest.param("trust", marks=pytest.mark.slow), "esd"])
def test_two_runs_with_the_same_seed_give_a_bit_identical_delta(method, testbed):
    first, second = short_run(method, testbed), short_run(method, testbed)
    assert first  # the run changed something
    assert_bit_identical(first, second)
    other = short_run(method, testbed, seed=1)
    assert any(k not in other or not torch.equal(first[k], other[k]) for k in first)  # the seed does matter


def test_methods_run_under_deterministic_algorithms(testbed, monkeypatch):
    seen = []
    fn = methods.METHODS["uce"][1]
    monkeypatch.setitem(methods.METHODS, "uce", (methods.METHODS["uce"][0],
                        lambda *a, **k: (seen.append(torch.are_deterministic_algorithms_enabled()), fn(*a, **k))[1]))
    _, parts, _ = testbed
    before = torch.are_deterministic_algorithms_enabled()
    methods.run("uce", parts, concepts.expand_all("triangle", "individual"), methods.config_for("uce"))
    assert seen == [True]
    assert torch.are_deterministic_algorithms_enabled() == before  # restored


_CHILD = """
import json, sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from trust_engine.testbed import bundle
from test_reproducible import short_run
save_file(short_run("esd", bundle.load_parts()), {out!r})
"""


def test_a_fresh_process_with_the_same_thread_count_gives_the_same_bits(testbed, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "esd.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "MKL_NUM_THREADS": str(torch.get_num_threads())}
    code = _CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=600,
                   capture_output=True)
    assert_bit_identical(short_run("esd", testbed), load_file(str(out)))
