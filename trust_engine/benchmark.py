"""The method arena (`python -m trust_engine bench`): every eraser x the testbed's tasks x N seeds, judged with paired
before/after images, written to bench.json (resumed cell by cell), bench.md and bench.png. Not `bench-scale`
(trust_engine/bench.py: FLOPs and memory of one training step on SD-sized UNets); this module reuses its RSS watch.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

# task name -> the concepts erased in it, (text, mode, preserve prompts a user would add); "sequence" erases its
# concepts one after another, each on the model patched by the ones before
TASKS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "individual": (("triangle", "individual", ("a circle", "a square", "a star")),),
    "combination": (("red circle", "combination", ()),),
    "conditional": (("circle on a square", "conditional", ()),),
    "three": (("triangle", "individual", ("a circle", "a square", "a star")), ("red circle", "combination", ()),
              ("circle on a square", "conditional", ())),
    "sequence": (("triangle", "individual", ("a circle", "a square", "a star")), ("red circle", "combination", ()),
                 ("circle on a square", "conditional", ()), ("blue square", "combination", ()),
                 ("yellow star", "combination", ())),
}
TASK_NAMES = tuple(TASKS)
TASK_HELP = {"individual": "triangle", "combination": "red circle", "conditional": "circle on a square",
             "three": "those three at once (one run)", "sequence": "five erased one after another"}

# --quick: this named subset, 1 seed, the attacks' "quick" budget, smaller image caps (README "Bench")
QUICK_CELLS: tuple[tuple[str, str], ...] = (
    ("trust", "individual"), ("uce", "individual"), ("conceptprune", "individual"), ("uce", "combination"),
)

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def _dynamic_union(results: dict, task: str, seed: int) -> int:
    """Rows the default TRuST run changed on this task and seed (its cell must be done first)."""
    cell = results["cells"].get(cell_id("trust", task, seed))
    if cell is None:
        raise ValueError(f"trust-static-topk needs the trust cell {cell_id('trust', task, seed)} first (its mask "
                         "size is that run's count of changed rows): run --methods trust trust-static-topk")
    return int(cell["rows_changed"])


def _saliency(**fields):
    from .saliency import SaliencyConfig

    return SaliencyConfig(**fields)


# TRuST's ablation rows (README "What each TRuST choice buys"): variant name -> (method, config overrides, what it
# tests). An override may be a function of (results so far, task, seed). Cells of a variant are named by it.
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "trust-static-topk": ("trust", {"static_mask": True, "mask_rows": _dynamic_union},
                          "control: one mask, the top-K rows by z, K = the rows the default run changed"),
    "trust-random": ("trust", {"mask_source": "random"},
                     "control: each step, random rows, as many as the saliency mask flags"),
    "trust-csr": ("trust", {"loss": "csr"}, "CSR instead of CIP"),
    # per-sample scale multiplies the expected penalty by the batch (8): beta / 8 keeps CSR's strength
    "trust-csr-probes": ("trust", {"loss": "csr", "csr_probes": 4, "csr_scale": "sample", "beta": 0.0025},
                         "CSR with 4 probes a step at the same expected strength (lower variance)"),
    "trust-csr-retain": ("trust", {"loss": "csr", "csr_probes": 4, "csr_scale": "sample", "beta": 0.0025,
                                   "csr_data": "retain"},
                         "CSR's Fisher reading: the retain prompts' prediction kept insensitive to the changed rows"),
    "trust-cheap-saliency": ("trust", {"saliency": _saliency(source="forget_set")},
                             "saliency from the forget set's latents, noised, instead of a fresh trajectory"),
    "trust-budget": ("trust", {"row_budget": 0.15}, "at most 15 % of the trainable rows ever changed"),
    "trust-project": ("trust", {"preserve_projection": 0.99},
                      "updates projected off the preserve prompts' text directions (99 % of their energy)"),
    "trust-project-90": ("trust", {"preserve_projection": 0.9},
                         "updates projected off the preserve prompts' text directions holding 90 % of their energy"),
    "trust-budget-project": ("trust", {"row_budget": 0.15, "preserve_projection": 0.99},
                             "both levers"),
}


def base_method(name: str) -> str:
    """The eraser a bench row runs: the method itself, or a variant's method."""
    return VARIANTS[name][0] if name in VARIANTS else name


