"""Tier 1: the ComfyUI nodes against a fake of the ComfyUI calls they use (tests/comfy_fake.py), on the testbed.
Checks the node contract, that the host MODEL is never written, files, reuse, warnings and errors."""

import json
import os
import shutil

import comfy_fake
import old_keys
import pytest
import torch
from conftest import digest, node


@pytest.fixture(autouse=True)
def small_data_sets(pack, monkeypatch):
    """Fewer and shorter self-generated images than the defaults, to keep tier 1 quick on 2 CPU cores."""
    original = pack.trust_engine.unlearn.config_for

    def small(loss, **overrides):
        return original(loss, **{"forget_images": 8, "preserve_images": 8, "gen_steps": 6, **overrides})

    monkeypatch.setattr(pack.trust_engine.job, "config_for", small)  # what TRUST Unlearn builds its config with


def fast(**overrides):
    values = dict(mode="individual", loss="CIP", steps=3, learning_rate=5e-3, beta=0.0, xi=2.0, mask_refresh=1,
                  training_seed=0, file_name="", resolution=32)
    values.update(overrides)
    return values


def test_node_contract_names_tooltips_and_defaults(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TrustConceptSaliency"] == "Concept Saliency"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TrustUnlearn"] == "TRUST Unlearn"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TrustApplyDelta"] == "Apply Unlearned Delta"
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "unlearning/TRuST", name
        assert cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), name
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for input_name, (kind, *options) in spec.get(group, {}).items():
                opts = options[0] if options else {}
                assert opts.get("tooltip"), f"{name}.{input_name} has no tooltip"
                if kind in ("INT", "FLOAT", "STRING"):
                    assert "default" in opts, f"{name}.{input_name} has no default"


def test_unlearn_returns_a_patched_clone_and_never_writes_the_host_model(pack, host):
    model, clip, vae = host
    before = digest(model.model)
    patched, delta, curves, report = node(pack, "TrustUnlearn").unlearn(
        model, clip, vae, "triangle", **fast(file_name="tri"))["result"]
    assert digest(model.model) == before
    assert model.patches == {}, "the input MODEL must not gain patches"
    assert patched is not model and patched.model is model.model
    changed = [k for k in patched.patches]
    assert changed and all(".attn2.to_" in k for k in changed)
    assert curves.shape[0] == 1 and curves.shape[-1] == 3 and 0 <= float(curves.min()) <= float(curves.max()) <= 1
    assert "Saved tri.safetensors" in report and "noise contrast" in report
    # the saved file through the (fake) stock LoRA path gives the node's patched weights exactly
    saved = pack.trust_engine.delta.Delta.load(delta.path)
    again, _ = comfy_fake.load_lora_for_models(model, None, saved.to_lora(), 1.0, 0)
    a, b = again.patched_state_dict(), patched.patched_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(b[k], model.model.state_dict()[k]) for k in changed)


def test_same_inputs_reuse_the_saved_delta_and_say_so(pack, host):
    model, clip, vae = host
    first = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a star", **fast(file_name="star"))["result"]
    second = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a star", **fast(file_name="star"))["result"]
    assert "Reused star.safetensors" in second[3]
    assert second[1].path == first[1].path
    third = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a star", **fast(file_name="star", training_seed=1))["result"]
    assert third[1].path.endswith("star_2.safetensors"), "a different run must not overwrite the user's file"


def test_training_images_sets_the_generated_data_sets(pack, host):
    model, clip, vae = host
    _, delta, _, _ = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a square",
                                                        **fast(file_name="few", training_images=4))["result"]
    config = json.loads(delta.delta.metadata["config"])
    assert (config["forget_images"], config["preserve_images"]) == (4, 8)


