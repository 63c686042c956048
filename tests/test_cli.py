"""The command line end to end on the testbed: unlearn writes a delta file that evaluate reads and judges."""

import json
import subprocess
import sys

from conftest import ROOT


def run(*args):
    result = subprocess.run([sys.executable, "-m", "trust_engine", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_unlearn_then_evaluate_json(tmp_path):
    delta = tmp_path / "d.safetensors"
    out = run("unlearn", "--concept", "red circle", "--mode", "combination", "--steps", "2", "--out", str(delta))
    assert "a red object" in out  # the derived part is explained
    report = json.loads(run("evaluate", "--delta", str(delta), "--seeds", "1", "--json").strip().splitlines()[-1])
    assert report["concept"] == "red circle" and report["forget_rate_before"] >= 0.9  # the base draws it
    # the preserve set splits into one-object and two-object scenes, and its accuracy is their weighted mean
    assert min(report["preserve_single_accuracy"], report["preserve_two_object_accuracy"]) <= report["preserve_accuracy"]
    assert report["preserve_accuracy"] <= max(report["preserve_single_accuracy"], report["preserve_two_object_accuracy"])
    assert report["concept"] == "red circle" and report["mode"] == "combination"


def test_evaluate_judges_an_erasing_delta_as_erased():
    """The demo's red-circle delta (a compatibility fixture, 60 steps of the old default): evaluate must find the
    concept gone, its synonyms too, and the parts kept, against the same model without it."""
    fixture = ROOT / "tests" / "fixtures" / "deltas" / "erase_red_circle.safetensors"
    report = json.loads(run("evaluate", "--delta", str(fixture), "--seeds", "1", "--json").strip().splitlines()[-1])
    assert report["forget_rate_before"] >= 0.9 and report["forget_rate"] <= 0.2, report
    assert report["synonym_forget_rate"] <= 0.3, report
    assert report["parts_accuracy"] >= report["parts_accuracy_before"] - 0.2, report
    assert report["preserve_accuracy"] >= report["preserve_accuracy_before"] - 0.15, report


def test_bad_inputs_exit_with_a_clear_message(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    result = subprocess.run([sys.executable, "-m", "trust_engine", "evaluate", "--delta", str(junk)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "not a readable safetensors file" in result.stderr
    result = subprocess.run([sys.executable, "-m", "trust_engine", "unlearn", "--concept", " "], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "type the concept" in result.stderr


def test_figures_writes_a_table_and_json(tmp_path):
    out = run("figures", "--modes", "combination", "--losses", "csr", "--steps", "1", "--seeds", "1",
              "--out", str(tmp_path))
    rows = json.loads((tmp_path / "figures.json").read_text())
    assert [(r["mode"], r["loss"], r["static_mask"]) for r in rows] == [("combination", "csr", False),
                                                                      ("combination", "csr", True)]
    assert all(0 < r["weights_changed_share"] < 1 and r["file_bytes"] > 0 for r in rows)
    table = (tmp_path / "figures.md").read_text()
    assert "| red circle | combination | trust CSR |" in table and "| trust CSR, static mask |" in table
    assert table.strip().endswith(out.strip()[-40:])


def test_another_method_from_the_cli_erases_and_names_itself(tmp_path):
    """unlearn --method uce --preset testbed (a closed form: seconds) writes a delta that evaluate judges as erased;
    figures --methods runs a method with each preset it has."""
    delta = tmp_path / "uce.safetensors"
    out = run("unlearn", "--concept", "triangle", "--method", "uce", "--preset", "testbed", "--out", str(delta))
    assert "uce:" in out and "weights changed" in out and f"delta written to {delta}" in out
    report = json.loads(run("evaluate", "--delta", str(delta), "--seeds", "1", "--json").strip().splitlines()[-1])
    assert report["forget_rate_before"] >= 0.9 and report["forget_rate"] <= 0.3, report
    run("figures", "--methods", "uce", "--modes", "individual", "--seeds", "1", "--out", str(tmp_path / "f"))
    rows = json.loads((tmp_path / "f" / "figures.json").read_text())
    assert [(r["method"], r["preset"]) for r in rows] == [("uce", "paper"), ("uce", "testbed")]
    assert all(r["weights_changed"] > 0 and r["file_bytes"] > 0 for r in rows)


def test_method_options_are_checked_before_any_work(tmp_path):
    cases = [(["--method", "esd", "--beta", "2"], "--beta is a TRuST option"),
             (["--method", "esd", "--set", "iterations=5,foo=1"], "esd has no setting 'foo'"),
             (["--method", "esd", "--set", "iterations=0"], "iterations must lie in"),
             (["--method", "esd", "--set", "lr"], "write it as key=value"),
             (["--method", "uce", "--preset", "fast"], "uce has no preset 'fast'"),
             (["--method", "salun", "--set", "epochs=two"], "expected an integer")]
    refused_before_any_work(tmp_path, cases)


def refused_before_any_work(tmp_path, cases) -> None:
    """Each `unlearn --concept triangle` with the extra options exits 2 with the message and writes nothing."""
    for extra, message in cases:
        out = tmp_path / "never.safetensors"
        result = subprocess.run([sys.executable, "-m", "trust_engine", "unlearn", "--concept", "triangle",
                                 "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)  # an unchecked option would start a real run
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr[-500:])
        assert not out.exists()


def test_the_cli_names_every_method():
    from trust_engine import methods
    from trust_engine.__main__ import METHOD_NAMES

    assert sorted(METHOD_NAMES) == sorted(methods.names())
    from trust_engine import benchmark
    from trust_engine.__main__ import BENCH_VARIANTS

    assert BENCH_VARIANTS == tuple(benchmark.VARIANTS)
    out = run("methods")
    assert all(f"{name}: changes" in out for name in methods.names())


def test_concept_type_on_the_testbed_is_refused_by_name_before_any_work(tmp_path):
    """--concept-type reaches the expansion; its prompts are for real checkpoints, so the testbed refuses them with
    a message naming the type, and nothing is written. An unknown type lists the valid ones."""
    refused_before_any_work(tmp_path, [
        (["--concept-type", "art-style"], "concept type 'art style' adds prompts written for real checkpoints, and "
                                          "this model cannot read 'a painting in the style of triangle'"),
        (["--concept-type", "nsfw"], "unknown concept type 'nsfw'; choose one of 'none'")])