@dataclasses.dataclass
class BenchConfig:
    """What a bench run measures and how; the fields that change a cell's figures are stored in bench.json and a
    resumed run must match them."""

    methods: tuple[str, ...] = ("trust", "esd", "uce", "salun", "fia", "conceptprune")
    tasks: tuple[str, ...] = TASK_NAMES
    seeds: int = 3
    cells: tuple[tuple[str, str], ...] | None = None  # explicit (method, task) pairs (--quick); None = all pairs
    attack_budget: str = "full"
    attacks: tuple[str, ...] | None = None  # None = every attack the attacks module has; () = none
    eval_steps: int = 25  # DDIM steps of every judged image (the testbed-check's)
    eval_cfg: float = 3.0
    forget_per_prompt: int = 2  # images per forget prompt (every prompt form of the concept, up to max_forget)
    max_forget: int = 48
    preserve_min: int = 384  # the paired preserve stream grows by `preserve_chunk` until its interval is narrow
    preserve_max: int = 3072
    preserve_chunk: int = 128
    target_halfwidth: float = 0.02  # +-2 points (95 %) on the preserve drop
    part_images: int = 16  # per part of a combination / conditional concept
    neighbour_images: int = 8  # per collateral neighbour scene
    # a second training run under torch's FLOP counter (also checks it reproduces the delta), on each (method, task)'s
    # first seed only: another seed trains the same steps on other images and costs the same FLOPs
    flops: bool = True

    def pairs(self) -> list[tuple[str, str]]:
        if self.cells is not None:
            return [(m, t) for m, t in self.cells if m in self.methods and t in self.tasks]
        return [(m, t) for t in self.tasks for m in self.methods]

    def stored(self) -> dict:
        """The settings a resumed run must share (the selection of cells may grow)."""
        keep = ("attack_budget", "eval_steps", "eval_cfg", "forget_per_prompt", "max_forget", "preserve_min",
                "preserve_max", "preserve_chunk", "target_halfwidth", "part_images", "neighbour_images")
        return {k: getattr(self, k) for k in keep}


def quick_config() -> BenchConfig:
    """--quick: QUICK_CELLS, 1 seed, no FLOP pass, and image sets capped well below what a +-2-point paired interval
    needs (256 preserve images, about +-4 points): a smoke run of the whole pipeline, not a result to compare on."""
    return BenchConfig(seeds=1, cells=QUICK_CELLS, attack_budget="quick", preserve_min=256, preserve_max=256,
                       forget_per_prompt=1, max_forget=24, part_images=4, neighbour_images=4, flops=False)


# ------------------------------------------------------------------------------------------------ statistics