def test_learning_rate_keeps_its_old_meaning_and_zero_means_relative(pack, host):
    """Saved workflows hold an absolute learning_rate (0.005): it stays absolute. New ones hold 0 and relative_lr."""
    model, clip, vae = host
    _, old, _, report_old = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a square",
                                                               **fast(file_name="lr_old", training_images=4))["result"]
    _, new, _, report_new = node(pack, "TrustUnlearn").unlearn(
        model, clip, vae, "a square", **fast(file_name="lr_new", training_images=4, learning_rate=0.0,
                                             relative_lr=0.2))["result"]
    old_config, new_config = (json.loads(d.delta.metadata["config"]) for d in (old, new))
    assert old_config["lr"] == 5e-3
    assert new_config["lr"] is None and new_config["relative_lr"] == 0.2
    assert "relative row change per step" in report_new and "0.2 x each site's weight RMS" in report_new
    spec = pack.NODE_CLASS_MAPPINGS["TrustUnlearn"].INPUT_TYPES()
    assert list(spec["optional"])[-4:] == ["relative_lr", "method", "method_settings", "concept_type"], \
        "new inputs go last so saved widget values stay in place"
    assert spec["required"]["learning_rate"][1]["default"] == 0.0


def test_training_tells_model_management_what_it_needs(pack, host):
    model, clip, vae = host
    loaded, freed = comfy_fake.memory_requests()
    seen = len(loaded)
    node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a circle", **fast(file_name="memory", training_images=4))
    unet_bytes = sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())
    requests = [need for models, need in loaded[seen:] if model in models and need]
    assert requests and requests[-1] > unet_bytes
    assert freed and freed[-1] == requests[-1]


def test_fp8_weights_are_up_cast_in_the_private_copy(pack):
    layer = torch.nn.Linear(4, 4).to(torch.float8_e4m3fn)
    copy = pack.nodes.host._private_copy(torch.nn.Sequential(layer), torch.bfloat16)
    assert copy[0].weight.dtype == torch.bfloat16 and layer.weight.dtype == torch.float8_e4m3fn


def test_interruption_and_failure_leave_the_model_bit_identical_and_save_nothing(pack, host, tmp_path):
    model, clip, vae = host
    before = digest(model.model)
    files = set(pack.nodes.host.delta_dir() and _listing(pack))
    comfy_fake.interrupt_after(5)
    try:
        with pytest.raises(comfy_fake.InterruptProcessingException):
            node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a circle", **fast(file_name="cut"))
    finally:
        comfy_fake.interrupt_after(None)
    assert digest(model.model) == before and model.patches == {}
    assert set(_listing(pack)) == files
    with pytest.raises(ValueError, match="another base|unknown sites|another model"):
        bad = pack.nodes.trust_nodes.ConceptNeurons("x", None, "0" * 64)
        node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a circle", **fast(), concept_neurons=bad)
    assert digest(model.model) == before


def _listing(pack):
    import os

    folder = pack.nodes.host.delta_dir()
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_out_of_memory_becomes_an_instruction(pack, host, monkeypatch):
    model, clip, vae = host

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pack.nodes.trust_nodes.methods, "run", boom)
    with pytest.raises(RuntimeError, match="out of GPU memory.*lower 'resolution'.*unchanged"):
        node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a circle", **fast(file_name="oom"))


def test_bad_inputs_give_specific_errors(pack, host):
    model, clip, vae = host
    assert "empty" in pack.NODE_CLASS_MAPPINGS["TrustUnlearn"].VALIDATE_INPUTS(concepts="  \n ")
    with pytest.raises(ValueError, match="type the concept"):
        node(pack, "TrustUnlearn").unlearn(model, clip, vae, "   ", **fast())
    other = comfy_fake.ModelPatcher(comfy_fake.BaseModel(model.model.diffusion_model, _Sched(), 1.0,
                                                         type("Flux", (), {})()))
    with pytest.raises(ValueError, match="Flux.*1.x, 2.x and SDXL"):
        node(pack, "TrustUnlearn").unlearn(other, clip, vae, "a circle", **fast())
    with pytest.raises(ValueError, match="no CLIP"):
        node(pack, "TrustConceptSaliency").find(model, None, vae, "a circle", 2.0, 0, 4, 1, resolution=32)


