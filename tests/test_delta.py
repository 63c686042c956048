"""Delta: a row-sparse weight difference saved as an exact kohya LoRA (or dense .diff), loaded back only from safetensors."""

import pickle

import pytest
import torch
from safetensors.torch import load_file, safe_open

from trust_engine.delta import (
    BaseMismatchError,
    Delta,
    DeltaFileError,
    RowDelta,
    fingerprint,
    lora_key,
)

torch.set_num_threads(1)

K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
V = "middle_block.1.transformer_blocks.0.attn2.to_v"
OUT = "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"


def _delta(seed: int = 0, out: int = 320, inp: int = 768, rank: int = 7) -> Delta:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(out, generator=g)[:rank]
    values = torch.randn(rank, inp, generator=g) * 1e-3
    values[0, :5] = torch.tensor([1e-30, -1e-30, 3.0e38, -0.0, 1.0])  # tiny, huge and signed-zero entries
    return Delta({K: RowDelta(rows, values, out)}, {"concept": "cat", "steps": "20"}, base_fingerprint="ab" * 32)


def test_lora_export_is_exact_rank_r(tmp_path):
    delta = _delta()
    path = delta.save(tmp_path / "d.safetensors")
    tensors = load_file(path)
    key = lora_key(K)
    assert key == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert set(tensors) == {f"{key}.lora_up.weight", f"{key}.lora_down.weight", f"{key}.alpha"}
    up, down, alpha = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"], tensors[f"{key}.alpha"]
    assert up.shape == (320, 7) and down.shape == (7, 768) and alpha.item() == 7.0
    # the product a stock loader computes (ComfyUI: mm(up, down) * alpha / rank, in float32)
    product = torch.mm(up.float(), down.float()) * (alpha.item() / down.shape[0])
    dense = delta.dense(K)
    assert product.dtype == dense.dtype == torch.float32
    assert torch.equal(product, dense)
    # bit for bit, up to the sign of exact zeros (w + 0.0 == w + -0.0 for every weight w != 0)
    same_bits = product.view(torch.int32) == dense.view(torch.int32)
    assert bool((same_bits | (dense == 0)).all())


def test_save_load_round_trip_keeps_rows_values_and_metadata(tmp_path):
    delta = _delta()
    loaded = Delta.load(delta.save(tmp_path / "d.safetensors"))
    assert list(loaded.sites) == [K]
    assert torch.equal(loaded.sites[K].rows, delta.sites[K].rows)
    assert torch.equal(loaded.sites[K].values, delta.sites[K].values)
    assert loaded.metadata == {"concept": "cat", "steps": "20"}
    assert loaded.base_fingerprint == "ab" * 32
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["trust_delta_format"] == "1" and meta["base_fingerprint"] == "ab" * 32 and meta["concept"] == "cat"


def test_dense_diff_is_written_where_smaller(tmp_path):
    g = torch.Generator().manual_seed(1)
    dense_rows = RowDelta(torch.arange(5), torch.randn(5, 4, generator=g), 8)  # 5 * (8 + 4) = 60 > 8 * 4 = 32
    sparse_rows = RowDelta(torch.tensor([2]), torch.randn(1, 4, generator=g), 8)  # 1 * 12 <= 32
    delta = Delta({V: dense_rows, OUT: sparse_rows})
    tensors = load_file(delta.save(tmp_path / "d.safetensors"))
    assert set(tensors) == {
        f"{lora_key(V)}.diff",
        f"{lora_key(OUT)}.lora_up.weight",
        f"{lora_key(OUT)}.lora_down.weight",
        f"{lora_key(OUT)}.alpha",
    }
    assert lora_key(OUT) == "lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_out_0"
    assert torch.equal(tensors[f"{lora_key(V)}.diff"], delta.dense(V))
    loaded = Delta.load(tmp_path / "d.safetensors")
    assert set(loaded.sites) == {V, OUT}
    for name in (V, OUT):
        assert torch.equal(loaded.dense(name), delta.dense(name))


def test_from_dense_keeps_only_changed_rows():
    diff = torch.zeros(6, 3)
    diff[[1, 4]] = torch.tensor([[1.0, 0.0, 2.0], [0.0, -3.0, 0.0]])
    delta = Delta.from_dense({K: diff, V: torch.zeros(6, 3)})
    assert list(delta.sites) == [K] and delta.sites[K].rows.tolist() == [1, 4]
    assert torch.equal(delta.dense(K), diff)


