"""Tier 2 in a real AUTOMATIC1111 (see conftest.py): the tab's Concept saliency and Verify panels build, and their
routes run on the loaded checkpoint (with the testbed's CLIP as the concept aligner) and leave it as it was."""

import shutil

import numpy as np
import pytest

from .conftest import REPO
from .test_a1111_webui import image

RUN = dict(concepts="a red circle", mode="individual", loss="CIP", steps=2, training_images=2, resolution=64, seed=3,
           learning_rate=0.05, file_name="tier2_inspect")


@pytest.fixture(scope="module")
def aligner(webui):
    """The testbed's CLIP (a transformers CLIPModel folder) in the web UI's models/concept_aligners."""
    target = webui.data / "models" / "concept_aligners" / "world-clip"
    shutil.copytree(REPO / "trust_engine" / "testbed" / "weights" / "aligner", target, dirs_exist_ok=True)
    return "world-clip"


def test_the_panels_build(webui):
    config = webui.get("/config").json()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"trust_saliency", "trust_saliency_heatmap", "trust_saliency_summary", "trust_verify", "trust_verify_delta",
            "trust_verify_attacks", "trust_verify_grid", "trust_verify_report", "trust_verify_verdict"} <= ids


def test_saliency_finds_concept_neurons_and_leaves_the_model_alone(webui, aligner):
    base = image(webui, "a red circle")
    r = webui.post("/trust/v1/saliency", json={"concept": "a red circle", "steps": 3, "images": 1, "resolution": 64,
                                               "aligner": aligner})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mode"] == "clip" and "CLIP score" in out["summary"] and sum(out["neurons"].values()) > 0
    assert np.array_equal(image(webui, "a red circle"), base)
    bad = webui.post("/trust/v1/saliency", json={"concept": " "})
    assert bad.status_code == 422 and "concept is empty" in bad.text


@pytest.fixture()
def inspect_delta(webui):
    """A delta of its own for this module, removed afterwards (the other tier-2 modules expect their own files only
    in the session's Lora folder)."""
    r = webui.post("/trust/v1/unlearn", json=RUN)
    assert r.status_code == 200, r.text
    yield r.json()
    for path in webui.lora_dir.rglob("tier2_inspect*.safetensors"):
        path.unlink()


def test_verify_attacks_a_delta_and_leaves_the_model_alone(webui, aligner, inspect_delta):
    base = image(webui, "a red circle")
    body = {"delta": "tier2_inspect", "aligner": aligner, "attacks": "paraphrase, soft_prompt", "budget": "quick",
            "resolution": 64, "paraphrases": "a red ring\na crimson disc"}
    r = webui.post("/trust/v1/verify", json=body, timeout=1800)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["result"]["concept"] == "a red circle"  # the delta's own concept
    assert set(out["result"]["attacks"]) == {"paraphrase", "soft_prompt"}
    assert out["result"]["attacks"]["soft_prompt"]["runs"] > 0  # the token input works on the web UI's SD1.x
    assert "paraphrase: ASR" in out["report"] and "tier2_inspect at strength 1" in out["report"]
    assert isinstance(out["passed"], bool)
    assert np.array_equal(image(webui, "a red circle"), base)
    no_aligner = webui.post("/trust/v1/verify", json={**body, "aligner": ""})
    assert no_aligner.status_code == 422 and "concept aligner" in no_aligner.text