class _Sched:
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)


def test_saliency_node_gives_neurons_a_heatmap_and_a_summary(pack, host):
    model, clip, vae = host
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = node(pack, "TrustConceptSaliency").find(model, clip, vae, "a triangle", 2.0, 0, 4, 1, resolution=32)
    neurons, heatmap, summary = out["result"]
    assert neurons.result.total() > 0
    assert heatmap.ndim == 4 and heatmap.shape[-1] == 3 and heatmap.shape[1] > 100
    assert "concept neurons" in summary and "noise contrast" in summary
    assert out["ui"]["images"][0]["type"] == "temp"
    # the neurons seed TRUST Unlearn's first step
    result = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a triangle", **fast(steps=1, mask_refresh=0,
                                                file_name="seeded"), concept_neurons=neurons)["result"]
    changed = sum(d.rank for d in result[1].delta.sites.values())
    assert 0 < changed <= neurons.result.total()


def test_saliency_with_an_aligner_folder_uses_the_clip_score(pack, host):
    import folder_paths

    from trust_engine.testbed import paths

    model, clip, vae = host
    target = folder_paths.get_folder_paths("concept_aligners")[0]
    shutil.copytree(paths.ALIGNER, f"{target}/world-clip", dirs_exist_ok=True)
    assert "world-clip" in pack.NODE_CLASS_MAPPINGS["TrustLoadAligner"].INPUT_TYPES()["required"]["aligner_name"][0]
    (aligner,) = node(pack, "TrustLoadAligner").load("world-clip")
    _, _, summary = node(pack, "TrustConceptSaliency").find(model, clip, vae, "a triangle", 2.0, 0, 4, 1,
                                                            aligner=aligner, resolution=32)["result"]
    assert "CLIP score" in summary


def test_apply_delta_from_a_file_with_strength_and_a_warning_for_another_base(pack, host):
    model, clip, vae = host
    _, delta, _, _ = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a square", **fast(file_name="sq"))["result"]
    files = pack.NODE_CLASS_MAPPINGS["TrustApplyDelta"].INPUT_TYPES()["required"]["delta_file"][0]
    assert "sq.safetensors" in files
    half, info = node(pack, "TrustApplyDelta").apply(model, "sq.safetensors", 0.5)["result"]
    full, _ = node(pack, "TrustApplyDelta").apply(model, "(none: use the delta input)", 1.0, delta=delta)["result"]
    key = next(iter(full.patches))
    base = model.model.state_dict()[key].float()
    torch.testing.assert_close(half.patched_state_dict()[key] - base, 0.5 * (full.patched_state_dict()[key] - base))
    assert "WARNING" not in info
    Delta, sketch = pack.trust_engine.delta.Delta, pack.trust_engine.sketch

    def apply_made_for(fingerprint, metadata):
        foreign = pack.nodes.trust_nodes.UnlearnedDelta(Delta(delta.delta.sites, metadata, fingerprint))
        return node(pack, "TrustApplyDelta").apply(model, "(none: use the delta input)", 1.0, delta=foreign)["result"][1]

    # the exact fingerprint differs but the stored sketch of this very base agrees: the tolerant tier, no warning
    assert sketch.SKETCH_KEY in delta.delta.metadata
    info = apply_made_for("f" * 64, delta.delta.metadata)
    assert "the same base, lightly modified" in info and "100.0%" in info and "WARNING" not in info
    assert not any("warning" in data for event, data in comfy_fake.events())
    # a sketch of an unrelated model: the warning, with the measured agreement
    unrelated = {n: torch.randn_like(w) for n, w in pack.nodes.host.effective_site_weights(model).items()}
    info = apply_made_for("f" * 64, {**delta.delta.metadata, sketch.SKETCH_KEY: sketch.sketch(unrelated)})
    assert "another base model" in info and "Only " in info
    # a file without a sketch (made before it existed): the exact check alone
    info = apply_made_for("f" * 64, {k: v for k, v in delta.delta.metadata.items() if k != sketch.SKETCH_KEY})
    assert "another base model" in info and "Only " not in info
    assert any("warning" in data for event, data in comfy_fake.events())
    with pytest.raises(ValueError, match="no delta"):
        node(pack, "TrustApplyDelta").apply(model, "(none: use the delta input)", 1.0)


