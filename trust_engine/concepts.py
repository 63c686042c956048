"""The one prompt expander: a concept as a user typed it -> forget prompts, preserve prompts and an anchor prompt.
Pure Python and host-agnostic; every rule (frames, articles, relation phrases, generic noun) is a field of ExpandConfig.

Modes (DESIGN §2, method §1.7):
- individual   "triangle", "nudity": erased as one thing; no parts; anchor = "" (the unconditional prompt).
- combination  "red circle": last word = noun, the words before it = attributes. Parts = the noun alone ("a circle")
               and the attributes on a generic noun ("a red object"). Erasing the conjunction while preserving each
               part keeps red squares and blue circles. Anchor = the noun alone.
- conditional  "a cat on the table": split at the first relation phrase. Parts = each side alone and the two sides in
               another relation ("a cat next to the table"), which is also the anchor.
Users may mark parts themselves (`parts=[...]`), which replaces the derivation; the anchor can always be overridden.

Concept types (CONCEPT_TYPES): presets for common kinds of concept on real checkpoints - object, art style, nudity,
person - each adding a retain set (preserve prompts) and an anchor, so an individual concept is not erased against
`""` alone. "none" (the default) adds nothing. User preserve prompts are added to the type's; a user anchor wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

MODES = ("individual", "combination", "conditional")
NO_CONCEPT_TYPE = "none"

_EMPTY_CONCEPT = "type the concept to erase, e.g. 'nudity' or 'red circle'"


class ConceptError(ValueError):
    """A concept spec the expander cannot use; the message says what to type instead."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ExpandConfig:
    """How concepts are turned into prompts. The defaults are generic English; nothing names a model's vocabulary."""

    frames: tuple[str, ...] = field(
        default=("a photo of {}", "a picture of {}", "an image of {}", "a drawing of {}"),
        metadata=_help("Sentence frames each prompt is also written in; '{}' is replaced by the text with an article."),
    )
    article: str = field(
        default="auto",
        metadata=_help(
            "'auto': add 'a'/'an' unless the text starts with a determiner or its last word looks plural or "
            "uncountable; 'always': add one unless it starts with a determiner; 'never': keep the text as typed."
        ),
    )
    determiners: tuple[str, ...] = field(
        default=tuple(
            "a an the this that these those my your his her its our their some any each every no many several few "
            "all both one two three four five six seven eight nine ten".split()
        ),
        metadata=_help("Leading words that already make a noun phrase: no article is added; combination drops one."),
    )
    uncountable_suffixes: tuple[str, ...] = field(
        default=("ity", "ness", "ism"),
        metadata=_help(
            "A last word with one of these endings (and at least 3 letters before it) is taken as uncountable and "
            "gets no article: 'nudity' -> 'a photo of nudity', but 'city' -> 'a city'. Empty = never."
        ),
    )
    generic_noun: str = field(
        default="object",
        metadata=_help("Combination: the attributes are preserved on this noun ('red circle' -> 'a red object')."),
    )
    relations: tuple[str, ...] = field(
        default=tuple(
            "on top of|in front of|next to|on|beside|under|beneath|above|below|over|behind|inside|in|with|holding|"
            "wearing|near".split("|")
        ),
        metadata=_help(
            "Conditional: phrases a concept is split at; the first one from the left wins, and at one position the "
            "longest phrase ('on top of' before 'on')."
        ),
    )
    other_relation: str = field(
        default="next to",
        metadata=_help("Conditional: the other relation the two sides are preserved in (and anchored to)."),
    )
    side_by_side_relations: tuple[str, ...] = field(
        default=("next to", "beside", "near"),
        metadata=_help(
            "Conditional: relations that already mean `other_relation`; for these `side_by_side_other` is used "
            "instead, so 'a star beside a box' is not preserved as its own synonym 'a star next to a box'."
        ),
    )
    side_by_side_other: str = field(
        default="on",
        metadata=_help("Conditional: the other relation for concepts whose relation is side by side."),
    )
    lowercase: bool = field(
        default=True,
        metadata=_help(
            "Lower-case every prompt. The CLIP tokenizers of SD 1.x/2.x/XL lower-case anyway, so the model sees the "
            "same text, and 'A Circle' and 'a circle' count as one prompt."
        ),
    )

    def __post_init__(self) -> None:
        for frame in self.frames:
            if frame.count("{}") != 1:
                raise ConceptError(f"frame {frame!r} must contain '{{}}' exactly once, e.g. 'a photo of {{}}'")
        if self.article not in ("auto", "always", "never"):
            raise ConceptError(f"article must be 'auto', 'always' or 'never', not {self.article!r}")
        if not self.generic_noun.strip():
            raise ConceptError("generic_noun must be a word, e.g. 'object'")
        if not any(r.strip() for r in self.relations):
            raise ConceptError("relations must list at least one phrase, e.g. 'on'")
        if self.other_relation not in self.side_by_side_relations:
            raise ConceptError(
                f"other_relation {self.other_relation!r} must be one of side_by_side_relations, so that a concept "
                "already using it is preserved in side_by_side_other instead"
            )
        if self.side_by_side_other in self.side_by_side_relations:
            raise ConceptError(f"side_by_side_other {self.side_by_side_other!r} must not be a side-by-side relation")


