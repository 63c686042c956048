"""Bad inputs, table-driven, on every surface (the Python API, the CLI, the ComfyUI nodes): each is refused before any
work with a message that names the input and what is allowed, no file is written and the host model is unchanged."""

from pathlib import Path

import comfy_fake
import pytest
from conftest import digest, node

from trust_engine import __main__ as cli
from trust_engine import concepts, unlearn
from trust_engine.ranges import RANGES, InputRangeError

# (overrides of UnlearnConfig / SaliencyConfig, what the message must say)
API = [
    ({"steps": 0}, "steps = 0 is not allowed: steps must be an integer from 1 to 10000"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"lr": -1e-3}, "lr = -0.001 is not allowed: lr must be a number from 1e-06 to 1"),
    ({"relative_lr": 0.0}, "relative_lr must be a number from 0.0001 to 1"),
    ({"beta": float("nan")}, "beta = nan is not allowed"),
    ({"alpha": -1.0}, "alpha must be a number from 0 to 100"),
    ({"mask_every": -1}, "mask_every must be an integer from 0 to 10000 (0 = never re-estimate)"),
    ({"forget_images": 0}, "forget_images must be an integer from 1 to 1024"),
    ({"projections": "kz"}, "projections must be a non-empty string of distinct letters from 'qkvo'"),
    ({"retain_target": "model"}, "retain_target must be one of 'base', 'noise'"),
    ({"seed": -1}, "seed must be an integer from 0 to 2147483647"),
    ({"early_stop": 2.0}, "early_stop must be a number from 0 to 1, or None (None = never stop early)"),
    ({"saliency": {"xi": 0.1}}, "saliency.xi = 0.1 is not allowed: saliency.xi must be a number from 0.5 to 6"),
    ({"saliency": {"steps": 1}}, "saliency.steps must be an integer from 2 to 100"),
    ({"saliency": {"stop_range": (0.9, 0.1)}}, "a pair (low, high) with 0 <= low <= high <= 1"),
]

CLI = [
    (["unlearn", "--concept", "triangle", "--steps", "-5"], "--steps = -5 is not allowed: --steps must be an integer "
                                                             "from 1 to 10000"),
    (["unlearn", "--concept", "triangle", "--lr", "5"], "--lr must be a number from 1e-06 to 1"),
    (["unlearn", "--concept", "triangle", "--relative-lr", "0"], "--relative-lr must be a number from 0.0001 to 1"),
    (["unlearn", "--concept", "triangle", "--xi", "9"], "--xi must be a number from 0.5 to 6"),
    (["unlearn", "--concept", "triangle", "--projections", "kk"], "--projections must be a non-empty string of "
                                                                  "distinct letters"),
    (["unlearn", "--concept", "triangle", "--out", "{tmp}/missing/d.safetensors"], "does not exist; create it first"),
    (["unlearn", "--concept", "triangle", "--out", "{tmp}"], "is a folder: give a file name"),
    (["unlearn", "--concept", "triangle", "--model", "{tmp}/nowhere"], "does not exist"),
    (["unlearn", "--concept", "triangle", "--model", "{tmp}"], "has no model_index.json"),
    (["unlearn", "--concept", "   "], "type the concept"),
    (["evaluate", "--delta", "{tmp}/d.safetensors", "--seeds", "0"], "--seeds must be an integer from 1 to 64"),
]

# (node, method, inputs besides the host objects, message)
NODES = [
    ("TrustUnlearn", {"steps": 0}, "steps = 0 is not allowed: steps must be an integer from 1 to 10000"),
    ("TrustUnlearn", {"learning_rate": -0.1}, "learning_rate must be a number from 1e-06 to 1, or 0 (0 = use "
                                              "relative_lr)"),
    ("TrustUnlearn", {"relative_lr": 3.0}, "relative_lr must be a number from 0.0001 to 1"),
    ("TrustUnlearn", {"resolution": 100}, "resolution must be an integer from 32 to 2048 in multiples of 8, or 0"),
    ("TrustUnlearn", {"mode": "sequential"}, "mode must be one of 'individual', 'combination', 'conditional'"),
    ("TrustUnlearn", {"loss": "L2"}, "loss must be one of 'cip', 'csr'"),
    ("TrustUnlearn", {"xi": 10.0}, "xi must be a number from 0.5 to 6"),
    ("TrustUnlearn", {"training_images": 0}, "training_images must be an integer from 1 to 1024"),
    ("TrustUnlearn", {"mask_refresh": -2}, "mask_refresh must be an integer from 0 to 10000"),
    ("TrustUnlearn", {"concepts": "  "}, "concepts is empty: type what to erase"),
    ("TrustConceptSaliency", {"images": 0}, "images must be an integer from 1 to 64"),
    ("TrustConceptSaliency", {"steps": 1}, "steps must be an integer from 2 to 100"),
    ("TrustApplyDelta", {"strength": 5.0}, "strength must be a number from -2 to 2"),
]