def test_progress_reaches_the_bar_and_the_front_end_event(pack, host):
    model, clip, vae = host
    comfy_fake.ProgressBar.updates.clear()
    node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a green shape", **fast(file_name="green"))
    assert comfy_fake.ProgressBar.updates[-1][0] == comfy_fake.ProgressBar.updates[-1][1]
    steps = [d for e, d in comfy_fake.events() if e == "trust.progress" and d.get("stage") == "unlearn"]
    assert steps and "loss" in steps[-1] and steps[-1]["step"] == 3


def test_before_after_grid(pack):
    before, after = torch.rand(3, 32, 32, 3), torch.rand(3, 32, 32, 3)
    (grid,) = node(pack, "TrustBeforeAfterGrid").grid(before, after, "before", "after", 64)
    assert grid.shape[0] == 1 and grid.shape[1] == 2 * 68 and grid.shape[-1] == 3


def test_progress_events_go_only_to_the_client_that_queued(pack, host):
    model, clip, vae = host
    start = len(comfy_fake._state["sids"])
    node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a blue shape", **fast(file_name="blue", steps=1))
    sids = comfy_fake._state["sids"][start:]
    assert sids and set(sids) == {comfy_fake._Server.client_id}  # never None (a broadcast to every browser)


def test_concept_saliency_shows_progress_and_cancel_stops_it(pack, host):
    model, clip, vae = host
    before = digest(model.model)
    comfy_fake.ProgressBar.updates.clear()
    node(pack, "TrustConceptSaliency").find(model, clip, vae, "a triangle", 2.0, 0, 4, 1, resolution=32)
    updates = comfy_fake.ProgressBar.updates  # one per sampling step up to the random stop, then the gradient
    assert len(updates) >= 2 and updates[-1] == (4, 4) and updates[0][0] < 4
    comfy_fake.interrupt_after(1)  # Cancel pressed during the first sampling step
    try:
        with pytest.raises(comfy_fake.InterruptProcessingException):
            node(pack, "TrustConceptSaliency").find(model, clip, vae, "a circle", 2.0, 1, 8, 1, resolution=32)
    finally:
        comfy_fake.interrupt_after(None)
    assert digest(model.model) == before


def test_apply_reads_the_fingerprint_without_loading_the_model(pack, host):
    model, clip, vae = host
    _, delta, _, _ = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "a square", **fast(file_name="sq"))["result"]
    loaded, _ = comfy_fake.memory_requests()
    count = len(loaded)
    node(pack, "TrustApplyDelta").apply(model, "sq.safetensors", 1.0)
    assert len(loaded) == count  # no load_models_gpu: the weights are read where they are


def test_inpainting_checkpoints_are_refused_with_a_message(pack, host):
    from types import SimpleNamespace

    model = host[0]
    config = comfy_fake.SD15()
    config.unet_config = {"in_channels": 9}  # as ComfyUI detects an SD1.5 inpainting checkpoint
    inpainting = SimpleNamespace(model=SimpleNamespace(model_config=config, diffusion_model=model.model.diffusion_model))
    with pytest.raises(pack.nodes.host.HostModelError, match="inpainting checkpoint .9 input channels.*non-inpainting"):
        pack.nodes.host.model_family(inpainting)
    assert pack.nodes.host.model_family(model) == "SD1.x"


def test_progress_bar_works_on_comfyui_before_node_id(pack, monkeypatch):
    import comfy.utils

    class OldProgressBar:  # ComfyUI < 0.3.45: no node_id argument
        def __init__(self, total):
            self.total = total

    monkeypatch.setattr(comfy.utils, "ProgressBar", OldProgressBar)
    assert pack.nodes.host.progress_bar(7, "5").total == 7
    monkeypatch.undo()
    assert pack.nodes.host.progress_bar(7, "5").total == 7


