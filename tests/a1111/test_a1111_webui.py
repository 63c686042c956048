"""Tier 2 in a real AUTOMATIC1111 (see conftest.py): the extension loads, the tab builds under the web UI's gradio,
the routes answer, a run writes a file the Lora list shows, <lora:x:1> changes the image and <lora:x:0> does not,
Interrupt stops a run with nothing written and the model unchanged (after the live curves showed in the progress),
the "TRuST delta" script adds the tag, Bake writes a checkpoint that generates like the base with the tag, and
another method (UCE) through the API writes a Lora the extension applies as the engine's difference."""

import base64
import io
import threading
import time

import numpy as np
import pytest

RUN = dict(concepts="a red circle", mode="individual", loss="CIP", steps=2, training_images=2, resolution=64, seed=0,
           learning_rate=0.05, file_name="tier2_red_circle")


def generate(webui, prompt: str, **extra) -> tuple[np.ndarray, dict]:
    import json

    from PIL import Image

    r = webui.post("/sdapi/v1/txt2img", json={"prompt": prompt, "negative_prompt": "", "steps": 3, "width": 64,
                                              "height": 64, "seed": 7, "sampler_name": "Euler", "cfg_scale": 7,
                                              **extra})
    assert r.status_code == 200, r.text
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    return pixels, json.loads(r.json()["info"])


def image(webui, prompt: str, **extra) -> np.ndarray:
    return generate(webui, prompt, **extra)[0]


def deltas(webui):
    return sorted(p.name for p in webui.lora_dir.rglob("*.safetensors"))


def test_extension_loads_and_the_tab_builds(webui):
    r = webui.get("/trust/v1/deltas")
    assert r.status_code == 200 and r.json() == {"deltas": []}
    config = webui.get("/config").json()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"trust_erase", "trust_interrupt", "trust_concepts", "trust_tag", "trust_curves", "trust_bake",
            "trust_bake_delta", "trust_bake_strength", "trust_method", "trust_method_settings"} <= ids
    # the AlwaysVisible "TRuST delta" script, in txt2img and img2img
    assert {f"trust_delta_{tab}_{part}" for tab in ("txt2img", "img2img") for part in ("enable", "file", "strength")} <= ids
    scripts = webui.get("/").text
    assert "trust.js" in scripts or "trust_start" in scripts


def test_bad_input_is_a_422_with_the_reason(webui):
    r = webui.post("/trust/v1/unlearn", json={**RUN, "steps": -3})
    assert r.status_code == 422 and "steps" in r.text


@pytest.fixture(scope="module")
def delta(webui):
    base = image(webui, "a red circle")
    start = time.time()
    r = webui.post("/trust/v1/unlearn", json=RUN)
    assert r.status_code == 200, r.text
    out = r.json()
    out["seconds"], out["base"] = time.time() - start, base
    return out


def test_a_run_writes_a_file_the_lora_list_shows(webui, delta):
    assert delta["tag"] == "<lora:tier2_red_circle:1>" and delta["family"] == "SD1.x"
    assert deltas(webui) == ["tier2_red_circle.safetensors"]
    assert webui.post("/sdapi/v1/refresh-loras").status_code == 200
    loras = webui.get("/sdapi/v1/loras").json()
    entry = next(x for x in loras if x["name"] == "tier2_red_circle")
    assert entry["metadata"]["ss_base_model_version"] == "sd_v1"
    assert [d["name"] for d in webui.get("/trust/v1/deltas").json()["deltas"]] == ["tier2_red_circle"]


def test_lora_tag_changes_the_image_and_strength_zero_does_not(webui, delta):
    base = delta["base"]
    assert np.array_equal(image(webui, "a red circle"), base)  # training left the model as it was
    erased = image(webui, "a red circle <lora:tier2_red_circle:1>")
    assert not np.array_equal(erased, base)
    assert np.array_equal(image(webui, "a red circle <lora:tier2_red_circle:0>"), base)
    assert np.array_equal(image(webui, "a red circle"), base)  # and the Lora is taken off again
    assert "didn't match keys" not in webui.log.read_text()  # every key of the file found its layer


