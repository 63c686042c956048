"""Judging an erasure on the testbed: every prompt form of the concept (forget set, incl. synonyms the engine
never saw) and the testbed prompts that do not show it (preserve set, incl. the concept's parts), before/after.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from . import check, world

FRAMES = world.FRAMES


@dataclasses.dataclass
class EvalSets:
    concept: world.Scene
    forget: list[str]
    forget_is_synonym: list[bool]
    preserve: list[str]
    preserve_is_part: list[bool]


def _phrase_forms(obj: world.Obj) -> list[tuple[str, bool]]:
    """Every way to name an object ("a red circle", "a crimson disc", ...) and whether it uses a synonym."""
    colours = list(enumerate(world.COLOURS[obj.colour])) if obj.colour else [(0, None)]
    shapes = list(enumerate(world.SHAPES[obj.shape])) if obj.shape else [(0, w) for w in world.ANY_SHAPE_WORDS[:1]]
    forms = []
    for (ci, c), (si, s) in itertools.product(colours, shapes):
        words = [w for w in (c, s) if w]
        forms.append((" ".join(words), ci > 0 or si > 0))
    return forms


def _article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def prompt_forms(scene: world.Scene) -> list[tuple[str, bool]]:
    """Every prompt form of a (partial) scene: frames x synonyms x relation phrasings."""
    firsts = _phrase_forms(scene.objects[0])
    if scene.relation:
        seconds = _phrase_forms(scene.objects[1])
        rels = list(enumerate(world.RELATIONS[scene.relation]))
        cores = [(f"{_article(a)} {r} {_article(b)}", sa or sb or ri > 0)
                 for (a, sa), (ri, r), (b, sb) in itertools.product(firsts, rels, seconds)]
    else:
        cores = [(_article(a), sa) for a, sa in firsts]
    return [(frame.format(core), syn) for frame in FRAMES for core, syn in cores]


def eval_sets(concept: str, mode: str, max_forget: int = 48, max_preserve: int = 96, seed: int = 0) -> EvalSets:
    """The forget set (every form of the concept) and the preserve set (prompts that cannot show it + parts)."""
    query = world.parse(concept)
    rng = np.random.default_rng([seed, 777])
    forms = prompt_forms(query)
    if len(forms) > max_forget:
        forms = [forms[i] for i in sorted(rng.choice(len(forms), max_forget, replace=False))]
    parts = _parts(query, mode)
    candidates = [world.Scene((world.Obj(s, c),)) for s, c in itertools.product(world.SHAPE_NAMES, world.COLOUR_NAMES)]
    for _ in range(160):  # enough that ~80 remain after dropping the scenes that show the concept
        candidates.append(world.random_scene(rng, ("on", "next to")[int(rng.integers(2))]))
    keep = [sc for sc in candidates if not world.contains(query, sc) and sc not in parts]
    preserve = [world.describe(sc, rng, "canonical") for sc in keep][: max_preserve - 4 * len(parts)]
    part_prompts = [world.describe(p, rng, "canonical") for p in parts for _ in range(4)]
    return EvalSets(query, [f for f, _ in forms], [s for _, s in forms], preserve + part_prompts,
                    [False] * len(preserve) + [True] * len(part_prompts))


def _parts(query: world.Scene, mode: str) -> list[world.Scene]:
    """What a combination or conditional concept is made of, each on its own (the evaluator's ground truth)."""
    if mode == "combination":
        obj = query.objects[0]
        return [world.Scene((world.Obj(obj.shape, None),)), world.Scene((world.Obj(None, obj.colour),))]
    if mode == "conditional":
        x, y = query.objects
        other = "next to" if query.relation == "on" else "on"
        return [world.Scene((x,)), world.Scene((y,)), world.Scene((x, y), other)]
    return []


def judge_rate(judge, images: torch.Tensor, prompts: list[str], query: world.Scene | None = None) -> list[bool]:
    """Per image: does it show `query` (forget set), or what its own prompt asks for (preserve set)?"""
    seen = judge.read(images)
    if query is not None:
        return [world.contains(query, s) for s in seen]
    return [world.matches(world.parse(p), s) for p, s in zip(prompts, seen)]


def evaluate(pipe, judge, sets: EvalSets, seeds: int = 2, steps: int = check.DEFAULT_STEPS,
             cfg: float = check.DEFAULT_CFG, seed: int = 1000) -> dict[str, float]:
    """Rates for one model state (the pipeline as it is)."""
    forget = [p for p in sets.forget for _ in range(seeds)]
    syn = [s for s in sets.forget_is_synonym for _ in range(seeds)]
    f_images = check.generate(pipe, forget, seed=seed, steps=steps, cfg=cfg)
    shown = judge_rate(judge, f_images, forget, sets.concept)
    preserve = [p for p in sets.preserve for _ in range(seeds)]
    is_part = [x for x in sets.preserve_is_part for _ in range(seeds)]
    p_images = check.generate(pipe, preserve, seed=seed + 100_000, steps=steps, cfg=cfg)
    ok = judge_rate(judge, p_images, preserve)
    parts = [o for o, part in zip(ok, is_part) if part]
    pairs = [len(world.parse(p).objects) == 2 for p in preserve]
    syn_shown = [s for s, is_syn in zip(shown, syn) if is_syn]

    def rate(values):
        return float(np.mean(values)) if values else float("nan")

    return {
        "forget_rate": rate(shown),
        "synonym_forget_rate": rate(syn_shown),
        "preserve_accuracy": rate(ok),
        "parts_accuracy": rate(parts),
        # where the preserve damage is: one-object scenes vs. two objects in a relation
        "preserve_single_accuracy": rate([o for o, two in zip(ok, pairs) if not two]),
        "preserve_two_object_accuracy": rate([o for o, two in zip(ok, pairs) if two]),
    }


def apply_delta(pipe, delta, strength: float = 1.0) -> None:
    """Write base + strength * delta into this (the evaluator's own, freshly loaded) pipeline's UNet: its row-sparse
    sites and its dense parameter differences (any weight or bias inside the transformer blocks)."""
    from ..unet_params import parameter_map
    from ..unet_view import find_sites, set_site_weight, site_weights

    sites = {s.name: s for s in find_sites(pipe.unet, include_out=True)}
    new = delta.apply_to(site_weights(pipe.unet, [sites[n] for n in delta.sites if n in sites]), strength)
    for name, weight in new.items():
        set_site_weight(pipe.unet, sites[name], weight)
    if delta.params:
        from ..delta import Delta

        table = parameter_map(pipe.unet)
        live = dict(pipe.unet.named_parameters())
        missing = sorted(set(delta.params) - set(table))
        if missing:
            raise KeyError(f"this UNet has no parameter {missing[0]!r}; the delta was made for another architecture")
        dense_only = Delta({}, params=delta.params)  # the sites are written above
        new = dense_only.apply_to_params({n: live[table[n]].detach() for n in delta.params}, strength)
        with torch.no_grad():
            for name, value in new.items():
                live[table[name]].copy_(value)
