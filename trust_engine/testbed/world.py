"""The procedural concept world: its vocabulary, a seeded 32x32 renderer and the prompts that describe scenes.
Everything the testbed model, aligner and judge learn comes from here; the unlearning engine never imports it.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

IMAGE_SIZE = 32

# The one vocabulary table (README "Vocabulary" mirrors it). First word of each entry is the canonical name.
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle", "wedge"),
    "star": ("star", "pentagram"),
}
COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "yellow": ("yellow", "golden"),
}
RELATIONS: dict[str, tuple[str, ...]] = {
    "on": ("on", "on top of"),
    "next to": ("next to", "beside"),
}
# Words that stand for "an object of any shape" when only a colour is given ("a red shape").
ANY_SHAPE_WORDS = ("shape", "object", "thing")
FRAMES = ("{}", "a picture of {}", "a photo of {}", "an image of {}", "a drawing of {}")
FILLER_WORDS = ("a", "an", "the", "of", "picture", "photo", "image", "drawing")

SHAPE_NAMES = tuple(SHAPES)
COLOUR_NAMES = tuple(COLOURS)
RELATION_NAMES = tuple(RELATIONS)
# The judge's layout classes: what kind of scene an image shows.
LAYOUTS = ("empty", "single", "on", "next to")

RGB = {
    "red": (0.86, 0.12, 0.10),
    "green": (0.12, 0.66, 0.18),
    "blue": (0.12, 0.26, 0.90),
    "yellow": (0.96, 0.84, 0.08),
}


def vocabulary() -> list[str]:
    """Every word a testbed prompt may use, sorted."""
    words: set[str] = set(FILLER_WORDS) | set(ANY_SHAPE_WORDS)
    for table in (SHAPES, COLOURS, RELATIONS):
        for synonyms in table.values():
            for phrase in synonyms:
                words.update(phrase.split())
    return sorted(words)


def synonym_of(word: str) -> str | None:
    """Canonical shape or colour name for a word, or None."""
    for table in (SHAPES, COLOURS):
        for name, synonyms in table.items():
            if word in synonyms:
                return name
    return None


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object; None means "any" (an attribute the prompt leaves out)."""

    shape: str | None
    colour: str | None