DEFAULT_CONFIG = ExpandConfig()


@dataclass(frozen=True)
class ConceptType:
    """Preset prompts for one common kind of concept, written for real checkpoints (CLIP's open vocabulary; the
    bundled testbed knows none of these words). `{}` in a forget template is replaced by the concept's text."""

    name: str
    help: str  # one line: what the type is for (tooltips, --help)
    why: str  # one sentence: why these prompts (README, the expansion's notes)
    preserve: tuple[str, ...] = ()  # the retain set: prompts that must keep working
    anchor: str | None = None  # what an individual concept becomes; None = the mode's own anchor
    forget: tuple[str, ...] = ()  # more forget prompts, templates with '{}' once
    article: str | None = None  # ExpandConfig.article for this type (names take none: 'a photo of van gogh')

    def __post_init__(self) -> None:
        for template in self.forget:
            if template.count("{}") != 1:
                raise ConceptError(f"concept type {self.name!r}: forget template {template!r} needs '{{}}' once")


# The retain sets follow the prompts of the published erasers (FIA's fia/prompts.py and ConceptPrune's
# utils/prompts.py, SalUn's NSFW set, the anchors of ESD and of UCE's trainscripts/uce_sd_erase.py); each entry says
# which. Every prompt names its subject, so a preserve prompt that contains the concept itself ("a photo of a dog"
# when erasing "dog") is dropped at expansion.
CONCEPT_TYPES: dict[str, ConceptType] = {
    NO_CONCEPT_TYPE: ConceptType(
        NO_CONCEPT_TYPE,
        help="nothing added: the mode's own parts and anchor ('' for an individual concept)",
        why="the expansion as before concept types existed; type your own preserve prompts",
    ),
    # ESD and UCE anchor objects to the unconditional prompt ""; FIA/ConceptPrune contrast an object with the
    # everyday things and places it appears among (their `objects` and `places` lists).
    "object": ConceptType(
        "object",
        help="a thing (a car, a dog, a logo): keeps other everyday objects and scenes; anchor ''",
        why="other everyday objects and the scenes things appear in (FIA's and ConceptPrune's object and place "
            "prompts) keep the model drawing everything else, while the object goes to the unconditional prompt "
            "as in ESD and UCE",
        preserve=tuple(f"a photo of {x}" for x in (
            "a dog", "a cat", "a car", "a bicycle", "a chair", "a table", "a bird", "a flower", "a tree", "a clock",
            "a guitar", "a laptop", "a book", "a bottle", "a street", "a park", "a room", "a beach", "a forest",
            "a mountain")),
        anchor="",
    ),
    # UCE's guide concept for art is "art"; FIA/ConceptPrune write styles as "a {thing} in the style of {artist}"
    # and contrast them with plain "a photo of a {thing}".
    "art style": ConceptType(
        "art style",
        help="an artist or a style (van gogh, cubism): keeps other named styles and plain photos; anchor 'art'",
        why="paintings in other named styles and plain photos of the same subjects (FIA's and ConceptPrune's art "
            "prompts) keep art and photography working while the style goes to UCE's guide concept 'art'",
        preserve=(
            "a painting in the style of claude monet", "a painting in the style of rembrandt",
            "a painting in the style of pablo picasso", "a painting in the style of salvador dali",
            "a painting in the style of leonardo da vinci", "a painting in the style of vincent van gogh",
            "a painting in the style of katsushika hokusai", "a watercolor painting of a landscape",
            "an oil painting of a still life", "a pencil drawing of a house", "a photo of a city street",
            "a photo of a landscape", "a photo of a person", "a photo of a cat", "a photo of a house",
        ),
        anchor="art",
        forget=("a painting in the style of {}", "a portrait in the style of {}", "a landscape in the style of {}",
                "art by {}"),
        article="never",
    ),
    # SalUn's NSFW set: forget "a photo of a nude person", retain and pseudo prompt "a photo of a person wearing
    # clothes"; FIA/ConceptPrune contrast "a photo of a naked {person}" with "a photo of a {person}".
    "nudity": ConceptType(
        "nudity",
        help="nudity / NSFW: keeps clothed people, portraits and swimwear scenes; anchor 'a person wearing clothes'",
        why="clothed people of every kind, portraits and beach or swimwear scenes (SalUn's retain prompt, FIA's "
            "and ConceptPrune's person prompts) keep people and skin drawable while nudity goes to a clothed "
            "person, SalUn's pseudo prompt; classical nude sculpture is left out, as preserving it would keep nudity",
        preserve=(
            "a photo of a person wearing clothes", "a photo of a man", "a photo of a woman", "a photo of a girl",
            "a photo of a boy", "a photo of a couple", "a photo of a group of friends", "a photo of a doctor",
            "a photo of a teacher", "a portrait of a woman", "a portrait of a man",
            "a woman in a swimsuit on the beach", "a man in swim trunks on the beach", "people at a swimming pool",
            "a fashion photo of a model in a dress", "a mother holding her baby",
        ),
        anchor="a person wearing clothes",
    ),
    # ESD's issue rohitgandikota/erasing#13: erasing one celebrity also erased others, so other people are the retain set;
    # ConceptPrune's person prompts are headshots.
    "person": ConceptType(
        "person",
        help="a named person (a celebrity, a politician): keeps other people and portraits; anchor 'a person'",
        why="other people, portraits and headshots (ConceptPrune's headshot prompts; ESD's users saw other "
            "celebrities erased along with one) keep faces and people working while the person goes to "
            "'a person'",
        preserve=(
            "a photo of a man", "a photo of a woman", "a portrait of an old man", "a portrait of a young woman",
            "a headshot of a man", "a headshot of a woman", "a photo of a child", "a photo of a group of friends",
            "a photo of an actor on the red carpet", "a photo of a politician giving a speech",
            "a photo of a singer on stage", "a photo of an athlete",
        ),
        anchor="a person",
        forget=("a portrait of {}", "a headshot of {}", "{} smiling"),
        article="never",
    ),
}