def test_lora_extension_weights_are_base_plus_the_engines_delta_at_the_changed_rows_only(webui, delta):
    import torch

    from trust_engine.delta import Delta

    image(webui, "a red circle")  # no Lora: the extension restores the checkpoint's weights
    base = {k: torch.tensor(v) for k, v in webui.get("/trust_probe/v1/weights").json()["weights"].items()}
    image(webui, "a red circle <lora:tier2_red_circle:1>")  # the extension writes base + delta in place
    patched = {k: torch.tensor(v) for k, v in webui.get("/trust_probe/v1/weights").json()["weights"].items()}
    engine = Delta.load(delta["file"])
    assert engine.sites and set(engine.sites) <= set(base)
    for name, w in base.items():
        if name not in engine.sites:
            assert torch.equal(patched[name], w), name
            continue
        rows = engine.sites[name].rows
        expected = w + engine.dense(name).float()
        assert torch.allclose(patched[name][rows], expected[rows], atol=1e-6, rtol=0), name
        others = torch.ones(w.shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(patched[name][others], w[others]), name


def test_same_inputs_reuse_the_file(webui, delta):
    r = webui.post("/trust/v1/unlearn", json=RUN)
    assert r.status_code == 200 and r.json()["reused"] and deltas(webui) == ["tier2_red_circle.safetensors"]


def test_interrupt_stops_a_run_with_nothing_written(webui, delta):
    base = image(webui, "a red circle")
    before = deltas(webui)
    result = {}

    def run():
        result["r"] = webui.post("/trust/v1/unlearn", json={**RUN, "steps": 500, "file_name": "tier2_interrupted"})

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    seen = None
    while time.time() < deadline:
        progress = webui.get("/sdapi/v1/progress").json()
        state = progress["state"]
        # training has begun once the live curves are there (the web UI's live preview, drawn from the run's steps)
        if state.get("job") == "TRuST unlearning" and progress.get("current_image"):
            seen = progress
            break
        time.sleep(0.2)
    assert seen is not None, "the run never showed its curves in /sdapi/v1/progress"
    from PIL import Image

    curves = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert curves.size == (512, 256)
    assert "unlearn" in seen["textinfo"]
    assert webui.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(300)
    assert result["r"].status_code == 409 and "nothing was saved" in result["r"].text
    assert deltas(webui) == before
    assert np.array_equal(image(webui, "a red circle"), base)


def test_the_tab_erases_in_a_browser(webui, delta, tmp_path):
    """The tab as a user drives it (headless Chromium through playwright; skipped without them): fill the inputs,
    Erase, the live curves show while it trains, the tag appears. A1111_SCREENSHOT_DIR keeps a screenshot of the
    tab (the README's)."""
    import os
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium executable")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(webui.url, timeout=120_000)
            page.locator("#tabs > .tab-nav button", has_text="TRuST").click(timeout=120_000)
            page.fill("#trust_concepts textarea", "a red circle")
            for elem, value in (("trust_steps", "20"), ("trust_training_images", "2"), ("trust_resolution", "64"),
                                ("trust_learning_rate", "0.05"), ("trust_seed", "5")):  # seed 5: not a reuse of RUN's file
                box = page.locator(f"#{elem} input[type=number]").first
                box.fill(value)
                box.press("Tab")
            page.fill("#trust_file_name textarea, #trust_file_name input", "tier2_tab")
            page.click("#trust_erase")
            # while it trains, the curves come as the web UI's live preview over the curves image (trust.js)
            page.wait_for_selector("#trust_curves .livePreview img", timeout=240_000)
            page.wait_for_function(
                "() => (document.querySelector('#trust_tag textarea') || {}).value === '<lora:tier2_tab:1>'",
                timeout=240_000)
            page.wait_for_function("() => !document.querySelector('#trust_curves .livePreview')", timeout=60_000)
            report = page.input_value("#trust_report textarea")
            assert "Saved tier2_tab.safetensors" in report
            assert (webui.lora_dir / "TRuST" / "tier2_tab.safetensors").is_file()
            folder = os.environ.get("A1111_SCREENSHOT_DIR")
            page.screenshot(path=str((folder and os.path.join(folder, "trust_tab.png")) or tmp_path / "tab.png"),
                            full_page=True)
        finally:
            browser.close()


def test_the_delta_script_adds_the_tag(webui, delta):
    """The AlwaysVisible "TRuST delta" script through the API's alwayson_scripts: the same image as the tag typed in."""
    script = {"TRuST delta": {"args": [True, "tier2_red_circle", 1.0]}}
    pixels, info = generate(webui, "a red circle", alwayson_scripts=script)
    assert info["all_prompts"] == ["a red circle <lora:tier2_red_circle:1>"]
    assert np.array_equal(pixels, image(webui, "a red circle <lora:tier2_red_circle:1>"))
    off = {"TRuST delta": {"args": [False, "tier2_red_circle", 1.0]}}
    assert np.array_equal(image(webui, "a red circle", alwayson_scripts=off), delta["base"])
    assert "was made for another base model" not in webui.log.read_text()  # made on this very checkpoint


def test_bake_writes_a_checkpoint_that_generates_like_the_lora(webui, delta):
    """POST /trust/v1/bake: a new checkpoint (and its .yaml) in the checkpoint folder, listed at once; loaded, it gives
    the image the base gives with <lora:x:1>; the loaded model is unchanged by the bake itself."""
    folder = webui.data / "models" / "Stable-diffusion"
    r = webui.post("/trust/v1/bake", json={"delta": "nope"})
    assert r.status_code == 422 and "not in the Lora folder" in r.text
    r = webui.post("/trust/v1/bake", json={"delta": "tier2_red_circle", "file_name": "tiny_baked"})
    assert r.status_code == 200, r.text
    assert (folder / "tiny_baked.safetensors").is_file() and (folder / "tiny_baked.yaml").is_file()
    assert np.array_equal(image(webui, "a red circle"), delta["base"])  # the loaded model is as it was
    titles = [m["title"] for m in webui.get("/sdapi/v1/sd-models").json()]
    baked = next(t for t in titles if t.startswith("tiny_baked"))
    base_title = next(t for t in titles if t.startswith("tiny_sd15"))
    with_lora = image(webui, "a red circle <lora:tier2_red_circle:1>")
    assert webui.post("/sdapi/v1/options", json={"sd_model_checkpoint": baked}).status_code == 200
    try:
        assert np.array_equal(image(webui, "a red circle"), with_lora)
    finally:
        assert webui.post("/sdapi/v1/options", json={"sd_model_checkpoint": base_title}).status_code == 200
    assert np.array_equal(image(webui, "a red circle"), delta["base"])


def test_another_method_through_the_api_writes_a_lora_that_erases(webui, delta):
    """POST /trust/v1/unlearn with method "uce" (closed form, seconds): a file the Lora list shows, the Lora extension
    writes base + the engine's difference into every layer UCE edits, <lora:x:1> changes the image, <lora:x:0> not."""
    import torch

    from trust_engine.delta import Delta

    for bad, reason in (({"method": "nope"}, "unknown method 'nope'"),
                        ({"method_settings": "lr=1e-4"}, "lr is TRuST's learning_rate input"),
                        ({"method": "uce", "method_settings": "bogus=1"}, "uce has no setting 'bogus'")):
        r = webui.post("/trust/v1/unlearn", json={"concepts": "a red circle", **bad})
        assert r.status_code == 422 and reason in r.text, r.text
    r = webui.post("/trust/v1/unlearn", json={"concepts": "a red circle", "resolution": 64, "method": "uce",
                                              "method_settings": "erase_scale=30", "file_name": "tier2_uce"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tag"] == "<lora:tier2_uce:1>" and out["method"] == "uce" and "\nuce: " in out["report"]
    assert (webui.lora_dir / "TRuST" / "tier2_uce.safetensors").is_file()
    assert webui.post("/sdapi/v1/refresh-loras").status_code == 200
    entry = next(x for x in webui.get("/sdapi/v1/loras").json() if x["name"] == "tier2_uce")
    assert entry["metadata"]["method"] == "uce" and entry["metadata"]["ss_base_model_version"] == "sd_v1"
    base = delta["base"]
    assert np.array_equal(image(webui, "a red circle"), base)  # the run left the model as it was
    weights = {k: torch.tensor(v) for k, v in webui.get("/trust_probe/v1/weights").json()["weights"].items()}
    erased = image(webui, "a red circle <lora:tier2_uce:1>")
    patched = {k: torch.tensor(v) for k, v in webui.get("/trust_probe/v1/weights").json()["weights"].items()}
    assert not np.array_equal(erased, base)
    diffs = Delta.load(out["file"]).diffs()
    edited = [n for n in weights if f"{n}.weight" in diffs]
    assert edited and all(n.endswith(("to_k", "to_v")) for n in edited)
    for name, w in weights.items():
        if name in edited:
            # the extension adds a .diff in the .diff's dtype: float32 here (a --no-half model), so w + d exactly
            d = diffs[f"{name}.weight"]
            assert d.dtype == torch.float32 and torch.equal(patched[name], w + d), name
        else:
            assert torch.equal(patched[name], w), name
    assert np.array_equal(image(webui, "a red circle <lora:tier2_uce:0>"), base)
    assert np.array_equal(image(webui, "a red circle"), base)
    assert "didn't match keys" not in webui.log.read_text()