@dataclasses.dataclass(frozen=True)
class Scene:
    """What an image shows or a prompt asks for. relation None = a single object (or empty if no objects)."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    @property
    def layout(self) -> str:
        if not self.objects:
            return "empty"
        return self.relation or "single"

    def is_concrete(self) -> bool:
        return all(o.shape and o.colour for o in self.objects)


# ----------------------------------------------------------------------------------------------- renderer

def _star_polygon() -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


# Unit outlines (x right, y down), each inside [-1, 1]^2.
_POLYGONS = {
    "square": np.array([[-0.82, -0.82], [0.82, -0.82], [0.82, 0.82], [-0.82, 0.82]]),
    "triangle": np.array([[0.0, -1.0], [1.0, 0.8], [-1.0, 0.8]]),
    "star": _star_polygon(),
}


def _extent(shape: str) -> tuple[float, float]:
    """(top, bottom) of the unit outline, as offsets from its centre."""
    if shape == "circle":
        return -1.0, 1.0
    ys = _POLYGONS[shape][:, 1]
    return float(ys.min()), float(ys.max())


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return x * x + y * y <= 1.0
    poly = _POLYGONS[shape]
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (x < x_at)
    return inside


_SUPER = 4  # supersampling factor for anti-aliased edges
_grid = (np.arange(IMAGE_SIZE * _SUPER) + 0.5) / _SUPER
_GX, _GY = np.meshgrid(_grid, _grid)


def _coverage(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    mask = _inside(shape, (_GX - cx) / half, (_GY - cy) / half).astype(np.float32)
    return mask.reshape(IMAGE_SIZE, _SUPER, IMAGE_SIZE, _SUPER).mean(axis=(1, 3))


def _colour(name: str, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.array(RGB[name]) + rng.uniform(-0.06, 0.06, 3), 0, 1)


def render(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, Scene]:
    """Draw a concrete scene with size, position and colour jitter.

    Returns a float32 HxWx3 image in [0, 1] and the scene as the judge reads it: for "next to" the left
    object first (the relation is symmetric), otherwise the scene's own order (for "on": the upper object).
    """
    if not scene.is_concrete():
        raise ValueError(f"render needs every shape and colour fixed, got {scene}")
    grey = rng.uniform(0.3, 0.92)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    image[:] = np.clip(grey + rng.uniform(-0.04, 0.04, 3), 0, 1)
    placements = list(zip(scene.objects, _place(scene, rng)))
    for obj, (cx, cy, half) in reversed(placements):  # the first-named object is drawn last, on top
        alpha = _coverage(obj.shape, cx, cy, half)[..., None]
        image = image * (1 - alpha) + _colour(obj.colour, rng) * alpha
    seen = scene
    if scene.relation == "next to" and placements[0][1][0] > placements[1][1][0]:
        seen = Scene(scene.objects[::-1], scene.relation)
    return image.astype(np.float32), seen


def _place(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Centre x, centre y and half-size for each object of the scene, in pixels, in the scene's order."""
    n = IMAGE_SIZE
    if scene.layout == "empty":
        return []
    if scene.layout == "single":
        half = rng.uniform(5.5, 9.5)
        return [(rng.uniform(half + 1, n - half - 1), rng.uniform(half + 1, n - half - 1), half)]
    top_obj, other = scene.objects
    h1, h2 = rng.uniform(4.5, 6.8, size=2)
    if scene.relation == "on":
        # `other` rests at the bottom; `top_obj` sits on it, touching its upper edge.
        t1, b1 = _extent(top_obj.shape)
        t2, b2 = _extent(other.shape)
        height = (b1 - t1) * h1 + (b2 - t2) * h2
        y_top_edge = rng.uniform(1.0, n - 1.0 - height)
        cy1 = y_top_edge - t1 * h1
        cy2 = cy1 + b1 * h1 - t2 * h2 - rng.uniform(0.0, 0.8)
        width = max(h1, h2)
        cx2 = rng.uniform(width + 1, n - width - 1)
        cx1 = float(np.clip(cx2 + rng.uniform(-1.5, 1.5), h1 + 1, n - h1 - 1))
        return [(cx1, cy1, h1), (cx2, cy2, h2)]
    # next to: side by side, same height band, random left/right order.
    h1, h2 = rng.uniform(4.2, 6.0, size=2)
    gap = rng.uniform(1.5, 4.5)
    total = 2 * h1 + 2 * h2 + gap
    left = rng.uniform(1.0, n - 1.0 - total)
    cy = rng.uniform(max(h1, h2) + 1.5, n - max(h1, h2) - 1.5)
    xa, xb = left + h1, left + 2 * h1 + gap + h2
    jitter = rng.uniform(-1.0, 1.0, size=2)
    if rng.random() < 0.5:
        return [(xa, cy + jitter[0], h1), (xb, cy + jitter[1], h2)]
    xa, xb = left + h2, left + 2 * h2 + gap + h1
    return [(xb, cy + jitter[0], h1), (xa, cy + jitter[1], h2)]



# ----------------------------------------------------------------------------------------------- prompts

def random_scene(rng: np.random.Generator, layout: str | None = None) -> Scene:
    """A concrete scene; layout None draws single objects and two-object scenes in equal parts."""
    if layout is None:
        layout = ("single", "single", "on", "next to")[rng.integers(4)]
    if layout == "empty":
        return Scene(())
    count = 1 if layout == "single" else 2
    objects = tuple(Obj(SHAPE_NAMES[rng.integers(4)], COLOUR_NAMES[rng.integers(4)]) for _ in range(count))
    return Scene(objects, None if layout == "single" else layout)


def _article(word: str, rng: np.random.Generator, definite_ok: bool = False) -> str:
    if definite_ok and rng.random() < 0.3:
        return "the"
    return "an" if word[0] in "aeiou" else "a"


def _picker(words: str, rng: np.random.Generator):
    """How to choose among synonyms: "any" of them, only the "canonical" first one, or only a "synonym"."""
    if words == "canonical":
        return lambda options: options[0]
    if words == "synonym":
        return lambda options: options[1 + rng.integers(len(options) - 1)]
    return lambda options: options[rng.integers(len(options))]