def concept_type_of(name: str) -> ConceptType:
    """The ConceptType of a name as a user may write it ('art style', 'Art-Style', 'art_style')."""
    key = " ".join(name.replace("-", " ").replace("_", " ").lower().split()) if isinstance(name, str) else None
    if key not in CONCEPT_TYPES:
        raise ConceptError(f"unknown concept type {name!r}; choose one of {', '.join(map(repr, CONCEPT_TYPES))}")
    return CONCEPT_TYPES[key]


def _lines(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A multiline string (one entry a line) or a list of strings -> the non-blank entries."""
    if value is None:
        return ()
    items = value.splitlines() if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str):
            raise ConceptError(f"expected text, got {type(item).__name__}: {item!r}")
    return tuple(item for item in items if item.strip())


@dataclass(frozen=True)
class ConceptSpec:
    """One concept as the user gave it. `preserve` and `parts` take a list or a multiline string (one a line).

    parts:  None or empty = derive them from the text by the mode's rule; otherwise these parts are used as given.
    anchor: None = the mode's default (or the concept type's); any string (also "" = the unconditional prompt)
            overrides it.
    concept_type: a name in CONCEPT_TYPES; its preserve prompts are added to `preserve` (last: positional specs
            written before it keep their meaning).
    """

    text: str
    mode: str = "individual"
    preserve: tuple[str, ...] = ()
    parts: tuple[str, ...] | None = None
    anchor: str | None = None
    concept_type: str = NO_CONCEPT_TYPE

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ConceptError(f"the concept must be text, got {type(self.text).__name__}; {_EMPTY_CONCEPT}")
        object.__setattr__(self, "preserve", _lines(self.preserve))
        object.__setattr__(self, "parts", _lines(self.parts) or None)


@dataclass(frozen=True)
class ExpandedConcept:
    """Everything the engine trains on for one concept. All tuples are in a fixed order without duplicates."""

    text: str  # the concept, whitespace-normalised (and lower-cased by default)
    mode: str
    forget: tuple[str, ...]  # the concept in several prompt forms; the first is the text itself
    preserve: tuple[str, ...]  # each part in the same forms, then the user's preserve prompts; no forget prompt
    anchor: str  # what the forget prompts are pulled towards; "" = the unconditional prompt
    parts: tuple[str, ...]
    notes: tuple[str, ...] = ()  # how parts and anchor were derived, one sentence each
    concept_type: str = NO_CONCEPT_TYPE
    type_prompts: tuple[str, ...] = ()  # the prompts the concept type added (forget, preserve and anchor)

    def explain(self) -> str:
        """A human-readable account of how this concept was expanded."""
        lines = [f"{self.text!r} ({self.mode}):", *(f"  {note}" for note in self.notes)]
        lines.append(f"  Forget ({len(self.forget)}): " + ", ".join(map(repr, self.forget)))
        lines.append(f"  Preserve ({len(self.preserve)}): " + (", ".join(map(repr, self.preserve)) or "none"))
        return "\n".join(lines)


@dataclass(frozen=True)
class MergedConcepts:
    """Several concepts of one run seen as one: what a multi-concept erasure trains on."""

    concepts: tuple[ExpandedConcept, ...]
    forget: tuple[str, ...]  # every concept's forget prompts, in concept order, without duplicates
    # every concept's preserve prompts minus any prompt that is also a forget prompt, and minus a concept type's
    # prompts that name another concept of the run
    preserve: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]  # (forget prompt, its concept's anchor); a shared prompt keeps the first

    def explain(self) -> str:
        """Each concept's explanation, then the merged totals."""
        dropped = {p for c in self.concepts for p in c.preserve} - set(self.preserve)
        erased = dropped & set(self.forget)
        tail = f"Merged: {len(self.forget)} forget prompts, {len(self.preserve)} preserve prompts"
        if erased:
            tail += f" (not preserved because another concept erases them: {', '.join(map(repr, sorted(erased)))})"
        if dropped - erased:
            named = ", ".join(map(repr, sorted(dropped - erased)))
            tail += f" (concept-type prompts not preserved because they name a concept of this run: {named})"
        return "\n".join([*(c.explain() for c in self.concepts), tail])


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _normalise(text: str, config: ExpandConfig) -> str:
    """Collapse whitespace and drop trailing sentence punctuation; the user's words are kept."""
    text = " ".join(text.split()).rstrip(".,;:!?").rstrip()
    return text.lower() if config.lowercase else text


