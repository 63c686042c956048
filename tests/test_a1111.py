"""Tier 1: the AUTOMATIC1111 adapter (a1111/) against a fake of the web UI modules it uses (tests/a1111_fake.py), on
the testbed: parts equal to the diffusers path, the web UI's model bit-identical after success / interrupt / error,
the Lora extension's in-place patches taken off first, attention optimisations undone and re-applied in pairs, files
with kohya metadata in the Lora folder, and the refusals."""

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import a1111_fake
import old_keys
import pytest
import torch
from conftest import digest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
PACK = "trust_pack_a1111_under_test"


@pytest.fixture(scope="module")
def pack():
    """The repository as a package (as scripts/trust_a1111.py imports it in the web UI)."""
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    module.a1111 = importlib.import_module(PACK + ".a1111")
    module.host = importlib.import_module(PACK + ".a1111.host")
    module.run = importlib.import_module(PACK + ".a1111.run")
    module.job = importlib.import_module(PACK + ".trust_engine.job")
    yield module
    for key in [k for k in sys.modules if k == PACK or k.startswith(PACK + ".")]:
        del sys.modules[key]


@pytest.fixture()
def web(pipe, tmp_path, pack, monkeypatch):
    """Fresh fake web UI modules around the testbed; small self-generated data sets to keep tier 1 quick."""
    original = pack.job.config_for

    def small(loss, **overrides):
        return original(loss, **{**overrides, "forget_images": 4, "preserve_images": 4, "gen_steps": 4})

    monkeypatch.setattr(pack.job, "config_for", small)
    modules = a1111_fake.make_modules(pipe, str(tmp_path / "Lora"))
    with a1111_fake.networks_installed(modules):
        yield modules


def request(pack, **overrides):
    values = dict(concepts="red circle", mode="individual", loss="CIP", steps=2, learning_rate=5e-3, resolution=64,
                  training_images=4, seed=0)
    values.update(overrides)
    return pack.run.Request(**values)


def unet_of(web):
    return web.shared.sd_model.model.diffusion_model


def files(web):
    root = web.shared.cmd_opts.lora_dir
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def test_parts_match_the_diffusers_path(pack, web, testbed):
    pipe, reference, _ = testbed
    with pack.host.a1111_parts(web.shared.sd_model, web, resolution=64) as parts:
        prompts = ["a red circle", ""]
        assert torch.equal(parts.encode_text(prompts), reference.encode_text(prompts))
        assert [b.is_negative_prompt for b in web.shared.sd_model.calls] == [False, True]
        assert torch.allclose(parts.alphas_cumprod.float(), reference.alphas_cumprod.float(), atol=1e-6)
        assert parts.prediction_type == reference.prediction_type and parts.latent_shape == reference.latent_shape
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *parts.latent_shape, generator=g)
        t = torch.tensor([10, 500])
        cond = parts.encode_text(prompts)
        ours = parts.denoise(lambda *a, **k: parts.unet(*a, **k), x, t, cond)
        theirs = reference.denoise(lambda *a, **k: reference.unet(*a, **k), x, t, cond)
        assert torch.allclose(ours, theirs, atol=1e-6)
        with torch.no_grad():
            assert torch.allclose(parts.decode(x), reference.decode(x), atol=1e-5)
        assert parts.unet is not unet_of(web)  # a private tree ...
        p = dict(parts.unet.named_parameters())
        for name, q in unet_of(web).named_parameters():  # ... over the host's own tensors (no copy)
            assert p[name].data_ptr() == q.data_ptr() and not p[name].requires_grad


