"""The TRuST engine on the bundled testbed: host weights never written, interruption and failure leave them
bit-identical, CSR's double backprop is a correct gradient, a short run lowers the concept's aligner score."""

import threading

import pytest
import torch

from trust_engine import concepts, unlearn
from trust_engine.delta import BaseMismatchError, Delta, fingerprint
from trust_engine.functional import SiteDeltas
from trust_engine.progress import Interrupted, stop_flag_callback
from trust_engine.saliency import SaliencyConfig, estimate, guided_output, zscore_mask
from trust_engine.unet_view import UnknownArchitectureError, find_sites, site_weights

TINY = dict(steps=3, forget_images=4, preserve_images=4, gen_steps=4, batch=2, early_stop=None,
            saliency=SaliencyConfig(steps=4, images=1))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _identical(module, snapshot):
    state = module.state_dict()
    return all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("loss", ["cip", "csr"])
def test_run_leaves_host_weights_bit_identical_and_untrainable(testbed, loss):
    pipe, parts, aligner = testbed
    before = _snapshot(pipe.unet)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    result = unlearn.unlearn(parts, concepts.expand("triangle"), unlearn.config_for(loss, **TINY), aligner, default_cfg=3.0)
    assert _identical(pipe.unet, before)
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert flags == {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    assert result.delta.sites, "a run changes some concept-neuron rows"
    changed = {n for n in result.delta.sites}
    assert all(".attn2.to_" in n for n in changed)


def test_exception_and_interruption_mid_run_leave_host_bit_identical(testbed):
    pipe, parts, aligner = testbed
    before = _snapshot(pipe.unet)

    def failing(event):
        if event.stage == "unlearn" and event.step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        unlearn.unlearn(parts, concepts.expand("triangle"), unlearn.config_for("cip", **TINY), aligner, failing)
    assert _identical(pipe.unet, before)

    flag = threading.Event()
    stop = stop_flag_callback(flag)

    def interrupt_at_step_1(event):
        if event.stage == "unlearn":
            flag.set()
        stop(event)

    with pytest.raises(Interrupted):
        unlearn.unlearn(parts, concepts.expand("red circle", "combination"), unlearn.config_for("csr", **TINY), aligner,
                        interrupt_at_step_1)
    assert _identical(pipe.unet, before)


def test_masked_updates_touch_only_concept_neuron_rows(testbed):
    pipe, parts, aligner = testbed
    config = unlearn.config_for("cip", **{**TINY, "static_mask": True, "steps": 4})
    result = unlearn.unlearn(parts, concepts.expand("triangle"), config, aligner, default_cfg=3.0)
    mask = result.last_saliency.mask  # static: the one mask used throughout
    for name, rows in result.delta.sites.items():
        assert mask[name][rows.rows].all(), name


def test_saliency_runs_in_both_modes(testbed):
    pipe, parts, aligner = testbed
    deltas = SiteDeltas(pipe.unet, find_sites(pipe.unet))
    result = estimate(parts, deltas, ["a triangle"], SaliencyConfig(steps=6), aligner, cfg=3.0)
    assert set(result.kinds.values()) == {"q", "k", "v"} and result.mode == "clip"
    noise = estimate(parts, deltas, ["a triangle"], SaliencyConfig(steps=6, mode="noise"), None, anchor="", cfg=3.0)
    assert noise.mode == "noise" and noise.total() > 0


def test_zscore_mask_flags_planted_outliers_per_projection_type():
    """z-scores are taken within each projection type: a row that is an outlier among K rows is flagged even though
    Q rows are larger everywhere, and nothing else is."""
    g = torch.Generator().manual_seed(0)
    scores = {"a.to_q": 10 + torch.rand(50, generator=g), "a.to_k": torch.rand(50, generator=g),
              "b.to_k": torch.rand(50, generator=g)}
    scores["b.to_k"][7] = 5.0
    scores["a.to_q"][3] = 30.0
    kinds = {"a.to_q": "q", "a.to_k": "k", "b.to_k": "k"}
    z, mask = zscore_mask(scores, kinds, 2.0)
    assert mask["b.to_k"].nonzero().flatten().tolist() == [7]
    assert mask["a.to_q"].nonzero().flatten().tolist() == [3]
    assert not mask["a.to_k"].any()
    assert float(z["b.to_k"][7]) > 2.0


def test_saliency_scores_are_the_gradient_of_the_clip_score(testbed):
    """The image-by-image, three-graph saliency equals one joint backward of the mean CLIP score of x0-hat."""
    pipe, parts, aligner = testbed
    deltas = SiteDeltas(pipe.unet, find_sites(pipe.unet))
    config = SaliencyConfig(steps=6, images=2, stop_range=(0.5, 0.5))
    result = estimate(parts, deltas, ["a triangle"], config, aligner, generator=torch.Generator().manual_seed(2),
                      cfg=3.0)
    gen = torch.Generator().manual_seed(2)
    torch.randint(0, 2**31 - 1, (1,), generator=gen)  # the estimate's prompt/stop-point seed
    latents = torch.randn((2, *parts.latent_shape), generator=gen)
    cond, uncond = parts.encode_text(["a triangle"] * 2), parts.encode_text([""] * 2)
    sched = parts.ddim(6)
    k_stop = int(0.5 * 5)
    with torch.no_grad():
        for t in sched.timesteps[:k_stop]:
            latents = sched.step(guided_output(parts, deltas.call, latents, t, cond, uncond, 3.0), t, latents).prev_sample
    t = sched.timesteps[k_stop]
    with deltas.probing() as probes:
        out = guided_output(parts, deltas.call, latents, t, cond, uncond, 3.0)
        x0 = parts.x0_from_output(out, latents, int(t))
        objective = aligner.score(parts.decode(x0), ["a triangle"] * 2).mean()
        grads = torch.autograd.grad(objective, list(probes.values()))
        joint = {name: g.abs().mean(1) for name, g in zip(probes, grads)}
    assert abs(result.objective - float(objective)) < 1e-3
    for name, score in joint.items():
        assert torch.allclose(result.scores[name], score, rtol=1e-3, atol=1e-9), name


@pytest.mark.slow
def test_short_run_lowers_the_concepts_aligner_score(testbed):
    pipe, parts, aligner = testbed
    config = unlearn.config_for("cip", steps=20, eval_every=20, early_stop=0.0, forget_images=16, preserve_images=16)
    result = unlearn.unlearn(parts, concepts.expand("triangle"), config, aligner, default_cfg=3.0)
    scores = [h["forget_score"] for h in result.history if "forget_score" in h]
    assert scores and scores[-1] < result.forget_score_before - 1.0, result.notes


def test_aligner_text_features_do_not_depend_on_the_transformers_pooling(testbed, monkeypatch):
    """transformers 4.30 (AUTOMATIC1111's pin) pooled CLIP's text feature at the highest token id, which is the end
    token only when it is the vocabulary's last (not the testbed aligner's): the score must not change with that."""
    pipe, parts, aligner = testbed
    prompts = ["a triangle", "a red circle on a blue square"]
    model = aligner.model
    ids = aligner.tokenizer(prompts, padding="max_length", max_length=aligner.tokenizer.model_max_length,
                            return_tensors="pt").input_ids
    assert (ids.argmax(-1) != (ids == aligner.tokenizer.eos_token_id).int().argmax(-1)).all()  # they differ here
    with torch.no_grad():
        expected = aligner.text_features(prompts)
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) >= Version("4.31"):  # pools at the end token: the reference
            from trust_engine.parts import features_of

            assert torch.equal(expected, features_of(model.get_text_features(input_ids=ids)))

    def legacy_get_text_features(input_ids, **kwargs):
        hidden = model.text_model(input_ids=input_ids)[0]
        return model.text_projection(hidden[torch.arange(input_ids.shape[0]), input_ids.argmax(dim=-1)])

    monkeypatch.setattr(model, "get_text_features", legacy_get_text_features)
    with torch.no_grad():
        assert torch.equal(aligner.text_features(prompts), expected)