def test_the_aligner_is_on_the_compute_device_only_during_a_run(pack, monkeypatch):
    import comfy.model_management as mm

    moves = []

    class Model:
        def to(self, device):
            moves.append(str(device))

    aligner = type("Aligner", (), {"model": Model()})()
    monkeypatch.setattr(mm, "get_torch_device", lambda: "cuda:0")
    monkeypatch.setattr(mm, "unet_offload_device", lambda: "cpu")
    with pytest.raises(RuntimeError):
        with pack.nodes.host.aligner_on_device(aligner):
            assert moves == ["cuda:0"]
            raise RuntimeError("a failure mid-run")
    assert moves == ["cuda:0", "cpu"]


def test_another_method_runs_through_the_same_node_and_the_stock_lora_path(pack, host):
    """method = uce (a closed form): the node saves a file naming the method, its patched clone equals the stock
    LoRA path on that file, the host is untouched, and TRuST-only inputs are refused in method_settings."""
    model, clip, vae = host
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched, delta, _, report = node(pack, "TrustUnlearn").unlearn(
        model, clip, vae, "triangle", **fast(file_name="", method="uce", method_settings="erase_scale=30"))["result"]
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in before.items())
    assert os.path.basename(delta.path).startswith("trust_uce_triangle")
    saved = pack.trust_engine.delta.Delta.load(delta.path)
    assert saved.metadata["method"] == "uce" and json.loads(saved.metadata["config"])["erase_scale"] == 30.0
    assert saved.params and "uce:" in report and "other weights" in report
    again, _ = comfy_fake.load_lora_for_models(model, None, saved.to_lora(), 1.0, 0)
    a, b = again.patched_state_dict(), patched.patched_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(b[k], before[k]) for k in b)
    with pytest.raises(ValueError, match="uce has no setting 'steps'"):
        node(pack, "TrustUnlearn").unlearn(model, clip, vae, "triangle", **fast(method="uce", method_settings="steps=3"))
    with pytest.raises(ValueError, match="trust has no setting 'x'"):
        node(pack, "TrustUnlearn").unlearn(model, clip, vae, "triangle", **fast(method="trust", method_settings="x=1"))
    with pytest.raises(ValueError, match="steps is TRuST's steps input: set it there"):
        node(pack, "TrustUnlearn").unlearn(model, clip, vae, "triangle", **fast(method="trust",
                                                                                method_settings="steps=3"))


def test_trust_settings_without_an_input_go_through_method_settings(pack, host):
    model, clip, vae = host
    result = node(pack, "TrustUnlearn").unlearn(model, clip, vae, "triangle",
                                                **fast(method="trust", method_settings="row_budget=0.005"))["result"]
    saved = pack.trust_engine.delta.Delta.load(result[1].path)
    assert json.loads(saved.metadata["config"])["row_budget"] == 0.005
    assert 0 < sum(d.rank for d in saved.sites.values()) <= round(0.005 * 1408)  # the testbed's 1,408 K/V rows


def test_a_fine_tuning_method_reports_and_charts_its_steps(pack, host):
    """method = salun: its run record (loss per step) is drawn on the node's chart like TRuST's; a record without
    steps once raised KeyError in the node."""
    model, clip, vae = host
    _, delta, curves, report = node(pack, "TrustUnlearn").unlearn(
        model, clip, vae, "triangle", **fast(method="salun", method_settings="forget_images=4, preserve_images=2, "
                                             "gen_steps=2, batch=2, lr=1e-3"))["result"]
    history = json.loads(delta.delta.metadata["history"])
    assert [h["step"] for h in history] == [1, 2] and "salun:" in report
    line = torch.tensor([90, 170, 255]) / 255.0  # the loss line's colour (trust_engine.render)
    assert bool(((curves[0] - line).abs().max(dim=-1).values < 0.02).any()), "no loss line on the chart"