def test_a_run_saves_a_lora_with_kohya_metadata_and_leaves_the_model_as_it_was(pack, web):
    before = digest(web.shared.sd_model)
    out = pack.run.unlearn(request(pack, file_name="no circles"), web)
    assert digest(web.shared.sd_model) == before
    assert web.sd_hijack.calls == ["undo", "apply"]
    assert files(web) == ["TRuST/no circles.safetensors"]
    assert out["tag"] == "<lora:no circles:1>" and out["name"] == "TRuST/no circles" and not out["reused"]
    assert web.networks.listed == 1  # the Lora list is refreshed so the tag resolves at once
    with safe_open(out["file"], framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "no circles"
    assert meta["ss_v2"] == "False" and meta["host"] == "AUTOMATIC1111"
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "Saved no circles.safetensors" in out["report"] and "Q/K/V rows" in out["report"]
    state = web.shared.state
    assert state.job == "TRuST unlearning" and state.sampling_steps == 4 + 4 + 2
    assert state.seen[-1][0] == state.sampling_steps  # the bar reaches the end
    # same inputs again: the saved file is reused, nothing trained or written
    web.sd_hijack.calls.clear()
    again = pack.run.unlearn(request(pack, file_name="no circles"), web)
    assert again["reused"] and again["file"] == out["file"] and files(web) == ["TRuST/no circles.safetensors"]
    listed = pack.run.list_deltas(web.shared)
    assert [d["name"] for d in listed] == ["no circles"] and json.loads(listed[0]["concepts"]) == ["red circle"]


def test_interrupt_leaves_the_model_unchanged_and_writes_nothing(pack, web):
    before = digest(web.shared.sd_model)
    web.shared.state.interrupt_after = 6  # during the data generation (8 images)
    with pytest.raises(pack.host.Interrupted):
        pack.run.unlearn(request(pack), web)
    assert digest(web.shared.sd_model) == before and files(web) == []
    assert web.sd_hijack.calls == ["undo", "apply"]


def test_interrupt_during_training_too(pack, web):
    before = digest(web.shared.sd_model)
    web.shared.state.interrupt_after = 9  # 8 images generated, one training step done
    with pytest.raises(pack.host.Interrupted):
        pack.run.unlearn(request(pack, steps=3), web)
    assert digest(web.shared.sd_model) == before and files(web) == []
    assert web.sd_hijack.calls == ["undo", "apply"]


def test_an_error_leaves_the_model_unchanged_and_optimisations_restored(pack, web, monkeypatch):
    before = digest(web.shared.sd_model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pack.job, "unlearn", broken)
    with pytest.raises(RuntimeError, match="boom"):
        pack.run.unlearn(request(pack), web)
    assert digest(web.shared.sd_model) == before and files(web) == []
    assert web.sd_hijack.calls == ["undo", "apply"]


def test_optimisations_stay_when_the_user_trains_with_them(pack, web):
    web.shared.opts.training_xattention_optimizations = True
    with pack.host.attention_for_training(web.sd_hijack, web.shared.opts) as undone:
        assert not undone
    assert web.sd_hijack.calls == []


def test_lora_patches_are_taken_off_before_training_and_the_file_fits_the_clean_base(pack, web):
    unet = unet_of(web)
    site = next(n for n, _ in unet.named_modules() if n.endswith("attn2.to_k"))
    module = unet.get_submodule(site)
    clean = module.weight.detach().clone()
    clean_fp = pack.job.fingerprint({k: v.clone() for k, v in pack.host.effective_site_weights(
        web.shared.sd_model).items()})
    web.networks.patch_in_place(module, "lora_unet_x", torch.full_like(clean, 0.5))
    assert not torch.equal(module.weight, clean)
    # what the adapter reads as the base is the checkpoint's weight even while the patch is written in
    assert pack.job.fingerprint(pack.host.effective_site_weights(web.shared.sd_model)) == clean_fp
    out = pack.run.unlearn(request(pack), web)
    assert torch.equal(module.weight, clean)  # restored from the extension's backup ...
    assert module.network_current_names == ()  # ... and marked so the extension re-applies its Loras next time
    assert module.network_layer_name == "lora_unet_x"  # the host layer keeps its name
    with safe_open(out["file"], framework="pt") as f:
        assert f.metadata()["base_fingerprint"] == clean_fp


def test_the_private_tree_never_carries_the_lora_extensions_state(pack, web):
    unet = unet_of(web)
    module = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_q"))
    web.networks.patch_in_place(module, "lora_unet_q", torch.zeros_like(module.weight))
    private = pack.host.private_tree(unet)
    assert not any(hasattr(m, a) for m in private.modules() for a in pack.host.NETWORK_ATTRS)
    assert hasattr(module, "network_weights_backup")


@pytest.mark.parametrize("change, message", [
    (lambda w: setattr(w.shared.cmd_opts, "lowvram", True), "lowvram"),
    (lambda w: setattr(w.shared.cmd_opts, "medvram", True), "medvram"),
    (lambda w: setattr(w.shared.sd_model, "forge_objects", object()), "Forge"),
    (lambda w: setattr(w.shared.sd_model, "is_sd3", True), "Stable Diffusion 3"),
    (lambda w: setattr(unet_of(w), "in_channels", 9), "inpainting"),
    (lambda w: w.shared.__setattr__("sd_model", None), "no checkpoint"),
    (lambda w: setattr(w.sd_unet, "current_unet", object()), "UNet replacement"),
])
def test_refusals_are_clear_and_change_nothing(pack, web, change, message):
    change(web)
    before = digest(web.shared.sd_model) if web.shared.sd_model is not None else None
    with pytest.raises(pack.host.HostModelError, match=message):
        pack.run.unlearn(request(pack), web)
    assert files(web) == [] and web.sd_hijack.calls == []
    if before is not None:
        assert digest(web.shared.sd_model) == before


def test_sdxl_refiner_is_refused(pack, web):
    m = web.shared.sd_model
    m.is_sd1, m.is_sdxl = False, True
    unet_of(web).adm_in_channels = 2560
    with pytest.raises(pack.host.HostModelError, match="refiner"):
        pack.host.model_family(m)


def test_v_prediction_and_the_original_schedule_are_used(pack, web):
    m = web.shared.sd_model
    m.parameterization = "v"
    config = pack.host.scheduler_config(m)
    assert config["prediction_type"] == "v_prediction"
    from diffusers import DDPMScheduler

    rebuilt = DDPMScheduler.from_config(config).alphas_cumprod
    assert torch.allclose(rebuilt.float(), m.alphas_cumprod_original, atol=1e-6)  # not the downcast sampling copy


def test_bad_inputs_are_refused_before_anything_runs(pack, web):
    with pytest.raises(ValueError):
        pack.run.unlearn(request(pack, steps=-1), web)
    with pytest.raises(ValueError, match="empty"):
        pack.run.unlearn(request(pack, concepts="  "), web)
    web.shared.opts.trust_lora_subfolder = "../outside"
    with pytest.raises(ValueError, match="Lora folder"):
        pack.run.unlearn(request(pack), web)
    assert files(web) == [] and web.sd_hijack.calls == []


def test_kohya_metadata_per_family(pack):
    assert pack.job.kohya_metadata("SDXL", "epsilon", "x", 1024)["ss_base_model_version"] == "sdxl_base_v1-0"
    sd2 = pack.job.kohya_metadata("SD2.x", "v_prediction", "x", 768)
    assert sd2["ss_v2"] == "True" and sd2["ss_v_parameterization"] == "True"


def test_token_input_gives_the_prompts_cond_and_a_gradient_without_touching_the_host(pack, web):
    """Soft-prompt attacks: token embeddings in, the same cond as the words out, differentiable; the host's text
    encoder keeps no gradient and no change."""
    encoder = web.shared.sd_model.cond_stage_model.transformer
    before = digest(encoder)
    with pack.host.a1111_parts(web.shared.sd_model, web, resolution=64) as parts:
        tokens = parts.token_input
        ids = tokens.tokenize("a red")
        with torch.no_grad():
            assert torch.allclose(tokens.encode("circle", tokens.table[ids]), parts.encode_text(["a red circle"]),
                                  atol=1e-6)
        soft = tokens.table[ids].clone().requires_grad_(True)
        tokens.encode("circle", soft).square().sum().backward()
        assert soft.grad is not None and float(soft.grad.abs().sum()) > 0
    assert digest(encoder) == before and all(p.grad is None for p in encoder.parameters())


@pytest.mark.parametrize("family", ["SD2.x", "SDXL"])
def test_token_input_on_sd2_and_sdxl_gives_the_web_uis_cond_and_a_gradient_without_touching_the_host(pack, tmp_path,
                                                                                                    family):
    """SD2.x (OpenCLIP) and SDXL (CLIP-L + OpenCLIP-G, the table side by side): with the rows of the prompt's first
    words the cond is exactly what get_learned_conditioning gives for the whole prompt (SDXL: with the pooled output
    and size embeddings packed); words decode through the web UI's tokenizers; the gradient reaches every encoder's
    part of the soft rows; the host's text encoders are unchanged and get no gradient."""
    web = a1111_fake.family_modules(family, str(tmp_path / "Lora"))
    sd_model = web.shared.sd_model
    text = sd_model.cond_stage_model
    before = digest(text)
    with a1111_fake.open_clip_installed(web.open_clip), \
            pack.host.a1111_parts(sd_model, web, resolution=16, need_decoder=False) as parts:
        tokens = parts.token_input
        ids = tokens.tokenize("a red")
        assert tokens.decode(ids) == "a red"
        with torch.no_grad():
            assert torch.equal(tokens.encode("circle on a blue square", tokens.table[ids]),
                               parts.encode_text(["a red circle on a blue square"]))
        soft = tokens.table[ids].clone().requires_grad_(True)
        tokens.encode("circle", soft).square().sum().backward()
        # SDXL: CLIP-L's width, then OpenCLIP-G's
        first = text.embedders[0].wrapped.transformer.get_input_embeddings().wrapped.weight.shape[1] \
            if family == "SDXL" else tokens.table.shape[1]
        assert float(soft.grad[:, :first].abs().sum()) > 0
        assert family != "SDXL" or float(soft.grad[:, first:].abs().sum()) > 0
    assert digest(text) == before and all(p.grad is None for p in text.parameters())


@pytest.mark.parametrize("family", ["SD1.x", "SDXL"])
def test_token_input_trees_are_not_patched_by_the_lora_extension(pack, request, tmp_path, monkeypatch, family):
    """The built-in Lora extension patches a layer in place from the layer's own forward when the layer carries its
    per-layer state (network_layer_name); the token input's private trees share the host's tensors, so they must not
    carry it, or encoding a soft prompt would write the host's text encoder."""
    if family == "SD1.x":
        web = request.getfixturevalue("web")
    else:
        web = a1111_fake.family_modules(family, str(tmp_path / "Lora"))
    text = web.shared.sd_model.cond_stage_model
    layers = [m for m in text.modules() if isinstance(m, torch.nn.Linear)]
    for i, layer in enumerate(layers):
        layer.network_layer_name = f"te_layer_{i}"  # what the extension sets on every layer it may patch
    forward = torch.nn.Linear.forward

    def network_linear_forward(self, x):  # network_apply_weights(self), reduced to "patch when it has a name"
        if getattr(self, "network_layer_name", None) is not None:
            with torch.no_grad():
                self.weight += 1
        return forward(self, x)

    before = digest(text)
    with a1111_fake.open_clip_installed(getattr(web, "open_clip", None)), \
            pack.host.a1111_parts(web.shared.sd_model, web, resolution=16, need_decoder=False) as parts:
        tokens = parts.token_input
        parts.encode_text([""])  # the host's own encoding (SDXL's size embeddings come from it), before the hook
        monkeypatch.setattr(torch.nn.Linear, "forward", network_linear_forward)
        with torch.no_grad():
            tokens.encode("a red circle", tokens.table[tokens.tokenize("a")])
        monkeypatch.setattr(torch.nn.Linear, "forward", forward)
    assert digest(text) == before


# --- the AlwaysVisible "TRuST delta" script ------------------------------------------------------------------------


class Processing:
    """What the script reads and writes of StableDiffusionProcessing (txt2img with hires fix)."""

    def __init__(self, sd_model, prompts):
        self.sd_model, self.all_prompts, self.all_hr_prompts = sd_model, list(prompts), list(prompts)
        self.comments: dict[str, int] = {}

    def comment(self, text):
        self.comments[text] = 1


@pytest.fixture()
def script(pack):
    module = importlib.import_module(PACK + ".a1111.delta_script")
    module._MODEL_FINGERPRINTS.clear()
    return module


def test_the_delta_script_adds_the_tag_and_stays_quiet_on_the_base_it_was_made_for(pack, web, script):
    pack.run.unlearn(request(pack, file_name="no circles"), web)
    assert script.choices(web.shared) == [script.NONE, "no circles"]
    p = Processing(web.shared.sd_model, ["a red circle", "", "a cat <lora:no circles:0.3>"])
    assert script.process(p, True, "no circles", 0.75, web.shared) is None
    assert p.all_prompts == ["a red circle <lora:no circles:0.75>", "<lora:no circles:0.75>",
                             "a cat <lora:no circles:0.3>"]  # a prompt naming the Lora already keeps its own tag
    assert p.all_hr_prompts == p.all_prompts and p.comments == {}
    off = Processing(web.shared.sd_model, ["a red circle"])
    script.process(off, False, "no circles", 1.0, web.shared)
    script.process(off, True, script.NONE, 1.0, web.shared)
    assert off.all_prompts == ["a red circle"]
    with pytest.raises(ValueError, match="not in the Lora folder"):
        script.process(off, True, "gone", 1.0, web.shared)


def test_the_delta_script_warns_on_another_base_and_notes_a_lightly_modified_one(pack, web, script):
    pack.run.unlearn(request(pack, file_name="no circles"), web)
    model = web.shared.sd_model
    sites = [m for n, m in unet_of(web).named_modules() if n.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v"))]
    with torch.no_grad():
        sites[0].weight[0, :4].neg_()  # a few weights of one site: the same base, lightly modified
    model.sd_model_hash = "lightly modified"
    p = Processing(model, ["a red circle"])
    note = script.process(p, True, "no circles", 1.0, web.shared)
    assert "lightly modified" in note and "WARNING" not in note and note in p.comments
    assert p.all_prompts == ["a red circle <lora:no circles:1>"]
    with torch.no_grad():
        for m in sites:
            m.weight.neg_()  # every sign flipped: another model
    model.sd_model_hash = "another model"
    p = Processing(model, ["a red circle"])
    warning = script.process(p, True, "no circles", 1.0, web.shared)
    assert warning.startswith("TRuST WARNING: no circles was made for another base model") and warning in p.comments
    assert p.all_prompts == ["a red circle <lora:no circles:1>"]  # applied anyway, as the Lora tab would


# --- Bake ----------------------------------------------------------------------------------------------------------


@pytest.fixture()
def baker(pack):
    return importlib.import_module(PACK + ".a1111.bake")


def checkpoints(web):
    return sorted(p.name for p in Path(web.sd_models.model_path).iterdir())


def test_bake_writes_a_new_checkpoint_with_the_delta_merged_and_leaves_the_model_alone(pack, web, baker):
    from safetensors.torch import load_file

    from trust_engine.delta import Delta

    pack.run.unlearn(request(pack, file_name="no circles"), web)
    before = digest(web.shared.sd_model)
    source = load_file(web.shared.sd_model.sd_checkpoint_info.filename)
    Path(web.sd_models.model_path, "tiny.yaml").write_text("model: {}\n")  # a model config beside the base
    out = baker.bake(baker.BakeRequest(delta="no circles", strength=0.5), web)
    assert digest(web.shared.sd_model) == before
    assert checkpoints(web) == ["tiny.safetensors", "tiny.yaml", "tiny_no circles.safetensors",
                                "tiny_no circles.yaml"] and web.sd_models.listed == 1
    assert "tiny_no circles.safetensors" in out["report"] and "loaded model is unchanged" in out["report"]
    baked = load_file(out["file"])
    assert set(baked) == set(source)
    delta = Delta.load(Path(web.shared.cmd_opts.lora_dir) / "TRuST" / "no circles.safetensors")
    changed = {f"model.diffusion_model.{n}" for n in delta.diffs()}
    assert changed and changed <= set(source)
    for key, tensor in source.items():
        if key not in changed:
            assert torch.equal(baked[key], tensor), key
            continue
        name = key.removeprefix("model.diffusion_model.")
        expected = (tensor.float() + 0.5 * delta.diffs()[name].float()).to(tensor.dtype)
        assert torch.equal(baked[key], expected) and not torch.equal(baked[key], tensor), key
    again = baker.bake(baker.BakeRequest(delta="no circles", strength=0.5), web)  # never overwrites
    assert Path(again["file"]).name == "tiny_no circles_2.safetensors"
    assert web.shared.state.job == "TRuST bake" and web.shared.state.sampling_step == 3


def test_bake_refuses_a_delta_made_for_another_base_and_writes_nothing(pack, web, baker):
    import a1111_fake

    pack.run.unlearn(request(pack, file_name="no circles"), web)
    unet = unet_of(web)
    other = Path(web.sd_models.model_path) / "other.safetensors"
    flipped = {f"model.diffusion_model.{s.name}.weight": -unet.get_submodule(s.diffusers_name).weight.detach()
               for s in pack.host.find_sites(unet, include_out=True)}  # every sign flipped: another model
    a1111_fake.write_checkpoint(unet, str(other), extra=flipped)
    web.shared.sd_model.sd_checkpoint_info = a1111_fake.CheckpointInfo(str(other))
    with pytest.raises(ValueError, match="another base model .* nothing was written"):
        baker.bake(baker.BakeRequest(delta="no circles"), web)
    assert checkpoints(web) == ["other.safetensors", "tiny.safetensors"] and web.sd_models.listed == 0


def test_bake_refuses_bad_input_and_stops_when_interrupted(pack, web, baker):
    pack.run.unlearn(request(pack, file_name="no circles"), web)
    with pytest.raises(ValueError, match="strength"):
        baker.bake(baker.BakeRequest(delta="no circles", strength=7.0), web)
    with pytest.raises(ValueError, match="choose the TRuST delta"):
        baker.bake(baker.BakeRequest(delta=""), web)
    with pytest.raises(ValueError, match="not in the Lora folder"):
        baker.bake(baker.BakeRequest(delta="missing"), web)
    web.shared.state.interrupt_after = 1  # once the checkpoint is read
    with pytest.raises(pack.host.Interrupted, match="no checkpoint was written"):
        baker.bake(baker.BakeRequest(delta="no circles"), web)
    assert checkpoints(web) == ["tiny.safetensors"] and web.sd_models.listed == 0


# --- live curves ---------------------------------------------------------------------------------------------------


def test_the_curves_are_drawn_live_as_the_web_uis_preview(pack, web, monkeypatch):
    import numpy as np

    from trust_engine.render import training_curves

    monkeypatch.setattr(pack.host.HostProgress, "CURVES_EVERY", 0.0)
    out = pack.run.unlearn(request(pack, steps=3), web)
    images = web.shared.state.images
    assert len(images) == 3  # one per training step (none while the data is generated)
    assert [np.asarray(images[i]).shape for i in range(3)] == [(256, 512, 3)] * 3
    title = pack.run.curves_title(request(pack))
    assert np.array_equal(np.asarray(images[-1]), training_curves(out["history"], title))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[-1]))  # it grows step by step


