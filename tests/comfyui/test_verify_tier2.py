"""Tier 2 (see conftest.py): the Verify Erasure node inside a real ComfyUI, on the tiny SD1.5-detectable checkpoint
patched by TRUST Unlearn: it runs every attack through ComfyUI's executor (soft prompt and Ring-A-Bell through
ComfyUI's own embedding-token path of the CLIP), reports, and leaves the base MODEL bit-identical."""

from __future__ import annotations

import pytest

from .test_tier2 import base_digest, base_graph, outputs, probe, unlearn_node  # noqa: F401 (base_digest: a fixture)
from .tier2_support import CHECKPOINT, CHECKPOINT_SDXL, REPO

ALIGNER = REPO / "trust_engine" / "testbed" / "weights" / "aligner"


def test_verify_erasure_runs_every_attack_and_leaves_the_base_identical(comfy, base_digest):  # noqa: F811
    aligners = comfy.base_dir / "models" / "concept_aligners"
    aligners.mkdir(parents=True, exist_ok=True)
    if not (aligners / "testbed").exists():
        (aligners / "testbed").symlink_to(ALIGNER, target_is_directory=True)
    entry = comfy.run(base_graph({
        "u": unlearn_node("triangle", "tier2_verify"),
        "a": {"class_type": "TrustLoadAligner", "inputs": {"aligner_name": "testbed"}},
        "v": {"class_type": "TrustVerifyErasure", "inputs": {
            "model": ["u", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "concept": "triangle",
            "attacks": "paraphrase, soft_prompt, ring_a_bell, relearn", "budget": "quick", "threshold": 0.2,
            "seed": 0, "aligner": ["a", 0], "base_model": ["ckpt", 0], "resolution": 64}},
        "after": probe(["ckpt", 0], "base after", after=["v", 2]),
    }), timeout=1800)
    report = entry["outputs"]["v"]["text"][0]
    for name in ("paraphrase", "soft_prompt", "ring_a_bell", "relearn"):
        assert f"{name}: ASR " in report and "skipped" not in report.split(f"{name}: ASR ")[1].splitlines()[0], report
    assert "aligner threshold" in report and ("PASS" in report or "FAIL" in report)
    assert outputs(entry, "base after")["digest"][0] == base_digest


@pytest.mark.parametrize("checkpoint", [CHECKPOINT, CHECKPOINT_SDXL], ids=["sd15", "sdxl"])
def test_token_input_gives_the_clips_cond_and_a_gradient_without_touching_it(comfy, checkpoint):
    """The soft-prompt attacks' token input on ComfyUI's own CLIPs (SD1ClipModel; SDXLClipModel with clip_l and
    clip_g through their embedding-token path, the ADM vector packed): the cond of the words' table rows + a prompt
    equals the cond of the words + the prompt bit for bit; the gradient reaches the soft rows (on SDXL both encoders' parts); the
    CLIP's weights stay bit-identical and get no gradient."""
    entry = comfy.run(base_graph({"t": {"class_type": "TrustProbeTokenInput", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "words": "a red",
        "prompt": "circle on a blue square"}}}, checkpoint), timeout=600)
    out = entry["outputs"]["t"]
    assert out["token_input"] == [True], out
    assert out["equal"] == [True] and out["max_abs_diff"] == [0.0], out  # bit for bit
    assert len(out["grads"]) == (2 if checkpoint == CHECKPOINT_SDXL else 1) and all(g > 0 for g in out["grads"]), out
    assert out["clip_unchanged"] == [True], out
