"""The method arena (`bench`, trust_engine.benchmark): the paired interval and KID against hand-computed toys, the
collateral neighbours of "triangle" / "red circle" / "circle on a square", cell bookkeeping and resuming a killed
run, and one tiny end-to-end cell on the testbed with a fake attacks module that follows the attacks contract."""

import dataclasses
import json
import math
import sys
import types

import pytest
import torch

from trust_engine import benchmark
from trust_engine.testbed import world

# --- statistics ---

def test_paired_interval_by_hand():
    # d = after - before = [0, -1, 0, -1, 0]: mean -0.4, sd (n-1) = sqrt(1.2 / 4) = 0.5477, half = 1.96 * sd / sqrt(5)
    change, half, n = benchmark.paired_interval([1, 1, 1, 1, 0], [1, 0, 1, 0, 0])
    assert n == 5
    assert change == pytest.approx(-0.4)
    assert half == pytest.approx(1.959963984540054 * math.sqrt(0.3) / math.sqrt(5), rel=1e-9)
    assert half == pytest.approx(0.48010, abs=1e-4)


def test_paired_interval_ignores_what_both_states_share():
    # the same 2 of 4 flips, with any number of images right (or wrong) both times: the change and its interval
    # depend only on the differences, which an unpaired interval would not
    a = benchmark.paired_interval([1, 1, 0, 0], [0, 1, 0, 1])
    assert a[0] == 0.0 and a[1] == pytest.approx(1.96 * math.sqrt(2 / 3) / 2, rel=1e-3)
    assert benchmark.paired_interval([1] * 10, [1] * 10)[:2] == (0.0, 0.0)


def test_kid_of_two_point_masses_is_the_kernel_distance():
    # X all at 0, Y all at 1 (d = 1): k(0,0) = 1, k(1,1) = 8, k(0,1) = 1 -> MMD^2 = 1 + 8 - 2 = 7 exactly
    x, y = torch.zeros(5, 1), torch.ones(7, 1)
    assert benchmark.kid(x, y) == pytest.approx(7.0)
    assert benchmark.kid(x, x.clone()) == pytest.approx(0.0)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same = benchmark.kid(x, y)
    shifted = benchmark.kid(x, y + 1.0)
    assert abs(same) < 0.05
    assert shifted > 20 * abs(same) and shifted > 0.3