def test_the_curves_are_throttled_but_the_last_step_always_draws(pack, web, monkeypatch):
    import numpy as np

    from trust_engine.render import training_curves

    monkeypatch.setattr(pack.host.HostProgress, "CURVES_EVERY", 1e12)  # never due: only the last step draws
    out = pack.run.unlearn(request(pack, steps=3), web)
    images = web.shared.state.images
    assert len(images) == 1
    assert np.array_equal(np.asarray(images[-1]), training_curves(out["history"], pack.run.curves_title(request(pack))))


# --- the other erasers (method / method_settings) ------------------------------------------------------------------


@pytest.fixture()
def tab(pack, web, monkeypatch):
    """The tab's Erase function (a1111/ui.py) running on the fake web UI."""
    monkeypatch.setattr(pack.run, "web_ui_modules", lambda: web)
    return importlib.import_module(PACK + ".a1111.ui")


def erase_args(**overrides):
    """The Erase button's inputs in the tab's order (`inputs` in ui.tabs), id_task first and the method last."""
    values = dict(concepts="red circle", mode="individual", loss="CIP", steps=2, learning_rate=5e-3, relative_lr=0.1,
                  beta=0.0, xi=2.0, mask_refresh=1, seed=0, training_images=4, resolution=64, preserve="",
                  file_name="", aligner="None (noise-contrast saliency)", method="trust", method_settings="")
    values.update(overrides)
    return ["task(1)", *values.values()]