def object_phrase(obj: Obj, rng: np.random.Generator, words: str = "any", definite_ok: bool = False) -> str:
    """"a red circle", "a disc", "a crimson shape"... (see `_picker` for `words`); None attributes are left out."""
    pick = _picker(words, rng)
    words = []
    if obj.colour:
        words.append(pick(COLOURS[obj.colour]))
    words.append(pick(SHAPES[obj.shape]) if obj.shape else ANY_SHAPE_WORDS[rng.integers(len(ANY_SHAPE_WORDS))])
    return f"{_article(words[0], rng, definite_ok)} {' '.join(words)}"


def describe(scene: Scene, rng: np.random.Generator, words: str = "any", frame: str | None = None) -> str:
    """A prompt for a (possibly partial) scene, with a random frame ("a picture of ...") and synonyms."""
    first = object_phrase(scene.objects[0], rng, words)
    if scene.relation:
        rel = _picker(words, rng)(RELATIONS[scene.relation])
        first = f"{first} {rel} {object_phrase(scene.objects[1], rng, words, definite_ok=True)}"
    if frame is None:
        frame = FRAMES[rng.integers(len(FRAMES))]
    text = frame.format(first)
    if frame == "{}" and rng.random() < 0.3:  # bare noun phrases, as people type them: "red circle"
        text = text.split(" ", 1)[1]
    return text


def drop_attributes(scene: Scene, rng: np.random.Generator, p_keep_both: float = 0.7) -> Scene:
    """Leave out the colour or the shape of some objects, so partial prompts ("a circle") are learned too."""
    objects = []
    for obj in scene.objects:
        u = rng.random()
        if u < p_keep_both:
            objects.append(obj)
        elif u < (1 + p_keep_both) / 2:
            objects.append(Obj(obj.shape, None))
        else:
            objects.append(Obj(None, obj.colour))
    return Scene(tuple(objects), scene.relation)


class UnknownWordError(ValueError):
    """A prompt uses a word the testbed world does not know."""


_WORD = re.compile(r"[a-z]+")


def check_words(prompt: str) -> list[str]:
    """The prompt's words; raises UnknownWordError naming every word outside the vocabulary."""
    words = _WORD.findall(prompt.lower())
    known = set(vocabulary())
    unknown = [w for w in words if w not in known]
    if unknown:
        raise UnknownWordError(
            f"the testbed model does not know the word(s) {', '.join(repr(w) for w in unknown)} in {prompt!r}. "
            f"It only draws shapes {', '.join(SHAPE_NAMES)} in colours {', '.join(COLOUR_NAMES)}, alone or "
            f"'on'/'next to' each other; known words: {' '.join(sorted(known))}"
        )
    return words


def parse(prompt: str) -> Scene:
    """What a testbed prompt asks for; attributes it leaves out are None. Raises on unknown words."""
    text = " ".join(check_words(prompt))
    for name, phrases in RELATIONS.items():
        for phrase in sorted(phrases, key=len, reverse=True):
            parts = re.split(rf"\b{phrase}\b", text, maxsplit=1)
            if len(parts) == 2:
                return Scene((_parse_object(parts[0], prompt), _parse_object(parts[1], prompt)), name)
    return Scene((_parse_object(text, prompt),))


def _parse_object(text: str, prompt: str) -> Obj:
    shape = colour = None
    for word in text.split():
        name = synonym_of(word)
        if name in SHAPES:
            shape = name
        elif name in COLOURS:
            colour = name
    if shape is None and colour is None:
        raise ValueError(f"{prompt!r} names no shape or colour in {text.strip()!r}")
    return Obj(shape, colour)


def contains(concept: Scene, scene: Scene) -> bool:
    """Does a scene show the concept anywhere? A one-object concept ("a triangle", "a red circle") is shown by any
    object of the scene that fits it; a two-object concept only by a scene that matches it whole."""
    if len(concept.objects) == 1:
        return any(matches(concept, Scene((obj,))) for obj in scene.objects)
    return matches(concept, scene)


def matches(asked: Scene, seen: Scene) -> bool:
    """Does a seen (concrete) scene show everything a prompt asked for? "next to" matches either order."""
    if asked.layout != seen.layout:
        return False

    def same(a: Obj, b: Obj) -> bool:
        return (a.shape is None or a.shape == b.shape) and (a.colour is None or a.colour == b.colour)

    pairs = [list(zip(asked.objects, seen.objects))]
    if asked.relation == "next to":
        pairs.append(list(zip(asked.objects, seen.objects[::-1])))
    return any(all(same(a, b) for a, b in p) for p in pairs)