def paired_interval(before: Iterable[bool | float], after: Iterable[bool | float], z: float = Z95
                    ) -> tuple[float, float, int]:
    """(mean change after - before, half-width of its normal interval, n) over paired images (the same prompt and
    noise before and after): the per-image differences' mean +- z * sd / sqrt(n), sd with n - 1."""
    d = np.asarray(list(after), dtype=float) - np.asarray(list(before), dtype=float)
    n = int(d.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    half = z * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    return float(d.mean()), half, n


def kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kernel inception distance of two feature sets (rows = samples): the unbiased MMD^2 with the polynomial kernel
    k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018), over the whole sets. Written here because no installed
    library provides it (torchmetrics / torch-fidelity are not dependencies)."""
    x, y = x.double(), y.double()
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    if m < 2 or n < 2:
        raise ValueError("KID needs at least two samples in each set")
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


def judge_kid(after: torch.Tensor, before: torch.Tensor) -> float:
    """KID of the erased model's preserve images vs the base model's, on the judge's 256-d trunk features, both
    divided by the base features' RMS (one scalar), so the kernel's a.b/d is of order 1 whatever the judge's scale."""
    scale = before.double().pow(2).mean().sqrt().clamp_min(1e-12)
    return kid(after.double() / scale, before.double() / scale)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value) of the finite values."""
    v = [x for x in values if x is not None and x == x]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


# ------------------------------------------------------------------------------------------------ world sets

def neighbours(concept: str):
    """The collateral set of a concept: scenes that differ from it in exactly one attribute. A two-attribute object
    ("red circle"): the one-object scenes with one of shape / colour changed; a one-attribute object ("triangle"):
    the other values of that attribute ("a circle", ...); a two-object concept ("circle on a square"): one object's
    named shape or colour changed, or the other relation."""
    from .testbed import world

    query = world.parse(concept)
    out = []

    def variants(obj):
        for shape in world.SHAPE_NAMES:
            if obj.shape and shape != obj.shape:
                yield world.Obj(shape, obj.colour)
        for colour in world.COLOUR_NAMES:
            if obj.colour and colour != obj.colour:
                yield world.Obj(obj.shape, colour)

    if len(query.objects) == 1:
        out = [world.Scene((o,)) for o in variants(query.objects[0])]
    else:
        a, b = query.objects
        out = [world.Scene((o, b), query.relation) for o in variants(a)]
        out += [world.Scene((a, o), query.relation) for o in variants(b)]
        out += [world.Scene((a, b), r) for r in world.RELATION_NAMES if r != query.relation]
    return list(dict.fromkeys(out))


@dataclasses.dataclass
class TaskSets:
    """The judged prompts of a task: forget forms per concept, the preserve pool (scenes that show none of the
    task's concepts, one and two objects), parts and collateral neighbours."""

    concepts: list[tuple[str, str]]
    forget: dict[str, list[tuple[str, bool]]]  # concept -> [(prompt, uses synonyms)]
    preserve_pool: list[str]
    parts: list[str]
    neighbours: dict[str, list[str]]  # concept -> neighbour prompts (canonical)


def task_sets(task: str, config: BenchConfig) -> TaskSets:
    from .testbed import world
    from .testbed.evaluate import _parts, prompt_forms

    specs = TASKS[task]
    queries = [world.parse(text) for text, _, _ in specs]
    rng = np.random.default_rng([len(specs), 4242])
    forget = {}
    for text, _, _ in specs:
        forms = prompt_forms(world.parse(text))
        if len(forms) > config.max_forget:
            forms = [forms[i] for i in sorted(rng.choice(len(forms), config.max_forget, replace=False))]
        forget[text] = forms

    def excluded(scene) -> bool:
        return any(world.contains(q, scene) for q in queries)

    parts = [p for (text, mode, _) in specs for p in _parts(world.parse(text), mode)]
    parts = [p for p in dict.fromkeys(parts) if not excluded(p)]
    singles = [world.Scene((world.Obj(s, c),)) for s, c in itertools.product(world.SHAPE_NAMES, world.COLOUR_NAMES)]
    pairs = [world.Scene((world.Obj(s1, c1), world.Obj(s2, c2)), r)
             for s1, c1, s2, c2, r in itertools.product(world.SHAPE_NAMES, world.COLOUR_NAMES, world.SHAPE_NAMES,
                                                        world.COLOUR_NAMES, world.RELATION_NAMES)]
    singles = [s for s in singles if not excluded(s) and s not in parts]
    pairs = [s for s in pairs if not excluded(s)]
    order = rng.permutation(len(pairs))
    # half one-object, half two-object scenes, interleaved so that any prefix of the stream keeps the balance
    pool = []
    for i in range(len(pairs)):
        pool.append(world.describe(singles[i % len(singles)], rng, "canonical"))
        pool.append(world.describe(pairs[order[i]], rng, "canonical"))
    part_prompts = [world.describe(p, rng, "canonical") for p in parts]
    near = {text: [world.describe(s, rng, "canonical") for s in neighbours(text) if not excluded(s)]
            for text, _, _ in specs}
    return TaskSets([(t, m) for t, m, _ in specs], forget, pool, part_prompts, near)


# ------------------------------------------------------------------------------------------------ judging

class Judged:
    """Judged images of one model state, generated on demand and kept: per named stream, the judge's verdict
    (does the image show what is asked) and its feature vector, image i of a stream always from noise seed + i."""

    def __init__(self, pipe, judge, config: BenchConfig, noise_seed: int, store: dict | None = None,
                 label: str = "erased"):
        self.pipe, self.judge, self.config, self.seed, self.label = pipe, judge, config, noise_seed, label
        self.store = store if store is not None else {}

    def stream(self, name: str, prompts: list[str], n: int, offset: int, concept: str | None = None
               ) -> tuple[list[bool], torch.Tensor]:
        """The first n images of stream `name` (image i: prompts[i % len], noise seed + offset + i); judged against
        `concept` (forget: does it show the concept) or against its own prompt."""
        from .testbed import check, world

        have = self.store.setdefault(name, {"ok": [], "feat": torch.zeros(0, 256)})
        missing = n - len(have["ok"])
        if missing > 0:
            start = len(have["ok"])
            chosen = [prompts[i % len(prompts)] for i in range(start, n)]
            images = check.generate(self.pipe, chosen, seed=self.seed + offset + start, steps=self.config.eval_steps,
                                    cfg=self.config.eval_cfg, progress=self._progress(name, start, n))
            seen = self.judge.read(images)
            if concept is not None:
                query = world.parse(concept)
                ok = [world.contains(query, s) for s in seen]
            else:
                ok = [world.matches(world.parse(p), s) for p, s in zip(chosen, seen)]
            with torch.no_grad():
                feat = self.judge.trunk(self.judge.features(images * 2 - 1))
            have["ok"] = have["ok"] + ok
            have["feat"] = torch.cat([have["feat"], feat.float()])
        return have["ok"][:n], have["feat"][:n]

    def _progress(self, name: str, start: int, n: int) -> Callable[[int, int], None]:
        """A progress line on stderr while images are generated (`label` tells base from erased)."""
        began = time.time()

        def report(done: int, _total: int) -> None:
            sys.stderr.write(f"\r  {self.label} {name}: {start + done}/{n} images {time.time() - began:.0f}s")
            if start + done >= n:
                sys.stderr.write("\n")
            sys.stderr.flush()

        return report

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, v in self.store.items():
            tensors[f"{name}/ok"] = torch.tensor(v["ok"], dtype=torch.uint8)
            tensors[f"{name}/feat"] = v["feat"].contiguous()
        save_file(tensors, str(path))

    @staticmethod
    def load(path: Path) -> dict:
        from safetensors.torch import load_file

        if not path.exists():
            return {}
        store: dict = {}
        for key, t in load_file(str(path)).items():
            name, field = key.rsplit("/", 1)
            store.setdefault(name, {})[field] = [bool(x) for x in t.tolist()] if field == "ok" else t
        return store


# offsets of the noise streams inside one seed's noise range (disjoint: no two streams share an image's noise)
_OFFSETS = {"forget": 0, "preserve": 200_000, "parts": 400_000, "neighbours": 500_000}


def _forget_stream(concept: str) -> str:
    return f"forget:{concept}"


def judge_state(before: Judged, after: Judged, sets: TaskSets, concepts: list[str], config: BenchConfig,
                say: Callable[[str], None] = lambda m: None) -> dict:
    """Figures of one model state against the base model (`before`), paired image by image, for the erased
    `concepts` (a subset of the task's, for a step of a sequence)."""
    row: dict = {}
    forget_b, forget_a, syn_a, syn_b = [], [], [], []
    for i, concept in enumerate(concepts):
        forms = sets.forget[concept]
        prompts = [p for p, _ in forms for _ in range(config.forget_per_prompt)]
        syn = [s for _, s in forms for _ in range(config.forget_per_prompt)]
        off = _OFFSETS["forget"] + 10_000 * i
        b, _ = before.stream(_forget_stream(concept), prompts, len(prompts), off, concept)
        a, _ = after.stream(_forget_stream(concept), prompts, len(prompts), off, concept)
        forget_b.append(float(np.mean(b)))
        forget_a.append(float(np.mean(a)))
        syn_b.append(float(np.mean([x for x, s in zip(b, syn) if s])))
        syn_a.append(float(np.mean([x for x, s in zip(a, syn) if s])))
    row.update(forget_before=float(np.mean(forget_b)), forget=float(np.mean(forget_a)),
               synonym_forget_before=float(np.mean(syn_b)), synonym_forget=float(np.mean(syn_a)),
               forget_by_concept=dict(zip(concepts, forget_a)))
    # preserve: a paired stream, grown until the drop's interval is within the target
    n = config.preserve_min
    while True:
        b, fb = before.stream("preserve", sets.preserve_pool, n, _OFFSETS["preserve"])
        a, fa = after.stream("preserve", sets.preserve_pool, n, _OFFSETS["preserve"])
        change, half, _ = paired_interval(b, a)
        if half <= config.target_halfwidth or n >= config.preserve_max:
            break
        n = min(config.preserve_max, n + config.preserve_chunk)
    two = [i % 2 == 1 for i in range(n)]  # the pool alternates one-object and two-object prompts
    row.update(preserve_before=float(np.mean(b)), preserve=float(np.mean(a)), preserve_change=change,
               preserve_halfwidth=half, preserve_images=n, preserve_reached_target=bool(half <= config.target_halfwidth),
               preserve_single_before=float(np.mean([x for x, t in zip(b, two) if not t])),
               preserve_single=float(np.mean([x for x, t in zip(a, two) if not t])),
               preserve_two_object_before=float(np.mean([x for x, t in zip(b, two) if t])),
               preserve_two_object=float(np.mean([x for x, t in zip(a, two) if t])),
               kid=judge_kid(fa, fb))
    say(f"preserve: {n} paired images, change {100 * change:+.1f} +- {100 * half:.1f} points")
    if sets.parts:
        prompts = [p for p in sets.parts for _ in range(config.part_images)]
        b, _ = before.stream("parts", prompts, len(prompts), _OFFSETS["parts"])
        a, _ = after.stream("parts", prompts, len(prompts), _OFFSETS["parts"])
        change, half, _ = paired_interval(b, a)
        row.update(parts_before=float(np.mean(b)), parts=float(np.mean(a)), parts_change=change,
                   parts_halfwidth=half)
    near = list(dict.fromkeys(p for c in concepts for p in sets.neighbours[c]))
    if near:
        every = list(dict.fromkeys(p for c in sets.neighbours for p in sets.neighbours[c]))
        b_all, a_all = [], []
        for p in near:  # each neighbour its own stream, so steps of a sequence share the base images
            k = every.index(p)
            prompts = [p] * config.neighbour_images
            b, _ = before.stream(f"neighbour:{p}", prompts, len(prompts), _OFFSETS["neighbours"] + 1000 * k)
            a, _ = after.stream(f"neighbour:{p}", prompts, len(prompts), _OFFSETS["neighbours"] + 1000 * k)
            b_all += b
            a_all += a
        change, half, _ = paired_interval(b_all, a_all)
        row.update(neighbours_before=float(np.mean(b_all)), neighbours=float(np.mean(a_all)),
                   neighbours_change=change, neighbours_halfwidth=half, neighbour_scenes=len(near))
    return row


# ------------------------------------------------------------------------------------------------ one cell

def preset_of(method: str) -> str:
    """The method's "testbed" preset where it has one, else "paper" (read at run time from methods.PRESETS)."""
    from . import methods

    return "testbed" if "testbed" in methods.PRESETS[base_method(method)] else "paper"


def method_config(method: str, seed: int, results: dict | None = None, task: str = ""):
    """The config of a bench row: the method's preset with the bench seed, and a variant's overrides."""
    from . import methods

    name = base_method(method)
    fields = {f.name for f in dataclasses.fields(methods.METHODS[name][0])}
    overrides = {k: v(results or {"cells": {}}, task, seed) if callable(v) else v
                 for k, v in (VARIANTS[method][1] if method in VARIANTS else {}).items()}
    if "seed" in fields:
        overrides["seed"] = seed
    return methods.config_for(name, preset_of(method), **overrides)


def _delta_tensors(delta) -> dict[str, torch.Tensor]:
    return {**{f"s:{n}": d.dense() for n, d in delta.sites.items()}, **{f"p:{n}": p for n, p in delta.params.items()}}


def merge_deltas(deltas: list, metadata: dict[str, str], base_fingerprint: str):
    """One delta that is the sum of several (rows of a site unite; dense parameters add)."""
    from .delta import Delta

    total: dict[str, torch.Tensor] = {}
    for delta in deltas:
        for name, diff in delta.diffs().items():
            total[name] = total[name] + diff.float() if name in total else diff.float().clone()
    biases = {n[: -len(".bias")] for n in total if n.endswith(".bias")}
    site_names = {n for d in deltas for n in d.sites}
    sites = {n[: -len(".weight")]: t for n, t in total.items()
             if n.endswith(".weight") and n[: -len(".weight")] in site_names and n[: -len(".weight")] not in biases}
    merged = Delta.from_dense(sites, metadata, base_fingerprint)
    params = {n: t for n, t in total.items() if not (n.endswith(".weight") and n[: -len(".weight")] in sites)}
    return Delta(merged.sites, dict(metadata), base_fingerprint, params)


def _train(method: str, parts, expanded, config, aligner, cfg: float, count_flops: bool) -> dict:
    """One training run with wall-clock and peak RSS; with count_flops a second run under the FLOP counter, which
    must give the same delta bit for bit (trust_engine.reproducible)."""
    from . import methods
    from .bench import RssWatch
    from .progress import text_progress

    watch = RssWatch()
    start_rss = watch.start()
    start = time.time()
    try:
        delta = methods.run(base_method(method), parts, expanded, config, text_progress(), aligner=aligner,
                            default_cfg=cfg)
    finally:
        peak, _ = watch.stop()
    out = {"delta": delta, "seconds": time.time() - start, "peak_rss": peak, "peak_above_start": peak - start_rss,
           "flops": None, "reproduced": None}
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            again = methods.run(base_method(method), parts, expanded, config, aligner=aligner, default_cfg=cfg)
        out["flops"] = counter.get_total_flops()
        a, b = _delta_tensors(delta), _delta_tensors(again)
        out["reproduced"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        if not out["reproduced"] and a.keys() == b.keys():  # how far apart (the counter may pick other kernels)
            out["reproduced_max_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return out


def _delta_figures(delta, unet, path: Path) -> dict:
    delta.save(path)
    diffs = [d for d in delta.diffs().values() if d.dim() >= 2]
    changed = sum(d.rank * d.in_features for d in delta.sites.values())
    changed += sum(int((d != 0).sum()) for d in delta.params.values())
    # rows = output neurons of any weight matrix the delta changes (row-sparse sites and dense .diff alike)
    return {"rows_changed": sum(int((d.flatten(1) != 0).any(dim=1).sum()) for d in diffs),
            "rows_total": sum(p.shape[0] for p in unet.parameters() if p.dim() >= 2),
            "weights_changed": changed, "weights_total": sum(p.numel() for p in unet.parameters()),
            "file_bytes": path.stat().st_size, "file": path.name}


def attacks_module():
    """trust_engine.attacks if this install has it, else None (the bench then leaves the ASR columns empty)."""
    name = f"{__package__}.attacks"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:  # the module is there but something it needs is not: say so
            raise
        return None


def run_attacks(patched_pipe, base_parts, judge, concepts: list[str], config: BenchConfig, seed: int) -> dict:
    """ASR per attack, averaged over the erased concepts (trust_engine.attacks.run on the patched model)."""
    attacks = attacks_module()
    if attacks is None or config.attacks == ():
        return {}
    from .parts import from_pipeline
    from .progress import text_progress
    from .testbed import world

    names = tuple(config.attacks) if config.attacks else tuple(attacks.ATTACKS)
    patched = from_pipeline(patched_pipe, name="bundled testbed (erased)", check_prompt=world.check_words)
    per: dict[str, list] = {n: [] for n in names}
    for concept in concepts:
        results = attacks.run(patched, concept, names, base=base_parts, judge=attacks.testbed_judge(judge),
                              budget=config.attack_budget, seed=seed, progress=text_progress())
        for name, r in results.items():
            per.setdefault(name, []).append(r)
    return {name: {"asr": float(np.mean([r.asr for r in rs])), "runs": sum(r.runs for r in rs),
                   "seconds": sum(r.seconds for r in rs), "budget": rs[0].budget, "judged_by": rs[0].judged_by}
            for name, rs in per.items() if rs}


class Arena:
    """The loaded testbed (base pipeline, parts, aligner, judge) and the base model's judged images per seed."""

    def __init__(self, config: BenchConfig, out: Path, say: Callable[[str], None]):
        from .testbed import bundle

        self.config, self.out, self.say = config, out, say
        self.base_pipe, self.base_parts, self.aligner = bundle.load_parts()
        self.judge = bundle.load_judge()
        self.baselines: dict[tuple[str, int], Judged] = {}
        self.results: dict = {"cells": {}}  # the run's results so far (a variant may depend on another cell)

    def baseline(self, task: str, seed: int) -> Judged:
        key = (task, seed)
        if key not in self.baselines:
            path = self.out / "cache" / f"base_{task}_seed{seed}.safetensors"
            self.baselines[key] = Judged(self.base_pipe, self.judge, self.config, noise_seed(seed), Judged.load(path),
                                         label="base")
        return self.baselines[key]

    def save_baseline(self, task: str, seed: int) -> None:
        (self.out / "cache").mkdir(parents=True, exist_ok=True)
        self.baseline(task, seed).save(self.out / "cache" / f"base_{task}_seed{seed}.safetensors")

    def patched(self, delta):
        from .parts import from_pipeline
        from .testbed import bundle, world
        from .testbed.evaluate import apply_delta

        pipe = bundle.load_pipeline()
        apply_delta(pipe, delta)
        return pipe, from_pipeline(pipe, name="bundled testbed", check_prompt=world.check_words)


def noise_seed(seed: int) -> int:
    """The evaluation noise of a bench seed: image i of a stream uses noise seed noise_seed(seed) + offset + i."""
    return 10_000_000 * (seed + 1)


def run_cell(arena: Arena, method: str, task: str, seed: int) -> dict:
    """Train (once, or five times in a sequence), judge against the base model with paired images, attack."""
    from . import concepts as concept_specs
    from .testbed.check import DEFAULT_CFG

    config, say = arena.config, arena.say
    sets = task_sets(task, config)
    specs = TASKS[task]
    method_cfg = method_config(method, seed, arena.results, task)
    before = arena.baseline(task, seed)
    deltas_dir = arena.out / "deltas"
    deltas_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{method}_{task}_seed{seed}"
    count_flops = config.flops and seed == 0
    row: dict = {"method": method, "preset": preset_of(method), "task": task, "seed": seed,
                 "concepts": [t for t, _, _ in specs]}
    if task != "sequence":
        expanded = [concept_specs.expand(concept_specs.ConceptSpec(t, m, p)) for t, m, p in specs]
        say(f"training {method} on {', '.join(t for t, _, _ in specs)}")
        trained = _train(method, arena.base_parts, expanded, method_cfg, arena.aligner, DEFAULT_CFG, count_flops)
        delta = trained.pop("delta")
        row.update(trained)
        row.update(_delta_figures(delta, arena.base_parts.unet, deltas_dir / f"{stem}.safetensors"))
        pipe, _ = arena.patched(delta)
        after = Judged(pipe, arena.judge, config, noise_seed(seed))
        row.update(judge_state(before, after, sets, [t for t, _, _ in specs], config, say))
        arena.save_baseline(task, seed)
        row["attacks"] = run_attacks(pipe, arena.base_parts, arena.judge, [t for t, _, _ in specs], config, seed)
        return row
    # a sequence: step k trains on the base patched by steps 1..k-1; figures after every step
    from .methods._common import base_fingerprint

    deltas, steps, totals = [], [], {"seconds": 0.0, "flops": 0, "peak_rss": 0}
    parts, pipe = arena.base_parts, arena.base_pipe
    for k, (text, mode, preserve) in enumerate(specs, start=1):
        say(f"training {method}, sequence step {k}/{len(specs)}: {text}")
        expanded = [concept_specs.expand(concept_specs.ConceptSpec(text, mode, preserve))]
        trained = _train(method, parts, expanded, method_cfg, arena.aligner, DEFAULT_CFG, count_flops)
        deltas.append(trained.pop("delta"))
        merged = merge_deltas(deltas, {"method": method, "concepts": json.dumps([t for t, _, _ in specs[:k]]),
                                       "bench": "sequence"}, base_fingerprint(arena.base_parts))
        pipe, parts = arena.patched(merged)
        after = Judged(pipe, arena.judge, config, noise_seed(seed))
        step = {"step": k, "concept": text, **trained}
        step.update(judge_state(before, after, sets, [t for t, _, _ in specs[:k]], config, say))
        steps.append(step)
        totals["seconds"] += trained["seconds"]
        totals["peak_rss"] = max(totals["peak_rss"], trained["peak_rss"])
        totals["flops"] = totals["flops"] + trained["flops"] if trained["flops"] is not None else None
        arena.save_baseline(task, seed)
    last = steps[-1]
    row.update({k: v for k, v in last.items() if k not in ("step", "concept", "seconds", "flops", "peak_rss")})
    row.update(seconds=totals["seconds"], flops=totals["flops"], peak_rss=totals["peak_rss"],
               reproduced=all(s["reproduced"] for s in steps) if count_flops else None, steps=steps)
    row.update(_delta_figures(merged, arena.base_parts.unet, deltas_dir / f"{stem}_merged.safetensors"))
    row["attacks"] = run_attacks(pipe, arena.base_parts, arena.judge, [t for t, _, _ in specs], config, seed)
    return row


# ------------------------------------------------------------------------------------------------ the run

def cell_id(method: str, task: str, seed: int) -> str:
    return f"{method}/{task}/seed{seed}"


class SettingsMismatchError(ValueError):
    pass


def load_results(path: Path, config: BenchConfig) -> dict:
    """The results file of an earlier run in this folder (to resume), or a new one; refuses other settings."""
    if not path.exists():
        return {"settings": config.stored(), "cells": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != config.stored():
        stored = results.get("settings", {})
        diff = sorted(k for k in set(stored) | set(config.stored()) if stored.get(k) != config.stored().get(k))
        raise SettingsMismatchError(
            f"{path} holds a bench run with other settings ({', '.join(diff)}: "
            f"{', '.join(f'{stored.get(k)} vs {config.stored().get(k)}' for k in diff)}); "
            f"give another --out or delete that file to start over")
    return results


def save_results(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(results), indent=1, allow_nan=False))
    os.replace(tmp, path)  # a kill mid-write leaves the previous file whole


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run(config: BenchConfig, out: Path, say: Callable[[str], None] = print,
        cell_runner: Callable[[Arena, str, str, int], dict] = run_cell) -> dict:
    """Every (method, task) pair x seed not yet in out/bench.json; the file is rewritten after each cell, so a
    killed run resumes where it stopped. Then bench.md and bench.png from all done cells."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    results = load_results(path, config)
    todo = [(m, t, s) for m, t in config.pairs() for s in range(config.seeds)]
    left = [c for c in todo if cell_id(*c) not in results["cells"]]
    say(f"bench: {len(todo)} cells, {len(todo) - len(left)} already done in {path}, {len(left)} to run")
    arena = Arena(config, out, say) if left else None
    if arena is not None:
        arena.results = results
    started = time.time()
    for number, (method, task, seed) in enumerate(left, start=1):
        say(f"[{number}/{len(left)}] {cell_id(method, task, seed)} ({time.time() - started:.0f} s so far)")
        cell_start = time.time()
        row = cell_runner(arena, method, task, seed)
        row["cell_seconds"] = time.time() - cell_start
        results["cells"][cell_id(method, task, seed)] = row
        save_results(path, results)
    results["summary"] = summarise(results["cells"], [(m, t) for m, t in config.pairs()])
    results["machine"] = machine()
    save_results(path, results)
    (out / "bench.md").write_text(markdown(results, config))
    plot(results["summary"], out / "bench.png")
    return results


def machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ summary

SUMMED = ("forget", "forget_before", "synonym_forget", "preserve", "preserve_before", "preserve_change",
          "preserve_single", "preserve_two_object", "parts", "parts_change", "neighbours", "neighbours_change",
          "kid", "seconds", "flops", "peak_rss", "rows_changed", "weights_changed", "file_bytes", "preserve_images")


def summarise(cells: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """Per (method, task): each figure's seed mean and sample sd, the per-seed paired interval half-widths
    (averaged), and the mean ASR per attack."""
    out = []
    for method, task in pairs:
        rows = [r for r in cells.values() if r["method"] == method and r["task"] == task]
        if not rows:
            continue
        s = {"method": method, "task": task, "preset": rows[0]["preset"], "seeds": len(rows)}
        for key in SUMMED:
            s[key], s[key + "_sd"] = mean_sd([r.get(key) for r in rows])
        for key in ("preserve_halfwidth", "parts_halfwidth", "neighbours_halfwidth"):
            s[key] = mean_sd([r.get(key) for r in rows])[0]
        s["reproduced"] = all(r.get("reproduced") is not False for r in rows)
        names = sorted({a for r in rows for a in (r.get("attacks") or {})})
        s["asr"] = {a: mean_sd([r["attacks"][a]["asr"] for r in rows if a in (r.get("attacks") or {})])[0]
                    for a in names}
        if task == "sequence":
            s["steps"] = [{"step": k + 1, **{key: mean_sd([r["steps"][k].get(key) for r in rows])[0]
                                             for key in ("forget", "preserve", "preserve_change", "neighbours_change",
                                                         "kid")}} for k in range(len(rows[0]["steps"]))]
        out.append(s)
    return out


def _pm(mean, sd, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None or mean != mean:
        return "—"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if sd is not None and sd == sd else "")


def markdown(results: dict, config: BenchConfig) -> str:
    m = results.get("machine", machine())
    lines = ["# bench: methods x tasks on the bundled testbed\n",
             f"{m['machine']}, {m['cpus']} CPUs, torch {m['torch']}, {m['threads']} torch thread(s). "
             f"Figures are seed means ± the sample sd over seeds (— with one seed); `±img` is the 95 % paired image "
             f"interval of the preserve change (same prompts and noise before/after), averaged over seeds.\n"]
    attacks = sorted({a for s in results["summary"] for a in s["asr"]})
    head = ["method (preset)", "task", "seeds", "forget before → after", "synonym forget",
            *[f"ASR {a}" for a in attacks], "preserve before → after", "preserve change (±img)", "images",
            "one-object", "two-object", "parts change", "neighbour change", "KID ×1e3", "train s", "GFLOP",
            "peak MiB", "rows", "weights", "file KiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in results["summary"]:
        cells = [f"{s['method']} ({s['preset']})", s["task"], str(s["seeds"]),
                 f"{s['forget_before']:.2f} → {_pm(s['forget'], s['forget_sd'])}", _pm(s["synonym_forget"],
                                                                                        s["synonym_forget_sd"]),
                 *[_pm(s["asr"].get(a), None) for a in attacks],
                 f"{s['preserve_before']:.2f} → {_pm(s['preserve'], s['preserve_sd'])}",
                 f"{_pm(s['preserve_change'], s['preserve_change_sd'], 100, 1)} (±{100 * s['preserve_halfwidth']:.1f})",
                 f"{s['preserve_images']:.0f}", _pm(s["preserve_single"], None), _pm(s["preserve_two_object"], None),
                 _pm(s["parts_change"], s["parts_change_sd"], 100, 1), _pm(s["neighbours_change"],
                                                                           s["neighbours_change_sd"], 100, 1),
                 _pm(s["kid"], s["kid_sd"], 1e3, 2), _pm(s["seconds"], s["seconds_sd"], 1, 0),
                 _pm(s["flops"], None, 1e-9, 1), _pm(s["peak_rss"], None, 2**-20, 0),
                 f"{s['rows_changed']:.0f}", f"{s['weights_changed']:,.0f}", f"{s['file_bytes'] / 1024:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    seqs = [s for s in results["summary"] if s["task"] == "sequence"]
    for s in seqs:
        lines += [f"\n{s['method']}, five concepts erased one after another ({', '.join(c for c, _, _ in TASKS['sequence'])}):"
                  f" after each step, forget over the concepts erased so far\n",
                  "| step | forget | preserve | preserve change | neighbour change | KID ×1e3 |", "|---|---|---|---|---|---|"]
        for st in s["steps"]:
            lines.append(f"| {st['step']} | {st['forget']:.2f} | {st['preserve']:.2f} | "
                         f"{100 * st['preserve_change']:+.1f} | {_pm(st['neighbours_change'], None, 100, 1)} | "
                         f"{1e3 * st['kid']:.2f} |")
    if not attacks:
        lines.append("\nNo attack columns: this install has no trust_engine.attacks (or --attacks none).")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plot (PIL)

_COLOURS = {"trust": (214, 39, 40), "esd": (31, 119, 180), "uce": (44, 160, 44), "salun": (148, 103, 189),
            "fia": (255, 127, 14), "conceptprune": (140, 86, 75)}


def plot(summary: list[dict], path: Path, size: int = 640) -> Path:
    """Forget (x, lower is better) vs preserve (y) after erasure, one marker per method and task: colour = method,
    shape = task, area ~ training wall-clock; error bars = seed sd where there are several seeds, else the paired
    image interval of preserve (matplotlib is not a dependency: drawn with PIL)."""
    from PIL import Image, ImageDraw

    margin, legend = 60, 170
    img = Image.new("RGB", (size + legend, size), "white")
    draw = ImageDraw.Draw(img)
    box = (margin, 20, size - 20, size - margin)

    def xy(forget: float, preserve: float) -> tuple[float, float]:
        return (box[0] + forget * (box[2] - box[0]), box[3] - preserve * (box[3] - box[1]))

    draw.rectangle(box, outline="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        x, y = xy(v, v)
        draw.line([(x, box[3]), (x, box[3] + 5)], fill="black")
        draw.text((x - 10, box[3] + 8), f"{v:.2f}", fill="black")
        draw.line([(box[0] - 5, y), (box[0], y)], fill="black")
        draw.text((box[0] - 38, y - 6), f"{v:.2f}", fill="black")
    draw.text(((box[0] + box[2]) / 2 - 90, size - 28), "forget rate after (lower = erased)", fill="black")
    draw.text((4, 4), "preserve accuracy after", fill="black")
    shapes = dict(zip(TASK_NAMES, ("circle", "square", "triangle", "diamond", "cross")))
    longest = max([s["seconds"] for s in summary if s["seconds"] == s["seconds"]] or [1.0])
    for s in summary:
        if s["forget"] != s["forget"] or s["preserve"] != s["preserve"]:
            continue
        x, y = xy(s["forget"], s["preserve"])
        colour = _COLOURS.get(s["method"], _COLOURS.get(base_method(s["method"]), (0, 0, 0)))
        ex = s["forget_sd"] if s["forget_sd"] == s["forget_sd"] else 0.0
        ey = s["preserve_sd"] if s["preserve_sd"] == s["preserve_sd"] else s["preserve_halfwidth"]
        (x0, y0), (x1, y1) = xy(s["forget"] - ex, s["preserve"] - ey), xy(s["forget"] + ex, s["preserve"] + ey)
        draw.line([(x0, y), (x1, y)], fill=colour)
        draw.line([(x, y0), (x, y1)], fill=colour)
        r = 4 + 14 * math.sqrt(max(s["seconds"], 0) / longest)
        _marker(draw, shapes.get(s["task"], "circle"), x, y, r, colour)
    lx = size + 10
    draw.text((lx, 20), "method", fill="black")
    for i, (name, colour) in enumerate(_COLOURS.items()):
        draw.rectangle((lx, 40 + 18 * i, lx + 10, 50 + 18 * i), fill=colour)
        draw.text((lx + 16, 38 + 18 * i), name, fill="black")
    draw.text((lx, 170), "task", fill="black")
    for i, (task, shape) in enumerate(shapes.items()):
        _marker(draw, shape, lx + 5, 195 + 20 * i, 6, (90, 90, 90))
        draw.text((lx + 16, 188 + 20 * i), task, fill="black")
    draw.text((lx, 310), "marker area ~ train\nwall-clock; bars: seed\nsd (1 seed: preserve\npaired 95 % interval)",
              fill="black")
    img.save(path)
    return path


def _marker(draw, shape: str, x: float, y: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=2)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), outline=colour, width=2)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], outline=colour, width=2)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], outline=colour, width=2)
    else:
        draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=2)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=2)


def describe_quick() -> str:
    return ", ".join(f"{m} x {t}" for m, t in QUICK_CELLS)


def main_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