def test_uce_from_the_tab_saves_the_engines_uce_delta_in_the_lora_folder(pack, web, tab):
    from safetensors.torch import load_file

    methods = pack.job.methods
    before = digest(web.shared.sd_model)
    tag, curves, report, file_html, _ = tab.erase(*erase_args(method="uce", method_settings="erase_scale=30\nlamb=0.5"))
    assert digest(web.shared.sd_model) == before
    assert web.sd_hijack.calls == ["undo", "apply"] and web.networks.listed == 1
    assert files(web) == ["TRuST/trust_uce_red_circle.safetensors"] and tag == "<lora:trust_uce_red_circle:1>"
    assert curves is None  # UCE is closed-form: no curve to show
    assert report.startswith("Saved trust_uce_red_circle.safetensors") and "\nuce: " in report
    assert '"erase_scale": 30.0' in report  # the settings used
    path = Path(web.shared.cmd_opts.lora_dir) / "TRuST" / "trust_uce_red_circle.safetensors"
    # the same method on the same inputs, straight through the engine
    expanded = importlib.import_module(PACK + ".trust_engine.concepts").expand_all("red circle", "individual")
    with pack.host.a1111_parts(web.shared.sd_model, web, resolution=64, need_decoder=False) as parts:
        expected = methods.run("uce", parts, expanded, methods.config_for("uce", erase_scale=30.0))
    assert expected.params
    written = load_file(str(path))
    # in float32 on a float32 model: the web UI adds a .diff in its own dtype (float16 would round the whole layer)
    wanted = expected.to_lora(torch.float32)
    assert {t.dtype for k, t in written.items() if k.endswith(".diff")} == {torch.float32}
    assert set(written) == set(wanted)
    for key, tensor in wanted.items():
        assert torch.equal(written[key], tensor), key
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "uce" and meta["host"] == "AUTOMATIC1111" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "trust_uce_red_circle"
    state = web.shared.state
    assert state.sampling_steps == 100 and state.seen[-1][0] == 100  # by stage: the edit's share done, out of 100
    assert state.textinfo.startswith("uce edit")
    assert [d["method"] for d in pack.run.list_deltas(web.shared)] == ["uce"]
    # the same inputs again: reused, and the report still names the method
    web.sd_hijack.calls.clear()
    again = pack.run.unlearn(request(pack, method="uce", method_settings="erase_scale=30"), web)
    assert again["reused"] and again["file"] == str(path) and files(web) == ["TRuST/trust_uce_red_circle.safetensors"]
    assert "\nuce: " in again["report"] and again["method"] == "uce"