def test_apply_to_returns_new_tensors_and_leaves_its_input_alone():
    delta = _delta(out=16, inp=8, rank=3)
    delta.sites[K].values[0, 2] = 0.25  # keep the values finite when added to a weight
    base = torch.randn(16, 8)
    weights = {K: base, V: torch.randn(4, 4)}
    before = {k: w.clone() for k, w in weights.items()}
    out = delta.apply_to(weights, strength=0.5)
    assert set(out) == {K}
    assert all(torch.equal(weights[k], before[k]) for k in weights)
    assert out[K].data_ptr() != base.data_ptr()
    assert torch.equal(out[K], base + 0.5 * delta.dense(K))
    half = delta.apply_to({K: base.half()})[K]
    assert half.dtype == torch.float16
    assert torch.equal(half, (base.half().float() + delta.dense(K)).half())
    assert torch.equal(delta.scaled(0.5).dense(K), 0.5 * delta.dense(K))


def test_apply_to_a_model_without_the_site_says_so():
    with pytest.raises(BaseMismatchError, match="another architecture"):
        _delta().apply_to({V: torch.zeros(320, 768)})
    with pytest.raises(BaseMismatchError, match="another architecture"):
        _delta().apply_to({K: torch.zeros(320, 1024)})


def test_fingerprint_mismatch_is_explained():
    g = torch.Generator().manual_seed(2)
    base = {K: torch.randn(32, 16, generator=g), V: torch.randn(32, 16, generator=g)}
    other = {K: base[K].clone(), V: base[V].clone()}
    other[V][3, 3] = -other[V][3, 3]
    fp = fingerprint(base)
    assert len(fp) == 64 and fingerprint(other) != fp
    assert fingerprint({k: w.half() for k, w in base.items()}) == fp  # the same model loaded in half precision
    assert fingerprint({k: w.bfloat16() for k, w in base.items()}) == fp
    delta = Delta({K: RowDelta(torch.tensor([0]), torch.ones(1, 16), 32)}, base_fingerprint=fp)
    delta.check_base(fp)
    with pytest.raises(BaseMismatchError) as err:
        delta.check_base(fingerprint(other))
    assert str(err.value) == (
        f"this delta was made for another base model: made for {fp[:12]}, this model is {fingerprint(other)[:12]}; "
        f"apply it to the model it was trained on, or retrain"
    )


def test_corrupt_truncated_and_pickled_files_are_refused(tmp_path):
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3)).byte().numpy().tobytes()
    )
    good = _delta().save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {K: torch.zeros(2)}}, ckpt)
    plain_pickle = tmp_path / "delta.pkl"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}))
    for path in (random_bytes, truncated):
        with pytest.raises(DeltaFileError, match="truncated or corrupt"):
            Delta.load(path)
    for path in (ckpt, plain_pickle):
        with pytest.raises(DeltaFileError, match="pickle"):
            Delta.load(path)
    with pytest.raises(DeltaFileError, match="no delta file"):
        Delta.load(tmp_path / "missing.safetensors")


def test_a_safetensors_file_that_is_not_a_delta_is_refused(tmp_path):
    from safetensors.torch import save_file

    plain_lora = tmp_path / "style.safetensors"
    save_file(
        {f"{lora_key(K)}.lora_up.weight": torch.randn(4, 2), f"{lora_key(K)}.lora_down.weight": torch.randn(2, 3)},
        str(plain_lora),
    )
    with pytest.raises(DeltaFileError, match="ordinary LoRA"):
        Delta.load(plain_lora)
    mixed = tmp_path / "mixed.safetensors"
    tensors = _delta().to_lora()
    tensors[f"{lora_key(K)}.lora_up.weight"][0, 0] += 0.5  # no longer a one-hot row selector
    save_file(tensors, str(mixed), metadata={"trust_delta_format": "1"})
    with pytest.raises(DeltaFileError, match="one-hot"):
        Delta.load(mixed)


def test_invalid_deltas_are_refused_at_construction():
    with pytest.raises(ValueError, match="unique"):
        RowDelta(torch.tensor([1, 1]), torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="finite"):
        RowDelta(torch.tensor([1]), torch.tensor([[float("nan"), 0.0, 0.0]]), 4)
    with pytest.raises(ValueError, match="canonical site names"):
        Delta(
            {
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": RowDelta(
                    torch.tensor([0]), torch.ones(1, 3), 4
                )
            }
        )
    with pytest.raises(TypeError, match="str to str"):
        Delta({}, {"steps": 20})