def test_kid_matches_the_unbiased_formula_on_a_small_set():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, generator=g).double(), torch.randn(5, 3, generator=g).double()

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(4) for j in range(4) if i != j) / 12
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(4) for j in range(5)) / 20
    assert benchmark.kid(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


# --- collateral neighbours ---

def scene(*objs, relation=None):
    return world.Scene(tuple(world.Obj(*o) for o in objs), relation)


def test_neighbours_of_a_one_attribute_concept_are_the_other_values_of_that_attribute():
    assert set(benchmark.neighbours("triangle")) == {scene(("circle", None)), scene(("square", None)),
                                                      scene(("star", None))}


def test_neighbours_of_red_circle_change_exactly_one_attribute():
    assert set(benchmark.neighbours("red circle")) == {
        scene(("square", "red")), scene(("triangle", "red")), scene(("star", "red")),
        scene(("circle", "green")), scene(("circle", "blue")), scene(("circle", "yellow"))}


def test_neighbours_of_a_conditional_concept():
    got = set(benchmark.neighbours("circle on a square"))
    want = {scene((s, None), ("square", None), relation="on") for s in ("square", "triangle", "star")}
    want |= {scene(("circle", None), (s, None), relation="on") for s in ("circle", "triangle", "star")}
    want |= {scene(("circle", None), ("square", None), relation="next to")}
    assert got == want


def test_task_sets_keep_every_erased_concept_out_of_the_preserve_pool():
    config = benchmark.BenchConfig()
    sets = benchmark.task_sets("three", config)
    queries = [world.parse(t) for t, _ in sets.concepts]
    for prompt in sets.preserve_pool:
        assert not any(world.contains(q, world.parse(prompt)) for q in queries), prompt
    # the pool alternates one-object and two-object prompts (what the one/two-object split relies on)
    assert [len(world.parse(p).objects) for p in sets.preserve_pool[:6]] == [1, 2, 1, 2, 1, 2]
    assert set(sets.neighbours) == {"triangle", "red circle", "circle on a square"}


# --- cell bookkeeping and resume ---

def fake_cell(calls, fail_at=None):
    def run_cell(arena, method, task, seed):
        calls.append((method, task, seed))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # a kill mid-way
        base = {"individual": 0.9, "combination": 0.8}[task]
        return {"method": method, "preset": "paper", "task": task, "seed": seed, "concepts": [task],
                "forget_before": 1.0, "forget": 0.1 * (seed + 1), "synonym_forget": 0.0, "preserve_before": base,
                "preserve": base - 0.01 * seed, "preserve_change": -0.01 * seed, "preserve_halfwidth": 0.02,
                "preserve_images": 512, "preserve_single": 1.0, "preserve_two_object": 0.8, "kid": 0.001,
                "seconds": 10.0 + seed, "flops": None, "peak_rss": 2**30, "rows_changed": 5, "weights_changed": 50,
                "file_bytes": 2048, "reproduced": None, "attacks": {}}
    return run_cell


@pytest.fixture
def no_arena(monkeypatch):
    monkeypatch.setattr(benchmark, "Arena", lambda config, out, say: None)


def tiny_config(**kw):
    return benchmark.BenchConfig(methods=("uce", "fia"), tasks=("individual", "combination"), seeds=2, **kw)


def test_every_cell_runs_once_and_is_summarised(tmp_path, no_arena):
    calls = []
    results = benchmark.run(tiny_config(), tmp_path, say=lambda m: None, cell_runner=fake_cell(calls))
    assert sorted(calls) == sorted((m, t, s) for m in ("uce", "fia") for t in ("individual", "combination")
                                   for s in (0, 1))
    assert set(results["cells"]) == {benchmark.cell_id(*c) for c in calls}
    s = next(r for r in results["summary"] if (r["method"], r["task"]) == ("uce", "individual"))
    assert s["forget"] == pytest.approx(0.15) and s["forget_sd"] == pytest.approx(math.sqrt(0.005))
    assert s["seconds"] == pytest.approx(10.5) and s["seeds"] == 2
    assert (tmp_path / "bench.md").read_text().count("| uce (paper) |") == 2
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert json.loads((tmp_path / "bench.json").read_text())["cells"] == results["cells"]


def test_a_killed_run_resumes_where_it_stopped(tmp_path, no_arena):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        benchmark.run(tiny_config(), tmp_path, say=lambda m: None, cell_runner=fake_cell(calls, fail_at=3))
    done = json.loads((tmp_path / "bench.json").read_text())["cells"]
    assert len(done) == 2  # the two cells before the kill were written, the interrupted one was not
    again = []
    benchmark.run(tiny_config(), tmp_path, say=lambda m: None, cell_runner=fake_cell(again))
    assert len(again) == 8 - 2 and not {benchmark.cell_id(*c) for c in again} & set(done)
    assert len(json.loads((tmp_path / "bench.json").read_text())["cells"]) == 8
    third = []
    benchmark.run(tiny_config(), tmp_path, say=lambda m: None, cell_runner=fake_cell(third))
    assert third == []  # everything done: nothing runs


def test_more_seeds_later_run_only_the_new_cells(tmp_path, no_arena):
    calls = []
    benchmark.run(dataclasses.replace(tiny_config(), seeds=1), tmp_path, say=lambda m: None,
                  cell_runner=fake_cell(calls))
    more = []
    benchmark.run(tiny_config(), tmp_path, say=lambda m: None, cell_runner=fake_cell(more))
    assert {s for _, _, s in more} == {1} and len(more) == 4


def test_a_folder_of_a_run_with_other_settings_is_refused(tmp_path, no_arena):
    benchmark.run(tiny_config(), tmp_path, say=lambda m: None, cell_runner=fake_cell([]))
    with pytest.raises(benchmark.SettingsMismatchError, match="preserve_max"):
        benchmark.run(dataclasses.replace(tiny_config(), preserve_max=99), tmp_path, say=lambda m: None,
                      cell_runner=fake_cell([]))


def test_variants_are_trust_with_their_overrides_and_the_control_reads_the_default_run():
    budget = benchmark.method_config("trust-budget", 2)
    assert (budget.row_budget, budget.seed, budget.loss) == (0.15, 2, "cip")
    assert benchmark.method_config("trust-csr", 0).loss == "csr"
    assert benchmark.preset_of("trust-random") == benchmark.preset_of("trust")
    with pytest.raises(ValueError, match="needs the trust cell trust/individual/seed1 first"):
        benchmark.method_config("trust-static-topk", 1, {"cells": {}}, "individual")
    results = {"cells": {benchmark.cell_id("trust", "individual", 1): {"rows_changed": 321}}}
    control = benchmark.method_config("trust-static-topk", 1, results, "individual")
    assert (control.static_mask, control.mask_rows) == (True, 321)


def test_quick_with_named_methods_runs_them_at_the_quick_settings(tmp_path, monkeypatch):
    from trust_engine.__main__ import main

    seen = {}

    def fake_run(config, out, say):
        seen["pairs"] = config.pairs()
        seen["preserve_max"] = config.preserve_max
        raise SystemExit(0)

    monkeypatch.setattr(benchmark, "run", fake_run)
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--methods", "trust", "trust-budget", "--tasks", "individual", "--out",
              str(tmp_path / "b")])
    assert seen == {"pairs": [("trust", "individual"), ("trust-budget", "individual")], "preserve_max": 256}


