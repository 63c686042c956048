"""The erasers of trust_engine.methods: each against a hand-computed toy of its reference equations, the host UNet
left bit-identical, and (slow) UCE erasing "triangle" on the bundled testbed."""

import math

import pytest
import torch

from trust_engine import concepts
from trust_engine.delta import Delta
from trust_engine.methods import METHODS, conceptprune, fia, uce

torch.set_num_threads(1)


def test_every_method_has_a_documented_config_and_a_run_function():
    import dataclasses

    assert set(METHODS) == {"conceptprune", "fia", "uce"}
    for name, (config_cls, run) in METHODS.items():
        for f in dataclasses.fields(config_cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
        config_cls().validate()
        assert callable(run)


# --- UCE: W_new = (λW + Σ v* cᵀ + Σ (W c_p) c_pᵀ)(λI + Σ c cᵀ + Σ c_p c_pᵀ)⁻¹ ---

def test_uce_closed_form_on_a_2x2_layer_by_hand():
    # W = I, c_e = e1, guide output v* = e2, λ = 1/2:
    # mat1 = I/2 + e2 e1ᵀ = [[1/2, 0], [1, 1/2]],  mat2 = I/2 + e1 e1ᵀ = diag(3/2, 1/2)  ->  W_new = [[1/3, 0], [2/3, 1]]
    w = torch.eye(2)
    new = uce.closed_form(w, [(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))], [], 1.0, 1.0, 0.5)
    assert torch.allclose(new, torch.tensor([[1 / 3, 0.0], [2 / 3, 1.0]]), atol=1e-6)


def test_uce_maps_the_concept_to_its_guide_and_keeps_preserved_outputs_as_lambda_vanishes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, generator=g)
    c_e, c_p = torch.randn(1, 4, generator=g), torch.randn(3, 4, generator=g)  # together they span R^4
    v_star = torch.randn(1, 5, generator=g)
    new = uce.closed_form(w, [(c_e, v_star)], [c_p], 1.0, 1.0, 1e-6)
    assert torch.allclose(c_e @ new.T, v_star, atol=1e-3)
    assert torch.allclose(c_p @ new.T, c_p @ w.T, atol=1e-3)


def test_uce_last_content_token_matches_the_tokenizers_attention_mask(testbed):
    pipe, parts, _ = testbed
    prompts = ["", "triangle", "a photo of a red triangle", "a blue star on a green square"]
    mask = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").attention_mask
    assert uce.last_token_index(parts, prompts) == (mask.sum(1) - 2).tolist()


# --- ConceptPrune: skilled = rowTopK(|W|·a_tgt, ⌊k·C_in⌋) AND |W|·a_tgt > |W|·a_base, union over steps ---

def test_conceptprune_skilled_weights_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [4.0, 3.0, -2.0, 1.0]])
    a_tgt, a_base = torch.tensor([1.0, 1.0, 2.0, 0.1]), torch.tensor([2.0, 0.5, 0.5, 0.5])
    # M_tgt rows: [1, 2, 6, 0.4] -> top-2 {2, 1}; [4, 3, 4, 0.1] -> top-2 {0, 2}; a_tgt > a_base only for j = 1, 2
    expected = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(conceptprune.skilled_mask(w, a_tgt, a_base, 0.5), expected)
    # union over the first τ steps: step 1 ranks column 3 first (a_tgt 10) and it beats the base there
    tgt = torch.stack([a_tgt, torch.tensor([0.1, 0.1, 0.1, 10.0])]).pow(2).unsqueeze(0)  # 1 sample x 2 steps x 4
    base = torch.stack([a_base, a_base]).pow(2).unsqueeze(0)
    cfg = conceptprune.ConceptPruneConfig(skill_ratio=0.25, timesteps=2)
    union = conceptprune.concept_mask({"l": w}, {"l": tgt}, {"l": base}, cfg)["l"]
    step0 = conceptprune.skilled_mask(w, a_tgt, a_base, 0.25)
    assert torch.equal(union, step0 | torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool))
    cfg.timesteps = 1
    assert torch.equal(conceptprune.concept_mask({"l": w}, {"l": tgt}, {"l": base}, cfg)["l"], step0)


# --- FIA: S = |W|·relu(μ_c − μ_b − σ_b); A = ½ mean S / max + ½ freq; Q = rowTopK ∩ layerTopK; fusion ---

def test_fia_contrast_by_hand():
    concept = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]]])  # 2 samples x 1 step x 2 channels
    base = torch.tensor([[[1.0, 1.0]], [[1.0, 3.0]]])  # μ_b = [1, 2], σ_b (population) = [0, 1]
    assert torch.equal(fia.contrast(concept, base), torch.tensor([[1.0, 0.0]]))  # relu([2-1-0, 2-2-1])