def _nested(overrides):
    config = unlearn.config_for("cip")
    for key, value in overrides.items():
        if key == "saliency":
            for k, v in value.items():
                setattr(config.saliency, k, v)
        else:
            setattr(config, key, value)
    return config


@pytest.mark.parametrize("overrides,message", API, ids=[next(iter(o)) for o, _ in API])
def test_python_api_refuses_before_any_work(testbed, overrides, message):
    pipe, parts, aligner = testbed
    before = digest(pipe.unet)
    calls = []
    with pytest.raises(InputRangeError) as error:
        unlearn.unlearn(parts, concepts.expand("triangle"), _nested(overrides), aligner,
                        progress=lambda event: calls.append(event))
    assert message in str(error.value)
    assert calls == []  # not even the first progress event: nothing was generated
    assert digest(pipe.unet) == before


@pytest.mark.parametrize("argv,message", CLI, ids=[" ".join(a[2:] or a) for a, _ in CLI])
def test_cli_refuses_before_any_work(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv and argv[0] == "unlearn":
        argv += ["--out", str(tmp_path / "d.safetensors")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no file written


def _node_inputs(name, overrides, host):
    model, clip, vae = host
    if name == "TrustUnlearn":
        values = dict(model=model, clip=clip, vae=vae, concepts="a square", mode="individual", loss="CIP", steps=3,
                      learning_rate=0.0, beta=0.0, xi=2.0, mask_refresh=1, training_seed=0, file_name="bad",
                      resolution=32)
        return "unlearn", {**values, **overrides}
    if name == "TrustConceptSaliency":
        values = dict(model=model, clip=clip, vae=vae, concept="a square", xi=2.0, saliency_seed=0, steps=4, images=2,
                      resolution=32)
        return "find", {**values, **overrides}
    return "apply", {"model": model, "delta_file": "(none: use the delta input)", "strength": 1.0, **overrides}


@pytest.mark.parametrize("name,overrides,message", NODES, ids=[f"{n}-{next(iter(o))}" for n, o, _ in NODES])
def test_nodes_refuse_before_any_work(pack, host, name, overrides, message):
    model = host[0]
    folder = Path(pack.nodes.host.delta_dir())
    folder.mkdir(parents=True, exist_ok=True)
    before, files_before = digest(model.model), sorted(folder.iterdir())
    method, inputs = _node_inputs(name, overrides, host)
    cls = pack.NODE_CLASS_MAPPINGS[name]
    text_input = "concepts" if name == "TrustUnlearn" else "concept"
    verdict = cls.VALIDATE_INPUTS(**{text_input: inputs[text_input]}) if text_input in inputs else True
    if verdict is not True:  # ComfyUI shows VALIDATE_INPUTS' text and never calls the node
        assert message in verdict
    else:
        ticks = len(comfy_fake.ProgressBar.updates)
        with pytest.raises((InputRangeError, ValueError)) as error:
            getattr(node(pack, name), method)(**inputs)
        assert message in str(error.value)
        assert len(comfy_fake.ProgressBar.updates) == ticks  # refused before the first progress tick
    assert digest(model.model) == before
    assert sorted(folder.iterdir()) == files_before  # no file written


def test_the_table_covers_at_least_twenty_cases_and_every_node_widget_range_comes_from_it(pack):
    assert len(API) + len(CLI) + len(NODES) >= 20
    spec = pack.NODE_CLASS_MAPPINGS["TrustUnlearn"].INPUT_TYPES()
    widgets = {**spec["required"], **spec["optional"]}
    assert widgets["steps"][1]["min"] == RANGES["steps"].low and widgets["steps"][1]["max"] == RANGES["steps"].high
    assert widgets["resolution"][1]["min"] == 0 and widgets["resolution"][1]["max"] == RANGES["resolution"].high
    assert widgets["learning_rate"][1]["min"] == 0 and widgets["relative_lr"][1]["min"] == RANGES["relative_lr"].low