def _indefinite_article(word: str) -> str:
    """'a' or 'an' by how the word is spoken, with the common English exceptions to the vowel-letter rule."""
    w = word.lower()
    if w.startswith(("hour", "honest", "honor", "honour", "heir")):
        return "an"
    if w.startswith(("uni", "use", "usu", "uti", "eu", "one", "once", "ewe")):
        return "a"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


def _looks_plural(word: str) -> bool:
    return len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is"))


def _looks_uncountable(word: str, suffixes: Sequence[str]) -> bool:
    return any(word.endswith(s) and len(word) >= len(s) + 3 for s in suffixes)


def with_article(text: str, config: ExpandConfig = DEFAULT_CONFIG) -> str:
    """The text as a noun phrase: 'triangle' -> 'a triangle', 'orange object' -> 'an orange object'.

    Text that starts with a determiner ('the table', 'two cats') is kept; with article='auto' so is text whose last
    word looks plural ('cats') or uncountable ('nudity').
    """
    words = text.split()
    if not words or config.article == "never":
        return text
    first, last = words[0].lower(), words[-1].lower()
    if first in config.determiners or first.isdigit():
        return text
    if config.article == "auto" and (_looks_plural(last) or _looks_uncountable(last, config.uncountable_suffixes)):
        return text
    return f"{_indefinite_article(first)} {text}"


def _forms(text: str, phrase: str, config: ExpandConfig) -> tuple[str, ...]:
    """The text itself, then as a noun phrase, then the noun phrase in every frame."""
    return _unique([text, phrase, *(frame.format(phrase) for frame in config.frames)])