def test_fia_temporal_and_spatial_selection_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.2, 4.0], [4.0, 3.0, 2.5, 1.0]])
    contrasts = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # one step; column 3 has no contrast
    # S = [[1, 2, 3.2, 0], [4, 3, 2.5, 0]]; r1 = 1/4 -> k1 = 2, τ = 3.2, only S[1,0] > τ
    # A = ½ S/4 + ½ 1[S > τ] = [[.125, .25, .4, 0], [1, .375, .3125, 0]]
    # r2 = 1/4: row top-1 {(0,2), (1,0)}, layer top-2 {(1,0), (0,2)}
    q = fia.sensitive_weights(w, contrasts, 0.25, 0.25)
    assert torch.equal(q, torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))
    # r2 = 1/2: row top-2 {(0,2),(0,1),(1,0),(1,1)} ∩ layer top-4 {(1,0),(0,2),(1,1),(1,2)}
    q = fia.sensitive_weights(w, contrasts, 0.25, 0.5)
    assert torch.equal(q, torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool))


def test_fia_fusion_prunes_concept_specific_weights_and_a_single_concept_prunes_its_selection():
    q = [torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), torch.tensor([[1, 0, 1, 0]], dtype=torch.bool),
         torch.tensor([[1, 0, 0, 0]], dtype=torch.bool)]
    # C = 3, α = 0.6: τ_ca = ⌈1.8⌉ = 2; s = [3, 1, 1, 0] -> prune s = 1 only; the weight all three share is kept
    assert math.ceil(0.6 * 3) == 2
    assert torch.equal(fia.fuse(q, 0.6), torch.tensor([[0, 1, 1, 0]], dtype=torch.bool))
    # C = 1: the paper's formula (s < ⌈α⌉ = 1) would prune nothing; the fix prunes Q
    assert torch.equal(fia.fuse(q[:1], 0.6), q[0])


# --- on the testbed ---

def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["conceptprune", "fia"])
def test_pruning_methods_zero_only_ff_weights_and_leave_the_host_bit_identical(testbed, method):
    pipe, parts, _ = testbed
    before = _snapshot(pipe.unet)
    config_cls, run = METHODS[method]
    config = config_cls(samples=2, steps=4, timesteps=2, cfg=3.0)
    delta = run(parts, [concepts.expand("triangle")], config)
    state = pipe.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert not delta.sites and delta.params and delta.metadata["method"] == method
    ff = {n: m.weight for n, m in __import__("trust_engine.unet_params", fromlist=["x"]).modules_named(
        pipe.unet, "ff.net.2").items()}
    for name, diff in delta.params.items():
        assert name.endswith("ff.net.2.weight")
        w = ff[name.removesuffix(".weight")].detach()
        changed = diff != 0
        assert changed.any() and torch.equal(diff[changed], -w[changed])  # zeroes single weights, nothing else


def test_bad_configs_and_prompts_are_refused_before_any_work(testbed):
    _, parts, _ = testbed
    with pytest.raises(ValueError, match="skill_ratio"):
        conceptprune.run(parts, [concepts.expand("triangle")], conceptprune.ConceptPruneConfig(skill_ratio=0.0))
    with pytest.raises(ValueError, match="timesteps"):
        fia.run(parts, [concepts.expand("triangle")], fia.FIAConfig(timesteps=60))
    with pytest.raises(ValueError, match="projections"):
        uce.run(parts, [concepts.expand("triangle")], uce.UCEConfig(projections="q"))
    from trust_engine.testbed.world import UnknownWordError

    with pytest.raises(UnknownWordError):
        uce.run(parts, [concepts.expand("a cat")], uce.UCEConfig())


# UCE's script defaults move "triangle" 1.00 -> 0.60 on the testbed's tiny UNet; erase_scale 30 is the testbed-tuned
# config (see the README's method table)
UCE_TESTBED = dict(erase_scale=30.0)


@pytest.mark.slow
def test_uce_erases_triangle_on_the_testbed(testbed, tmp_path):
    from trust_engine.testbed import bundle
    from trust_engine.testbed.evaluate import apply_delta, eval_sets, evaluate

    pipe, parts, _ = testbed
    before_weights = _snapshot(pipe.unet)
    delta = uce.run(parts, [concepts.expand("triangle")], uce.UCEConfig(**UCE_TESTBED))
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before_weights.items())
    loaded = Delta.load(delta.save(tmp_path / "uce.safetensors"))  # as a user gets it: fp16 .diff from the file
    assert loaded.metadata["method"] == "uce"
    judge = bundle.load_judge()
    sets = eval_sets("triangle", "individual")
    before = evaluate(pipe, judge, sets, seeds=1)
    patched = bundle.load_pipeline()
    apply_delta(patched, loaded)
    after = evaluate(patched, judge, sets, seeds=1)
    assert before["forget_rate"] >= 0.9
    assert after["forget_rate"] <= 0.3, after
