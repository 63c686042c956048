"""Every eraser on the bundled testbed through the command line, as a user runs it: `unlearn --method M --preset P`
on the demo's first task ("triangle", keeping a circle, a square and a star), then `evaluate` on the written file.

The methods that erase must take "triangle" from >= 0.90 to <= 0.30 with the named preset (read from
trust_engine.methods.PRESETS by the CLI, so changing a preset back to one that does not erase fails its test). FIA and
ConceptPrune cannot erase it on this UNet (README, "The other erasers"): their tests check that their files prune what
they report, and the measured limit that explains it: zeroing every `ff.net.2` weight, the most either can prune
there, still leaves the concept drawn.

Slow ones (marker `slow`, a minute or more each on 2 CPU cores) run with `pytest -m slow tests/test_methods_erase.py`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

PRESERVE = ("a circle", "a square", "a star")  # the demo's triangle task


def cli(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "trust_engine", *args], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def erase_and_judge(tmp_path, method: str, preset: str, *extra: str) -> tuple[dict, str]:
    delta = tmp_path / f"{method}_{preset}.safetensors"
    cli("unlearn", "--method", method, "--preset", preset, "--concept", "triangle", "--preserve", *PRESERVE,
        "--out", str(delta), *extra)
    report = json.loads(cli("evaluate", "--delta", str(delta), "--seeds", "1", "--json").strip().splitlines()[-1])
    assert report["concept"] == "triangle" and report["forget_rate_before"] >= 0.9, report  # the base draws it
    return report, str(delta)


ERASERS = [
    ("uce", "paper"),  # seconds: the closed form
    ("uce", "testbed"),
    pytest.param("trust", "paper", marks=pytest.mark.slow),
    pytest.param("esd", "testbed", marks=pytest.mark.slow),
    pytest.param("salun", "testbed", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("method", "preset"), ERASERS)
def test_method_erases_triangle_through_the_cli(tmp_path, method, preset):
    report, _ = erase_and_judge(tmp_path, method, preset)
    assert report["forget_rate"] <= 0.30, report


@pytest.mark.parametrize("method", ["fia", "conceptprune"])
def test_pruning_method_file_zeroes_the_weights_it_reports(tmp_path, method, testbed):
    """Through the CLI (fewer samples than the paper, same code): the file's ff.net.2 .diff entries are exactly
    -W at the pruned weights (as many as the metadata reports) and 0 elsewhere, so evaluate applies a real prune."""
    from trust_engine.delta import Delta
    from trust_engine.unet_params import parameters

    _, parts, _ = testbed
    path = tmp_path / f"{method}.safetensors"
    cli("unlearn", "--method", method, "--concept", "triangle", "--preserve", *PRESERVE, "--set", "samples=4",
        "--out", str(path))
    delta = Delta.load(path)
    reported = json.loads(delta.metadata["pruned"])
    assert sum(reported.values()) > 0
    base = parameters(parts.unet, list(delta.params))
    for name, diff in delta.params.items():
        pruned = diff != 0
        assert int(pruned.sum()) == reported[name.removesuffix(".weight")], name
        w = base[name].to(torch.float16).float()
        assert torch.equal(diff.float()[pruned], -w[pruned]), name  # zeroed exactly (float16 in the file)
    assert all(k.endswith(".diff") and "_ff_net_2" in k for k in load_file(str(path)))


def test_zeroing_all_of_ff_net_2_does_not_erase_triangle(testbed, judge):
    """The limit behind FIA's and ConceptPrune's rows: their masks zero a subset of the ff.net.2 weights; zeroing
    them all (preserve collapses) still leaves "triangle" drawn in more than 30 % of its prompts' images (measured
    0.40 with 1 image per prompt; the empty prompt alone draws one in 0.375). tools/prune_limit.py shows the curve."""
    from trust_engine.testbed import bundle, check
    from trust_engine.testbed.evaluate import eval_sets, judge_rate
    from trust_engine.unet_params import modules_named

    sets = eval_sets("triangle", "individual")
    pipe = bundle.load_pipeline()
    layers = modules_named(pipe.unet, "ff.net.2")
    assert len(layers) == 7
    with torch.no_grad():
        for m in layers.values():
            m.weight.zero_()
    prompts = [p for p in sets.forget for _ in range(2)]
    shown = judge_rate(judge, check.generate(pipe, prompts, seed=1000), prompts, sets.concept)
    rate = sum(shown) / len(shown)
    assert 0.30 < rate < 0.9, rate  # below 0.9: the zeroing bites (the base draws it in >= 0.9), yet does not erase