def test_cli_refuses_bad_bench_options_before_any_work(tmp_path, capsys):
    from trust_engine.__main__ import main

    assert main(["bench", "--seeds", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--seeds must be 1 or more" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["bench", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_merged_sequence_delta_is_the_sum_of_its_steps():
    from trust_engine.delta import Delta, RowDelta

    site = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    a = Delta({site: RowDelta(torch.tensor([0, 2]), torch.ones(2, 3), 4)})
    b = Delta({site: RowDelta(torch.tensor([2, 3]), 2 * torch.ones(2, 3), 4)},
              params={"input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": torch.ones(2, 2)})
    merged = benchmark.merge_deltas([a, b], {"method": "x"}, "fp")
    assert torch.equal(merged.dense(site), a.dense(site) + b.dense(site))
    assert merged.sites[site].rows.tolist() == [0, 2, 3]
    assert torch.equal(merged.params["input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"], torch.ones(2, 2))
    assert merged.base_fingerprint == "fp"


# --- one tiny cell end to end, with a fake attacks module that follows the contract ---

def fake_attacks_module(calls):
    module = types.ModuleType("trust_engine.attacks")
    module.ATTACKS = ("paraphrase", "soft_prompt", "ring_a_bell", "relearn")

    @dataclasses.dataclass
    class AttackResult:
        name: str
        asr: float
        runs: int
        budget: dict
        seconds: float
        judged_by: str
        worst: list

    def run(patched, concept, names=module.ATTACKS, *, base=None, judge=None, budget="quick", seed=0,
            progress=None):
        calls.append({"concept": concept, "names": tuple(names), "budget": budget, "seed": seed,
                      "base": base, "judge": judge, "patched": patched})
        return {n: AttackResult(n, 0.25 * (i + 1), 4, {"iterations": 1}, 0.1, "judge", []) for i, n in
                enumerate(names)}

    module.AttackResult, module.run = AttackResult, run
    module.testbed_judge = lambda judge_model: (lambda images, concept: [False] * len(images))
    return module


@pytest.mark.slow
def test_one_tiny_cell_end_to_end_on_the_testbed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "trust_engine.attacks", fake_attacks_module(calls))
    config = benchmark.BenchConfig(methods=("uce",), tasks=("individual",), seeds=1, eval_steps=4,
                                   forget_per_prompt=1, max_forget=6, preserve_min=32, preserve_max=64,
                                   preserve_chunk=32, part_images=2, neighbour_images=2, flops=True,
                                   attack_budget="quick")
    results = benchmark.run(config, tmp_path, say=lambda m: None)
    row = results["cells"]["uce/individual/seed0"]
    assert row["forget_before"] > row["forget"]  # UCE erases "triangle" even judged on 4-step images
    assert row["preserve_images"] in (32, 64) and row["neighbour_scenes"] == 3
    assert row["reproduced"] is True and row["flops"] > 0  # the FLOP pass gave the same delta bit for bit
    assert row["weights_changed"] > 0 and row["file_bytes"] == (tmp_path / "deltas" / row["file"]).stat().st_size
    assert row["peak_rss"] > 0 and row["seconds"] > 0 and math.isfinite(row["kid"])
    assert [c["budget"] for c in calls] == ["quick"] and calls[0]["concept"] == "triangle"
    assert calls[0]["base"] is not None and calls[0]["judge"] is not None
    assert set(row["attacks"]) == {"paraphrase", "soft_prompt", "ring_a_bell", "relearn"}
    assert row["attacks"]["relearn"]["asr"] == pytest.approx(1.0)
    md = (tmp_path / "bench.md").read_text()
    assert "ASR relearn" in md and "| uce (testbed) | individual |" in md
    # the base model's judged images are kept: a second sitting with a new cell does not generate them again
    assert (tmp_path / "cache" / "base_individual_seed0.safetensors").exists()