def test_interrupting_a_uce_run_writes_nothing(pack, web):
    before = digest(web.shared.sd_model)
    web.shared.state.interrupt_after = 40  # 40 % of the layers edited
    with pytest.raises(pack.host.Interrupted):
        pack.run.unlearn(request(pack, method="uce"), web)
    assert digest(web.shared.sd_model) == before and files(web) == []
    assert web.sd_hijack.calls == ["undo", "apply"]


def test_esd_shows_its_live_loss_curve_in_the_tab(pack, web, tab):
    """Methods that record no curve in their delta but report a loss per step (ESD, SalUn): the curve drawn live."""
    _, curves, report, _, _ = tab.erase(*erase_args(method="esd", method_settings="iterations=2, ddim_steps=2"))
    assert curves is not None and curves.shape == (256, 512, 3)
    assert "\nesd: " in report and files(web) == ["TRuST/trust_esd_red_circle.safetensors"]


@pytest.mark.parametrize("method, settings, message", [
    ("nope", "", "unknown method 'nope'"),
    ("trust", "lr=1e-4", "lr is TRuST's learning_rate input: set it there"),
    ("trust", "row_budget=2", "row_budget = 2.0 is not allowed"),
    ("uce", "bogus=1", "uce has no setting 'bogus'"),
    ("uce", "erase_scale=big", "expected a number"),
    ("uce", "erase_scale=-1", "erase_scale must lie in"),
    ("esd", "lr", "write it as key=value"),
])
def test_a_bad_method_or_method_setting_is_refused_before_any_work(pack, web, method, settings, message):
    before = digest(web.shared.sd_model)
    with pytest.raises(ValueError, match=message):
        pack.run.unlearn(request(pack, method=method, method_settings=settings), web)
    assert files(web) == [] and web.sd_hijack.calls == [] and web.shared.sd_model.calls == []
    assert web.shared.state.seen == [] and digest(web.shared.sd_model) == before