def test_sketch_tells_a_lightly_modified_base_from_another_model():
    from trust_engine import sketch

    g = torch.Generator().manual_seed(0)
    base = {f"site{i}": torch.randn(64, 48, generator=g) for i in range(6)}
    stored = sketch.sketch(base)
    assert len(stored) < 1500  # small next to any delta (1 KiB of signs, base64)
    assert sketch.agreement(stored, base) == 1.0
    # a LoRA-like merge: a small low-rank change flips only the signs of near-zero weights
    merged = {n: w + 0.02 * torch.randn(64, 2, generator=g) @ torch.randn(2, 48, generator=g) for n, w in base.items()}
    assert sketch.CLOSE <= sketch.agreement(stored, merged) < 1.0
    other = {n: torch.randn(w.shape, generator=g) for n, w in base.items()}
    assert abs(sketch.agreement(stored, other) - 0.5) < 0.05
    assert sketch.agreement("not a sketch", base) is None


# --- dense parameter differences (any UNet weight or bias), written as fp16 .diff / .diff_b ---

FF = "input_blocks.1.1.transformer_blocks.0.ff.net.2"
OUT_B = "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"


def _mixed_delta() -> Delta:
    g = torch.Generator().manual_seed(5)
    ff = torch.zeros(320, 1280)
    ff.view(-1)[torch.randperm(320 * 1280, generator=g)[:500]] = torch.randn(500, generator=g)  # unstructured
    params = {
        f"{FF}.weight": ff,
        f"{FF}.bias": torch.randn(320, generator=g) * 1e-2,
        f"{OUT_B}.weight": torch.randn(320, 320, generator=g) * 1e-3,
        f"{OUT_B}.bias": torch.randn(320, generator=g) * 1e-3,
    }
    base = _delta()
    return Delta(base.sites, {"method": "fia", "config": '{"r1": 0.05}'}, base.base_fingerprint, params)