def test_host_token_input_gives_the_prompts_cond_and_a_gradient_without_touching_the_clip(pack, host):
    """Soft-prompt attacks in ComfyUI: the soft rows go in as an embedding token; with the embeddings of words the
    cond is the words' cond; the gradient reaches the soft rows; the CLIP's weights are unchanged and get no grad."""
    model, clip, vae = host
    before = digest(clip.cond_stage_model)
    with pack.nodes.host.comfy_parts(model, clip, vae, 64) as parts:
        tokens = parts.token_input
        ids = tokens.tokenize("a red")
        with torch.no_grad():
            assert torch.allclose(tokens.encode("circle", tokens.table[ids]), parts.encode_text(["a red circle"]),
                                  atol=1e-5)
        soft = tokens.table[ids].clone().requires_grad_(True)
        tokens.encode("circle", soft).square().sum().backward()
        assert float(soft.grad.abs().sum()) > 0
    assert digest(clip.cond_stage_model) == before
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())


@pytest.fixture(scope="module")
def sdxl_host(pack):
    from tiny_diffusers import sdxl_pipeline

    return comfy_fake.sdxl_host_objects(sdxl_pipeline())


@pytest.mark.parametrize("layer_idx", [None, -1])
def test_host_token_input_on_sdxl_feeds_both_encoders_and_gives_the_prompts_cond(pack, sdxl_host, layer_idx):
    """SDXL in ComfyUI: a soft token is one row of clip_l's and clip_g's tables side by side, inserted into both
    token lists; with the rows of the prompt's first words the cond (both encoders, the ADM vector packed) is exactly
    the whole prompt's, with or without CLIPSetLastLayer; the gradient reaches both halves; the CLIP is untouched."""
    model, clip, vae = sdxl_host
    before = digest(clip.cond_stage_model)
    clip.layer_idx = layer_idx
    try:
        with pack.nodes.host.comfy_parts(model, clip, vae, 16) as parts:
            tokens = parts.token_input
            width = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]
            assert tokens.table.shape[1] == width + clip.cond_stage_model.clip_g.transformer.get_input_embeddings() \
                .weight.shape[1]
            ids = tokens.tokenize("a red")
            with torch.no_grad():
                assert torch.equal(tokens.encode("circle on a blue square", tokens.table[ids]),
                                   parts.encode_text(["a red circle on a blue square"]))
            soft = tokens.table[ids].clone().requires_grad_(True)
            tokens.encode("circle", soft).square().sum().backward()
            assert float(soft.grad[:, :width].abs().sum()) > 0 and float(soft.grad[:, width:].abs().sum()) > 0
    finally:
        clip.layer_idx = None
    assert digest(clip.cond_stage_model) == before
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())


def _aligner():
    from trust_engine.parts import Aligner
    from trust_engine.testbed import bundle

    model, tokenizer, processor = bundle.load_aligner()
    return Aligner(model.requires_grad_(False), tokenizer, list(processor.image_mean), list(processor.image_std),
                   int(processor.crop_size["height"]))