def test_a_request_without_the_method_fields_still_runs_trust(pack, web):
    """Calls written before there were other methods (the API's JSON, the dataclass's positional order) keep their
    meaning: TRuST, with the cache key TRuST files always had (a UCE file for the same concept is not reused)."""
    uce = pack.run.unlearn(request(pack, method="uce"), web)
    api = importlib.import_module(PACK + ".a1111.api")
    old = {"concepts": "red circle", "steps": 2, "learning_rate": 5e-3, "resolution": 64, "training_images": 4}
    body = api.request_model()(**old)
    out = pack.run.unlearn(pack.run.Request(**api.values(body)), web)
    assert out["method"] == "trust" and not out["reused"] and out["file"] != uce["file"]
    assert files(web) == ["TRuST/trust_red_circle.safetensors", "TRuST/trust_uce_red_circle.safetensors"]
    with safe_open(out["file"], framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "trust" and meta["loss"] == "cip"
    # the key as TRuST files held it before there were other methods (no "method" entry), so they are still reused
    import hashlib

    expanded = importlib.import_module(PACK + ".trust_engine.concepts").expand_all("red circle", "individual")
    config = old_keys.old_config(pack.job.build_config("CIP", 2, 5e-3, 0.1, 0.0, 2.0, 1, 0, 4))
    blob = json.dumps({"concepts": [(e.text, e.mode, e.forget, e.preserve, e.anchor) for e in expanded],
                       "config": config, "resolution": 64, "aligner": "", "neurons": "",
                       "base": meta["base_fingerprint"], "engine": pack.job.__version__}, sort_keys=True)
    assert meta["cache_key"] == hashlib.sha256(blob.encode()).hexdigest()[:32]
    positional = pack.run.Request("red circle", "individual", "CIP", 2, 5e-3, 0.1, 0.0, 2.0, 1, 0, 4, 64, "", "", "")
    assert positional.method == "trust" and positional.method_settings == ""


# --- concept saliency and verify in the tab --------------------------------------------------------------------------


@pytest.fixture()
def aligner_folder(web):
    """The testbed's CLIP as models/concept_aligners/world-clip beside the fake's Lora folder."""
    import shutil

    from trust_engine.testbed import paths

    target = Path(web.shared.cmd_opts.lora_dir).parent / "concept_aligners" / "world-clip"
    shutil.copytree(paths.ALIGNER, target)
    return "world-clip"


@pytest.fixture()
def inspect(pack):
    return types.SimpleNamespace(saliency=importlib.import_module(PACK + ".a1111.saliency"),
                                 verify=importlib.import_module(PACK + ".a1111.verify"),
                                 script=importlib.import_module(PACK + ".a1111.delta_script"))


def test_saliency_finds_concept_neurons_and_leaves_the_model_alone(pack, web, inspect, aligner_folder):
    before = digest(web.shared.sd_model)
    out = inspect.saliency.find(inspect.saliency.SaliencyRequest(concept="a triangle", steps=4, images=1,
                                                                 resolution=64, aligner=aligner_folder), web)
    assert out["heatmap"].ndim == 3 and out["heatmap"].shape[-1] == 3 and out["heatmap"].dtype.name == "uint8"
    assert "'a triangle'" in out["summary"] and "CLIP score" in out["summary"] and out["mode"] == "clip"
    assert sum(out["neurons"].values()) > 0
    assert digest(web.shared.sd_model) == before and web.shared.state.job == "TRuST concept saliency"
    plain = inspect.saliency.find(inspect.saliency.SaliencyRequest(concept="a triangle", steps=4, images=1,
                                                                   resolution=64), web)
    assert "noise contrast" in plain["summary"]
    with pytest.raises(ValueError, match="concept is empty"):
        inspect.saliency.find(inspect.saliency.SaliencyRequest(concept=" "), web)
    with pytest.raises(ValueError, match="xi"):
        inspect.saliency.find(inspect.saliency.SaliencyRequest(concept="a triangle", xi=9.0), web)


def test_put_delta_gives_a_private_tree_the_deltas_weights_without_writing_the_hosts(pack, web):
    from trust_engine.delta import Delta

    pack.run.unlearn(request(pack, file_name="no circles"), web)
    delta = Delta.load(Path(web.shared.cmd_opts.lora_dir) / "TRuST" / "no circles.safetensors")
    unet = unet_of(web)
    before = digest(unet)
    private = pack.host.private_tree(unet)
    assert pack.host.put_delta(private, delta, 0.5) == len(delta.sites)
    assert digest(unet) == before
    for site in pack.host.find_sites(unet):
        base = unet.get_submodule(site.diffusers_name).weight
        mine = private.get_submodule(site.diffusers_name).weight
        if site.name in delta.sites:
            expected = base.float() + 0.5 * delta.sites[site.name].dense().float()
            assert torch.equal(mine, expected.to(base.dtype)) and not torch.equal(mine, base), site.name
        else:
            assert mine.data_ptr() == base.data_ptr(), site.name  # untouched sites still share the host's tensor


def _tiny_budget(monkeypatch):
    module = importlib.import_module(PACK + ".trust_engine.attacks")
    tiny = {**module.BUDGETS["quick"], "paraphrase": {"prompts": 2, "images": 1, "steps": 4}}
    monkeypatch.setitem(module.BUDGETS, "quick", tiny)


def test_verify_attacks_the_delta_on_the_loaded_checkpoint_and_leaves_it_alone(pack, web, inspect, aligner_folder,
                                                                             monkeypatch):
    pack.run.unlearn(request(pack, file_name="no circles"), web)
    _tiny_budget(monkeypatch)
    seen = {}
    real = inspect.verify.run_verify

    def spy(patched, concept, names, **kwargs):
        seen.update(patched=patched, base=kwargs["base"], concept=concept, names=list(names))
        return real(patched, concept, names, **kwargs)

    monkeypatch.setattr(inspect.verify, "run_verify", spy)
    before = digest(web.shared.sd_model)
    out = inspect.verify.verify(inspect.verify.VerifyRequest(delta="no circles", aligner=aligner_folder,
                                                            attacks="paraphrase", resolution=64,
                                                            paraphrases="a red ring\na picture of a red circle"), web)
    assert seen["concept"] == "red circle" and seen["names"] == ["paraphrase"]  # the delta's own concept
    changed = [s for s in pack.host.find_sites(seen["base"].unet)
               if not torch.equal(seen["base"].unet.get_submodule(s.diffusers_name).weight,
                                  seen["patched"].unet.get_submodule(s.diffusers_name).weight)]
    assert changed  # the attacked model carries the delta, the base does not
    assert "paraphrase: ASR" in out["report"] and "aligner threshold" in out["report"]
    assert "no circles at strength 1" in out["report"]
    assert isinstance(out["passed"], bool) and out["json"]["attacks"]["paraphrase"]["runs"] == 2
    assert out["grid"].ndim == 3 and out["grid"].shape[-1] == 3
    assert digest(web.shared.sd_model) == before and web.shared.state.job == "TRuST verify"
    assert web.sd_hijack.calls.count("undo") == web.sd_hijack.calls.count("apply")


def test_verify_refuses_bad_input_and_another_base_and_stops_when_interrupted(pack, web, inspect, aligner_folder,
                                                                            monkeypatch):
    import dataclasses

    from trust_engine.delta import Delta

    pack.run.unlearn(request(pack, file_name="no circles"), web)
    V = inspect.verify.VerifyRequest
    for bad, message in [(dict(delta=""), "choose the TRuST delta"), (dict(aligner=""), "concept aligner"),
                         (dict(attacks="paraphrase, nope"), "unknown attack 'nope'"),
                         (dict(budget="huge"), "budget must be"), (dict(threshold=1.5), "threshold must be"),
                         (dict(strength=7.0), "strength"), (dict(delta="missing"), "not in the Lora folder")]:
        with pytest.raises(ValueError, match=message):
            inspect.verify.verify(V(**{"delta": "no circles", "aligner": aligner_folder, **bad}), web)
    folder = Path(web.shared.cmd_opts.lora_dir) / "TRuST"
    delta = Delta.load(folder / "no circles.safetensors")
    metadata = {k: v for k, v in delta.metadata.items() if k != "base_sketch"}
    dataclasses.replace(delta, base_fingerprint="0" * 64, metadata=metadata).save(folder / "elsewhere.safetensors")
    inspect.script._MODEL_FINGERPRINTS.clear()
    with pytest.raises(ValueError, match="another base model"):
        inspect.verify.verify(V(delta="elsewhere", aligner=aligner_folder), web)
    _tiny_budget(monkeypatch)
    before = digest(web.shared.sd_model)
    web.shared.state.interrupt_after = 1
    with pytest.raises(pack.host.Interrupted):
        inspect.verify.verify(V(delta="no circles", aligner=aligner_folder, attacks="paraphrase", resolution=64), web)
    assert digest(web.shared.sd_model) == before
    assert web.sd_hijack.calls.count("undo") == web.sd_hijack.calls.count("apply")


def test_a_concept_type_reaches_the_key_and_the_report_and_old_requests_mean_none(pack, web, tab, monkeypatch):
    """The tab's and the API's concept_type (last, default 'none'): a request without it computes the key it always
    did; a concept type changes the key and the report says what it added. Every run here is a cache hit on a saved
    file (no training): only the inputs' path to the key is under test."""
    import dataclasses

    keys = []
    fixture = str(ROOT / "tests" / "fixtures" / "deltas" / "erase_triangle.safetensors")
    monkeypatch.setattr(pack.job, "find_cached", lambda folder, key: keys.append(key) or fixture)
    old = pack.run.unlearn(request(pack), web)
    _, _, none, _, _ = tab.erase(*erase_args(concept_type="none"))
    _, _, typed, _, _ = tab.erase(*erase_args(concept_type="person"))
    assert keys[0] == keys[1] != keys[2]
    assert "Concept type" not in old["report"] and "Concept type" not in none
    assert "Concept type 'person' added 12 preserve prompts" in typed and "Anchor: 'a person'" in typed
    assert [f.name for f in dataclasses.fields(pack.run.Request)][-1] == "concept_type"
    api = importlib.import_module(PACK + ".a1111.api")
    assert api.values(api.request_model()(concepts="red circle"))["concept_type"] == "none"
    with pytest.raises(ValueError, match="unknown concept type 'nsfw'"):
        pack.run.unlearn(request(pack, concept_type="nsfw"), web)
