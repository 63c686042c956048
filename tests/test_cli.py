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
    for key in ("forget_rate", "forget_rate_before", "synonym_forget_rate", "preserve_accuracy", "preserve_accuracy_before",
                "preserve_single_accuracy", "preserve_two_object_accuracy_before"):
        assert 0.0 <= report[key] <= 1.0, key
    # the preserve set splits into one-object and two-object scenes, and its accuracy is their weighted mean
    assert min(report["preserve_single_accuracy"], report["preserve_two_object_accuracy"]) <= report["preserve_accuracy"]
    assert report["preserve_accuracy"] <= max(report["preserve_single_accuracy"], report["preserve_two_object_accuracy"])
    assert report["concept"] == "red circle" and report["mode"] == "combination"


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
    assert "| red circle | combination | CSR | every step |" in table and table.strip().endswith(out.strip()[-40:])