def test_verify_erasure_node_reports_and_never_mutates(pack, host, monkeypatch):
    from trust_engine import attacks

    tiny = {**attacks.BUDGETS["quick"], "paraphrase": {"prompts": 4, "images": 1, "steps": 6}}
    monkeypatch.setitem(pack.trust_engine.attacks.BUDGETS, "quick", tiny)
    model, clip, vae = host
    before, clip_before = digest(model.model), digest(clip.cond_stage_model)
    cls = pack.NODE_CLASS_MAPPINGS["TrustVerifyErasure"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TrustVerifyErasure"] == "Verify Erasure"
    out = cls().verify(model, clip, vae, "triangle", "paraphrase", "quick", 0.2, 0, _aligner(),
                       paraphrases="a wedge\na picture of a wedge\na photo of a triangle\na drawing of a wedge",
                       resolution=64)
    report, grid, passed = out["result"]
    assert "paraphrase: ASR" in report and "aligner threshold" in report and "without its patches" in report
    assert passed is False, report  # nothing is erased: the base model draws the concept
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert digest(model.model) == before and digest(clip.cond_stage_model) == clip_before
    assert model.patches == {}
    assert out["ui"]["text"] == [report]


@pytest.mark.parametrize("bad, message", [
    (dict(concept=" "), "concept is empty"),
    (dict(attacks="paraphrase, nope"), "unknown attack 'nope'"),
    (dict(budget="huge"), "budget must be"),
    (dict(threshold=1.5), "threshold must be"),
    (dict(aligner=None), "no aligner connected"),
])
def test_verify_erasure_node_refuses_bad_input_before_work(pack, host, bad, message):
    model, clip, vae = host
    cls = pack.NODE_CLASS_MAPPINGS["TrustVerifyErasure"]
    args = dict(concept="triangle", attacks="paraphrase", budget="quick", threshold=0.2, seed=0, aligner=object())
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        cls().verify(model, clip, vae, **args)
    if "concept" in bad or "attacks" in bad:
        assert isinstance(cls.VALIDATE_INPUTS(concept=args["concept"], attacks=args["attacks"]), str)


def test_concept_type_is_an_optional_last_combo_with_a_tooltip_per_value(pack):
    spec = pack.NODE_CLASS_MAPPINGS["TrustUnlearn"].INPUT_TYPES()
    assert "concept_type" not in spec["required"] and list(spec["optional"])[-1] == "concept_type"
    choices, options = spec["optional"]["concept_type"]
    types = pack.trust_engine.concepts.CONCEPT_TYPES
    assert choices == list(types) and options["default"] == "none"
    for name, kind in types.items():
        assert f"{name}: {kind.help}" in options["tooltip"]


def test_concept_type_reaches_the_key_and_report_and_an_old_workflow_keeps_its_key(pack, host, monkeypatch):
    """A workflow saved before concept_type (no such widget value: the node's default) computes the key it always
    did, so its saved delta is still reused; a concept type changes the key and the report says what it added."""
    import hashlib

    from conftest import ROOT

    model, clip, vae = host
    job = pack.trust_engine.job
    keys = []
    fixture = str(ROOT / "tests" / "fixtures" / "deltas" / "erase_triangle.safetensors")

    def found(folder, key):  # every run is a cache hit on a saved file: no training, only the key is under test
        keys.append(key)
        return fixture

    monkeypatch.setattr(job, "find_cached", found)
    unlearn = node(pack, "TrustUnlearn").unlearn
    reports = [unlearn(model, clip, vae, "triangle", **fast(), **extra)["result"][3]
               for extra in ({}, {"concept_type": "none"}, {"concept_type": "nudity"})]
    assert keys[0] == keys[1] != keys[2]
    assert "Concept type" not in reports[0] and reports[0] == reports[1]
    assert "Concept type 'nudity' added 16 preserve prompts" in reports[2]
    assert "Anchor: 'a person wearing clothes', from concept type 'nudity'" in reports[2]
    # the old formula, as files saved before concept types (and other methods) hold it
    expanded = pack.trust_engine.concepts.expand_all("triangle", "individual")
    config = job.build_config("CIP", 3, 5e-3, 0.1, 0.0, 2.0, 1, 0, 32)
    base = pack.nodes.trust_nodes._fingerprint_of(model)
    blob = json.dumps({"concepts": [(e.text, e.mode, e.forget, e.preserve, e.anchor) for e in expanded],
                       "config": old_keys.old_config(config), "resolution": 32, "aligner": "", "neurons": "",
                       "base": base, "engine": job.__version__}, sort_keys=True)
    assert keys[0] == hashlib.sha256(blob.encode()).hexdigest()[:32]
    with pytest.raises(ValueError, match="unknown concept type 'nsfw'"):
        unlearn(model, clip, vae, "triangle", **fast(concept_type="nsfw"))