def test_bad_inputs_get_specific_errors(testbed, tmp_path):
    pipe, parts, aligner = testbed
    with pytest.raises(concepts.ConceptError, match="type the concept"):
        concepts.expand("   ")
    from trust_engine.testbed.world import UnknownWordError

    with pytest.raises(UnknownWordError, match="'cat'"):
        unlearn.unlearn(parts, concepts.expand("a cat"), unlearn.config_for("cip", **TINY), aligner)
    weights = site_weights(pipe.unet, find_sites(pipe.unet))
    name = next(iter(weights))
    diff = torch.zeros_like(weights[name])
    diff[0] = 1.0
    delta = Delta.from_dense({name: diff}, {}, base_fingerprint="0" * 64)  # made on some other model
    with pytest.raises(BaseMismatchError, match="another base model"):
        delta.check_base(fingerprint(site_weights(pipe.unet, find_sites(pipe.unet))))
    from diffusers import UNet2DModel

    with pytest.raises(UnknownArchitectureError, match="SD1.x"):
        find_sites(UNet2DModel(sample_size=8, block_out_channels=(32, 32), norm_num_groups=8,
                               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")))


def _trainable_rows(result) -> dict[str, torch.Tensor]:
    return {name: rows.rows for name, rows in result.delta.sites.items()}


def test_row_budget_caps_the_rows_ever_changed(testbed):
    pipe, parts, aligner = testbed
    free = unlearn.unlearn(parts, concepts.expand("triangle"), unlearn.config_for("cip", **{**TINY, "steps": 4}),
                           aligner, default_cfg=3.0)
    trainable = sum(s.out_features for s in find_sites(pipe.unet, include_out=False) if s.kind in ("k", "v"))
    budget = 12 / trainable
    capped = unlearn.unlearn(parts, concepts.expand("triangle"),
                             unlearn.config_for("cip", **{**TINY, "steps": 4, "row_budget": budget}), aligner,
                             default_cfg=3.0)
    changed = sum(len(r) for r in _trainable_rows(capped).values())
    assert 0 < changed <= 12 < sum(len(r) for r in _trainable_rows(free).values())


def test_static_top_k_mask_changes_only_the_k_highest_rows(testbed):
    pipe, parts, aligner = testbed
    config = unlearn.config_for("cip", **{**TINY, "static_mask": True, "mask_rows": 20})
    result = unlearn.unlearn(parts, concepts.expand("triangle"), config, aligner, default_cfg=3.0)
    z = result.last_saliency.z
    trainable = [n for n in z if result.last_saliency.kinds[n] in ("k", "v")]
    threshold = torch.cat([z[n] for n in trainable]).topk(20).values[-1]
    rows = _trainable_rows(result)
    assert 0 < sum(len(r) for r in rows.values()) <= 20
    assert all((z[n][r] >= threshold).all() for n, r in rows.items())


def test_random_control_draws_as_many_rows_as_saliency_flags_elsewhere(testbed):
    pipe, parts, aligner = testbed
    config = unlearn.config_for("cip", **{**TINY, "static_mask": True, "mask_source": "random"})
    result = unlearn.unlearn(parts, concepts.expand("triangle"), config, aligner, default_cfg=3.0)
    sal = result.last_saliency
    flagged = sum(int(sal.mask[n].sum()) for n in sal.mask if sal.kinds[n] in ("k", "v"))
    rows = _trainable_rows(result)
    assert sum(len(r) for r in rows.values()) == flagged == result.history[-1]["neurons"]
    assert not all(sal.mask[n][r].all() for n, r in rows.items()), "random rows, not the concept neurons"


def test_preserve_projection_keeps_the_preserve_prompts_keys_and_values(testbed):
    pipe, parts, aligner = testbed
    concept = concepts.expand("triangle", preserve=["a circle", "a square"])

    def worst_change(projection: float) -> float:
        config = unlearn.config_for("cip", **{**TINY, "preserve_projection": projection})
        result = unlearn.unlearn(parts, concept, config, aligner, default_cfg=3.0)
        tokens = parts.encode_text(["a circle", "a square", ""]).reshape(-1, 128).float()
        worst = 0.0
        for name, diff in result.delta.diffs().items():
            if ".to_k." in name or ".to_v." in name:
                worst = max(worst, float((tokens @ diff.float().T).abs().max() / tokens.abs().max()))
        return worst

    assert worst_change(1.0) < 1e-4 < worst_change(0.0)


def test_saliency_from_the_forget_set_skips_the_sampling_passes(testbed):
    pipe, parts, aligner = testbed
    deltas = SiteDeltas(pipe.unet, find_sites(pipe.unet))
    clean = (torch.randn(3, *parts.latent_shape, generator=torch.Generator().manual_seed(0)), ["a triangle"] * 3)
    calls = {}
    for source in ("generate", "forget_set"):
        seen = []
        original = deltas.call
        deltas.call = lambda *a, seen=seen, original=original, **k: (seen.append(1), original(*a, **k))[1]
        try:
            config = SaliencyConfig(steps=8, images=1, stop_range=(0.6, 0.6), source=source)
            result = estimate(parts, deltas, ["a triangle"], config, aligner, generator=torch.Generator().manual_seed(1),
                              cfg=3.0, clean=clean)
        finally:
            deltas.call = original
        calls[source] = len(seen)
        assert result.total() > 0
    assert calls["generate"] - calls["forget_set"] == 4  # the 4 sampled steps before the stop point (0.6 of 7)