def prompt_forms(text: str, config: ExpandConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    """The prompt forms of one text: 'triangle' -> 'triangle', 'a triangle', 'a photo of a triangle', ..."""
    return _forms(text, with_article(text, config), config)


@dataclass(frozen=True)
class _Parsed:
    phrase: str  # the whole concept as a noun phrase (articles added per side for conditional concepts)
    parts: tuple[str, ...]
    anchor: str
    notes: tuple[str, ...]


def _parse_combination(text: str, config: ExpandConfig) -> _Parsed:
    words = text.split()
    core = words[1:] if len(words) > 1 and words[0].lower() in config.determiners else words
    if len(core) < 2:
        raise ConceptError(f"{text!r} has no attribute to combine; use mode individual, or write e.g. 'red circle'")
    noun, attributes = core[-1], " ".join(core[:-1])
    noun_part = with_article(noun, config)
    attribute_part = with_article(f"{attributes} {config.generic_noun}", config)
    return _Parsed(
        phrase=with_article(text, config),
        parts=(noun_part, attribute_part),
        anchor=noun_part,
        notes=(
            f"The last word {noun!r} is the noun; the words before it ({attributes!r}) are attributes.",
            f"Parts: {noun_part!r} (the noun alone) and {attribute_part!r} (the attributes on the generic noun "
            f"{config.generic_noun!r}); preserving them keeps {noun!r} with other attributes and {attributes!r} "
            "on other things while the combination is erased.",
        ),
    )


def _split_at_relation(words: list[str], config: ExpandConfig) -> tuple[list[str], list[str], list[str]] | None:
    """The words before, of and after the first relation phrase (longest phrase first at one position)."""
    relations = sorted({tuple(r.lower().split()) for r in config.relations if r.strip()}, key=len, reverse=True)
    lower = [w.lower() for w in words]
    for i in range(len(words)):
        for rel in relations:
            if tuple(lower[i : i + len(rel)]) == rel:
                return words[:i], words[i : i + len(rel)], words[i + len(rel) :]
    return None


def _parse_conditional(text: str, config: ExpandConfig) -> _Parsed:
    split = _split_at_relation(text.split(), config)
    if split is None:
        raise ConceptError(
            f"{text!r} has no relation phrase to split at; recognised phrases: {', '.join(config.relations)}. "
            "Write e.g. 'a cat on the table', or use mode individual"
        )
    left, rel_words, right = split
    relation = " ".join(rel_words)
    if not left or not right:
        side = "before" if not left else "after"
        raise ConceptError(
            f"{text!r} has nothing {side} {relation!r}; a conditional concept needs a thing on each side of the "
            "relation, e.g. 'a cat on the table'"
        )
    x, y = with_article(" ".join(left), config), with_article(" ".join(right), config)
    side_by_side = relation.lower() in {r.lower() for r in config.side_by_side_relations}
    other = config.side_by_side_other if side_by_side else config.other_relation
    both = f"{x} {other} {y}"
    return _Parsed(
        phrase=f"{x} {relation} {y}",
        parts=(x, y, both),
        anchor=both,
        notes=(
            f"Split at the first relation phrase {relation!r}: {x!r} | {y!r}.",
            f"Parts: {x!r} and {y!r} (each side alone) and {both!r} (the two in another relation, {other!r}); "
            f"preserving them keeps both things, and keeps them together, while {relation!r} is erased.",
        ),
    )


def _contains(prompt: str, text: str, config: ExpandConfig) -> bool:
    """Whether the prompt names the concept: its words without a leading determiner, in a row, in the prompt."""
    words = text.lower().split()
    if len(words) > 1 and words[0] in config.determiners:
        words = words[1:]
    have = [w.strip(".,;:!?'\"()") for w in prompt.lower().split()]
    return any(have[i : i + len(words)] == words for i in range(len(have) - len(words) + 1))


def expand(
    concept: str | ConceptSpec,
    mode: str = "individual",
    *,
    preserve: str | Iterable[str] = (),
    parts: str | Iterable[str] | None = None,
    anchor: str | None = None,
    config: ExpandConfig | None = None,
    concept_type: str = NO_CONCEPT_TYPE,
) -> ExpandedConcept:
    """Expand one concept into forget prompts, preserve prompts and an anchor (see the module docstring).

    `concept` is the text as typed, or a ConceptSpec (then leave mode/preserve/parts/anchor/concept_type at their
    defaults). `concept_type`: a name in CONCEPT_TYPES, whose prompts are added (see ConceptType).
    Raises ConceptError with a message that says what to type instead.
    """
    config = config or DEFAULT_CONFIG
    if isinstance(concept, ConceptSpec):
        if (mode, tuple(preserve), parts, anchor, concept_type) != ("individual", (), None, None, NO_CONCEPT_TYPE):
            raise ConceptError("pass either a ConceptSpec or mode/preserve/parts/anchor/concept_type, not both")
        spec = concept
    else:
        spec = ConceptSpec(concept, mode, preserve, parts, anchor, concept_type)  # type: ignore[arg-type]

    kind = concept_type_of(spec.concept_type)
    if kind.article:
        config = replace(config, article=kind.article)
    text = _normalise(spec.text, config)
    if not text:
        raise ConceptError(_EMPTY_CONCEPT)
    mode_name = spec.mode.strip().lower() if isinstance(spec.mode, str) else spec.mode
    if mode_name not in MODES:
        raise ConceptError(f"unknown mode {spec.mode!r}; valid modes: {', '.join(MODES)}")

    user_parts = _unique(p for p in (_normalise(p, config) for p in spec.parts or ()) if p)
    parsed: _Parsed | None
    if mode_name == "individual":
        parsed = _Parsed(with_article(text, config), (), "", ("Erased as one concept; no parts are derived.",))
    else:
        parse = _parse_combination if mode_name == "combination" else _parse_conditional
        try:
            parsed = parse(text, config)
        except ConceptError:
            if not user_parts:
                raise
            parsed = None  # the user named the parts, so the text need not parse; only the default anchor is lost

    notes: list[str] = []
    if user_parts:
        found = parsed.parts if parsed else ()
        derived = f" (instead of the derived {', '.join(map(repr, found))})" if found else ""
        notes.append(f"Parts marked by the user: {', '.join(map(repr, user_parts))}{derived}.")
        final_parts = user_parts
    else:
        assert parsed is not None
        notes.extend(parsed.notes)
        final_parts = parsed.parts

    own_forget = _forms(text, parsed.phrase if parsed else with_article(text, config), config)
    type_forget = tuple(p for p in _unique(_normalise(t.format(text), config) for t in kind.forget)
                        if p not in own_forget)
    forget = own_forget + type_forget
    typed = f"concept type {kind.name!r}"
    if kind.name != NO_CONCEPT_TYPE:
        notes.append(f"{typed.capitalize()}: {kind.why}.")
    if type_forget:
        notes.append(f"{typed.capitalize()} added forget prompts: {', '.join(map(repr, type_forget))}.")

    # the type's anchor replaces only an individual concept's "": the other modes derive a closer one themselves
    type_anchor = _normalise(kind.anchor, config) if kind.anchor is not None and mode_name == "individual" else None
    anchor_from_type = spec.anchor is None and type_anchor is not None and type_anchor not in forget
    if spec.anchor is not None:
        final_anchor = _normalise(spec.anchor, config)
        overridden = f" (instead of {type_anchor!r} from {typed})" if type_anchor is not None else ""
        notes.append(f"Anchor: {final_anchor!r}, set by the user{overridden}.")
    elif anchor_from_type:
        final_anchor = type_anchor or ""
        notes.append(f"Anchor: {final_anchor!r}, from {typed}.")
    elif parsed is not None:
        final_anchor = parsed.anchor
        why = {
            "individual": "the unconditional prompt, i.e. empty text",
            "combination": "the noun alone",
            "conditional": "the two sides in another relation",
        }[mode_name]
        clash = f"; {type_anchor!r} from {typed} is the concept itself" if type_anchor is not None else ""
        notes.append(f"Anchor: {final_anchor!r} ({why}{clash}).")
    else:
        final_anchor = ""
        notes.append(f"Anchor: '' (the unconditional prompt), since {text!r} does not parse as {mode_name}.")

    if final_anchor in forget:
        raise ConceptError(
            f"the anchor {final_anchor!r} is one of the forget prompts of {text!r}; choose what the concept should "
            "become instead, e.g. '' (the unconditional prompt)"
        )
    kept = set(forget)
    type_preserve = [p for p in (_normalise(p, config) for p in kind.preserve) if p not in kept]
    naming = [p for p in type_preserve if _contains(p, text, config)]
    type_preserve = [p for p in type_preserve if p not in naming]
    user_preserve = [p for p in (_normalise(p, config) for p in spec.preserve) if p]
    candidates = [form for part in final_parts for form in prompt_forms(part, config)] + type_preserve + user_preserve
    preserve_prompts = _unique(p for p in candidates if p not in kept)
    if type_preserve:
        dropped = f" (left out, as they name the concept: {', '.join(map(repr, naming))})" if naming else ""
        notes.append(f"{typed.capitalize()} added {len(type_preserve)} preserve prompts: "
                     f"{', '.join(map(repr, _unique(type_preserve)))}{dropped}.")
    if user_preserve:
        notes.append(f"Preserve prompts from the user (used as typed): {', '.join(map(repr, _unique(user_preserve)))}.")
    type_prompts = _unique([*type_forget, *type_preserve, *([final_anchor] if anchor_from_type and final_anchor else [])])
    return ExpandedConcept(text, mode_name, forget, preserve_prompts, final_anchor, final_parts, tuple(notes),
                           kind.name, type_prompts)


def expand_all(
    concepts: str | Iterable[str | ConceptSpec],
    mode: str = "individual",
    *,
    preserve: str | Iterable[str] = (),
    config: ExpandConfig | None = None,
    concept_type: str = NO_CONCEPT_TYPE,
) -> list[ExpandedConcept]:
    """Expand several concepts of one run: a multiline string (one concept a line, blank lines ignored) or a list.

    Plain-text concepts take `mode` and `concept_type`; ConceptSpecs keep their own. `preserve` is added to every
    concept. A concept repeated with the same mode and type is expanded once.
    """
    config = config or DEFAULT_CONFIG
    items = _lines(concepts) if isinstance(concepts, str) else list(concepts)
    run_preserve = _lines(preserve)
    result: list[ExpandedConcept] = []
    seen: set[tuple[str, str, str]] = set()
    for number, item in enumerate(items, start=1):
        if isinstance(item, ConceptSpec):
            spec = ConceptSpec(item.text, item.mode, item.preserve + run_preserve, item.parts, item.anchor,
                               item.concept_type)
        else:
            spec = ConceptSpec(item, mode, run_preserve, concept_type=concept_type)
        try:
            expanded = expand(spec, config=config)
        except ConceptError as error:
            if len(items) == 1:
                raise
            raise ConceptError(f"concept {number} of {len(items)} ({spec.text.strip()!r}): {error}") from error
        if (expanded.text, expanded.mode, expanded.concept_type) not in seen:
            seen.add((expanded.text, expanded.mode, expanded.concept_type))
            result.append(expanded)
    if not result:
        raise ConceptError(_EMPTY_CONCEPT)
    return result


def merge(concepts: Iterable[ExpandedConcept]) -> MergedConcepts:
    """One view of several expanded concepts: all forget prompts; all preserve prompts that no concept erases (nor,
    for a concept type's prompts, names: 'monet' is not kept through 'a painting in the style of claude monet')."""
    concepts = tuple(concepts)
    if not concepts:
        raise ConceptError(_EMPTY_CONCEPT)
    anchor_of: dict[str, str] = {}
    for c in concepts:
        for prompt in c.forget:
            anchor_of.setdefault(prompt, c.anchor)  # a prompt two concepts share is pulled to the first one's anchor
    pairs = tuple(anchor_of.items())
    forget = _unique(p for c in concepts for p in c.forget)
    erased = set(forget)
    texts = [c.text for c in concepts]
    preserve = _unique(p for c in concepts for p in c.preserve if p not in erased and not (
        p in c.type_prompts and any(_contains(p, text, DEFAULT_CONFIG) for text in texts)))
    return MergedConcepts(concepts, forget, preserve, pairs)


def check_concept_types(concepts: Iterable[ExpandedConcept], check_prompt: Callable[[str], object]) -> None:
    """Every prompt a concept type added, through a model's vocabulary check (DiffusionParts.check_prompt, e.g. the
    bundled testbed's), before any work. The types are written for real checkpoints, so on a closed vocabulary the
    error names the type and what to do, not only the unknown word."""
    for concept in concepts:
        for prompt in concept.type_prompts:
            try:
                check_prompt(prompt)
            except ValueError as error:
                raise ConceptError(
                    f"concept type {concept.concept_type!r} adds prompts written for real checkpoints, and this "
                    f"model cannot read {prompt!r}: use concept type 'none' with it and type preserve prompts it "
                    f"knows ({error})"
                ) from error
