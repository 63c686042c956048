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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MODES = ("individual", "combination", "conditional")

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
    anchor: None = the mode's default; any string (also "" = the unconditional prompt) overrides it.
    """

    text: str
    mode: str = "individual"
    preserve: tuple[str, ...] = ()
    parts: tuple[str, ...] | None = None
    anchor: str | None = None

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
    preserve: tuple[str, ...]  # every concept's preserve prompts minus any prompt that is also a forget prompt
    pairs: tuple[tuple[str, str], ...]  # (forget prompt, its concept's anchor); a shared prompt keeps the first

    def explain(self) -> str:
        """Each concept's explanation, then the merged totals."""
        dropped = {p for c in self.concepts for p in c.preserve} & set(self.forget)
        tail = f"Merged: {len(self.forget)} forget prompts, {len(self.preserve)} preserve prompts"
        if dropped:
            names = ", ".join(map(repr, sorted(dropped)))
            tail += f" (not preserved because another concept erases them: {names})"
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


def expand(
    concept: str | ConceptSpec,
    mode: str = "individual",
    *,
    preserve: str | Iterable[str] = (),
    parts: str | Iterable[str] | None = None,
    anchor: str | None = None,
    config: ExpandConfig | None = None,
) -> ExpandedConcept:
    """Expand one concept into forget prompts, preserve prompts and an anchor (see the module docstring).

    `concept` is the text as typed, or a ConceptSpec (then leave mode/preserve/parts/anchor at their defaults).
    Raises ConceptError with a message that says what to type instead.
    """
    config = config or DEFAULT_CONFIG
    if isinstance(concept, ConceptSpec):
        if (mode, tuple(preserve), parts, anchor) != ("individual", (), None, None):
            raise ConceptError("pass either a ConceptSpec or mode/preserve/parts/anchor, not both")
        spec = concept
    else:
        spec = ConceptSpec(concept, mode, preserve, parts, anchor)  # type: ignore[arg-type]  # normalised there

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

    if spec.anchor is not None:
        final_anchor = _normalise(spec.anchor, config)
        notes.append(f"Anchor: {final_anchor!r}, set by the user.")
    elif parsed is not None:
        final_anchor = parsed.anchor
        why = {
            "individual": "the unconditional prompt, i.e. empty text",
            "combination": "the noun alone",
            "conditional": "the two sides in another relation",
        }[mode_name]
        notes.append(f"Anchor: {final_anchor!r} ({why}).")
    else:
        final_anchor = ""
        notes.append(f"Anchor: '' (the unconditional prompt), since {text!r} does not parse as {mode_name}.")

    forget = _forms(text, parsed.phrase if parsed else with_article(text, config), config)
    if final_anchor in forget:
        raise ConceptError(
            f"the anchor {final_anchor!r} is one of the forget prompts of {text!r}; choose what the concept should "
            "become instead, e.g. '' (the unconditional prompt)"
        )
    user_preserve = [p for p in (_normalise(p, config) for p in spec.preserve) if p]
    candidates = [form for part in final_parts for form in prompt_forms(part, config)] + user_preserve
    kept = set(forget)
    preserve_prompts = _unique(p for p in candidates if p not in kept)
    if user_preserve:
        notes.append(f"Preserve prompts from the user (used as typed): {', '.join(map(repr, _unique(user_preserve)))}.")
    return ExpandedConcept(text, mode_name, forget, preserve_prompts, final_anchor, final_parts, tuple(notes))


def expand_all(
    concepts: str | Iterable[str | ConceptSpec],
    mode: str = "individual",
    *,
    preserve: str | Iterable[str] = (),
    config: ExpandConfig | None = None,
) -> list[ExpandedConcept]:
    """Expand several concepts of one run: a multiline string (one concept a line, blank lines ignored) or a list.

    Plain-text concepts take `mode`; ConceptSpecs keep their own. `preserve` is added to every concept. A concept
    repeated with the same mode is expanded once.
    """
    config = config or DEFAULT_CONFIG
    items = _lines(concepts) if isinstance(concepts, str) else list(concepts)
    run_preserve = _lines(preserve)
    result: list[ExpandedConcept] = []
    seen: set[tuple[str, str]] = set()
    for number, item in enumerate(items, start=1):
        if isinstance(item, ConceptSpec):
            spec = ConceptSpec(item.text, item.mode, item.preserve + run_preserve, item.parts, item.anchor)
        else:
            spec = ConceptSpec(item, mode, run_preserve)
        try:
            expanded = expand(spec, config=config)
        except ConceptError as error:
            if len(items) == 1:
                raise
            raise ConceptError(f"concept {number} of {len(items)} ({spec.text.strip()!r}): {error}") from error
        if (expanded.text, expanded.mode) not in seen:
            seen.add((expanded.text, expanded.mode))
            result.append(expanded)
    if not result:
        raise ConceptError(_EMPTY_CONCEPT)
    return result


def merge(concepts: Iterable[ExpandedConcept]) -> MergedConcepts:
    """One view of several expanded concepts: all forget prompts; all preserve prompts that no concept erases."""
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
    preserve = _unique(p for c in concepts for p in c.preserve if p not in erased)
    return MergedConcepts(concepts, forget, preserve, pairs)