def test_dense_params_round_trip_as_fp16_diff_and_diff_b_beside_the_exact_lora(tmp_path):
    delta = _mixed_delta()
    path = delta.save(tmp_path / "d.safetensors")
    tensors = load_file(path)
    ff, out = lora_key(FF), lora_key(OUT_B)
    assert ff == "lora_unet_input_blocks_1_1_transformer_blocks_0_ff_net_2"
    assert {f"{ff}.diff", f"{ff}.diff_b", f"{out}.diff", f"{out}.diff_b"} <= set(tensors)
    assert all(tensors[k].dtype == torch.float16 for k in (f"{ff}.diff", f"{ff}.diff_b", f"{out}.diff"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["trust_delta_format"] == "2" and meta["method"] == "fia"
    loaded = Delta.load(path)
    assert loaded.metadata == delta.metadata and loaded.base_fingerprint == delta.base_fingerprint
    # the LoRA part is unchanged and exact
    assert list(loaded.sites) == [K] and torch.equal(loaded.dense(K), delta.dense(K))
    key = lora_key(K)
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    assert torch.equal(torch.mm(up, down) * (tensors[f"{key}.alpha"].item() / down.shape[0]), delta.dense(K))
    # the dense part comes back as the fp16 rounding of each difference, zeros of the mask still exactly zero
    assert set(loaded.params) == set(delta.params)
    for name, diff in delta.params.items():
        assert torch.equal(loaded.params[name], diff.half()), name
    assert torch.equal(loaded.params[f"{FF}.weight"] != 0, delta.params[f"{FF}.weight"] != 0)
    assert set(loaded.diffs()) == {f"{K}.weight", *delta.params}


def test_fp16_diff_applied_is_base_plus_diff_within_fp16_rounding(tmp_path):
    delta = _mixed_delta()
    loaded = Delta.load(delta.save(tmp_path / "d.safetensors"))
    g = torch.Generator().manual_seed(6)
    base = {name: torch.randn(d.shape, generator=g) for name, d in delta.diffs().items()}
    before = {n: w.clone() for n, w in base.items()}
    new = loaded.apply_to_params(base)
    assert all(torch.equal(base[n], before[n]) for n in base), "inputs untouched"
    for name, diff in delta.params.items():
        exact = base[name] + diff
        # one fp16 rounding of the difference: relative error <= 2^-11, absolute <= 2^-25 near zero (subnormals)
        assert bool(((new[name] - exact).abs() <= diff.abs() * 2.0**-11 + 2.0**-24 + exact.abs() * 2.0**-23).all())
        assert not torch.equal(new[name], base[name])
    assert torch.equal(new[f"{K}.weight"], base[f"{K}.weight"] + delta.dense(K))
    half = loaded.apply_to_params({n: w.half() for n, w in base.items()}, strength=0.5)
    assert half[f"{FF}.weight"].dtype == torch.float16
    halfway = loaded.apply_to_params(base, strength=0.5)[f"{FF}.bias"]
    assert torch.equal(halfway, base[f"{FF}.bias"] + 0.5 * loaded.params[f"{FF}.bias"].float())
    assert torch.equal(loaded.scaled(0.5).params[f"{FF}.bias"], loaded.params[f"{FF}.bias"] * 0.5)


def test_every_file_key_is_one_a_stock_loader_maps_to_a_unet_parameter(tmp_path):
    """ComfyUI (comfy.lora.model_lora_keys_unet + load_lora) maps `lora_unet_<LDM module path, . -> _>` to the
    module's `.weight`, `.diff` patches that weight and `.diff_b` its bias; AUTOMATIC1111 maps the same key to the
    module named `diffusion_model_<path>` and reads `diff` / `diff_b`. Emulated here on SD1.5-shaped LDM names."""
    delta = _mixed_delta()
    tensors = delta.to_lora()
    shapes = {f"{FF}.weight": (320, 1280), f"{FF}.bias": (320,), f"{OUT_B}.weight": (320, 320), f"{OUT_B}.bias": (320,),
              f"{K}.weight": (320, 768)}
    key_map = {"lora_unet_" + n[: -len(".weight")].replace(".", "_"): n for n in shapes if n.endswith(".weight")}
    patched = {}
    for key, tensor in tensors.items():
        stem, part = key.split(".", 1)
        weight = key_map[stem]
        if part == "diff":
            patched[weight] = tensor.float()
        elif part == "diff_b":
            patched[weight[: -len(".weight")] + ".bias"] = tensor.float()
    for name, shape in shapes.items():
        if name != f"{K}.weight":
            assert tuple(patched[name].shape) == shape, name
    with pytest.raises(ValueError, match="no weight difference"):
        Delta({}, params={f"{FF}.bias": torch.ones(320)}).to_lora()


def test_v1_files_load_as_before_and_dense_param_errors_are_specific(tmp_path):
    from safetensors.torch import save_file

    old = tmp_path / "v1.safetensors"
    diff = torch.zeros(8, 4)
    diff[[0, 1, 2, 3, 4]] = 1.0
    save_file({f"{lora_key(V)}.diff": diff}, str(old), metadata={"trust_delta_format": "1"})
    loaded = Delta.load(old)
    assert list(loaded.sites) == [V] and not loaded.params and torch.equal(loaded.dense(V), diff)
    with pytest.raises(ValueError, match="not an LDM UNet parameter"):
        Delta({}, params={"down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="both a row-sparse site and a dense parameter"):
        Delta(_delta().sites, params={f"{K}.weight": torch.ones(320, 768)})
    with pytest.raises(ValueError, match="row-sparse weight and a dense bias"):
        Delta(_delta().sites, params={f"{K}.bias": torch.ones(320)})
    with pytest.raises(ValueError, match="finite"):
        Delta({}, params={f"{FF}.weight": torch.full((2, 2), float("inf"))})
    with pytest.raises(ValueError, match="float16 range"):
        Delta({}, params={f"{FF}.weight": torch.full((2, 2), 1e6)}).to_lora()
    unknown = tmp_path / "stray.safetensors"
    save_file({f"{lora_key(FF)}.diff_b": torch.ones(3)}, str(unknown), metadata={"trust_delta_format": "2"})
    with pytest.raises(DeltaFileError, match="unexpected tensor"):
        Delta.load(unknown)
    with pytest.raises(BaseMismatchError, match="another architecture"):
        _mixed_delta().apply_to_params({f"{FF}.weight": torch.zeros(320, 1280)})
