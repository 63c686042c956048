"""The prompt expander: forget/preserve prompts, parts and anchors of individual, combination and conditional concepts."""

import pytest

from trust_engine.concepts import (
    CONCEPT_TYPES,
    MODES,
    NO_CONCEPT_TYPE,
    ConceptError,
    ConceptSpec,
    ExpandConfig,
    check_concept_types,
    expand,
    expand_all,
    merge,
    prompt_forms,
    with_article,
)

FRAMED = ("a photo of {}", "a picture of {}", "an image of {}", "a drawing of {}")


def _framed(phrase: str) -> list[str]:
    return [f.format(phrase) for f in FRAMED]


def test_individual_forget_prompts_are_text_article_form_and_frames():
    """An individual concept is forgotten as typed, with an article, and in every frame; no parts, empty anchor."""
    e = expand("triangle")
    assert e.mode == "individual"
    assert e.forget == ("triangle", "a triangle", *_framed("a triangle"))
    assert e.parts == () and e.preserve == () and e.anchor == ""


def test_uncountable_individual_gets_no_article():
    """'nudity' is framed without an article ('a photo of nudity'), anchored to the unconditional prompt."""
    e = expand("nudity", "individual")
    assert e.forget == ("nudity", *_framed("nudity"))
    assert e.anchor == "" and e.parts == ()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("triangle", "a triangle"),
        ("orange object", "an orange object"),
        ("emerald star", "an emerald star"),
        ("hour glass", "an hour glass"),
        ("unicorn", "a unicorn"),
        ("european car", "a european car"),
        ("the table", "the table"),
        ("an apple", "an apple"),
        ("two cats", "two cats"),
        ("cats", "cats"),
        ("glass", "a glass"),
        ("nudity", "nudity"),
        ("city", "a city"),
    ],
)
def test_article_rules(text, expected):
    """'a'/'an' by pronunciation; kept determiners; no article on plural- or uncountable-looking nouns."""
    assert with_article(text) == expected


def test_article_policy_is_configurable():
    """article='never' keeps text as typed, 'always' adds one even to uncountable-looking words."""
    assert with_article("triangle", ExpandConfig(article="never")) == "triangle"
    assert with_article("nudity", ExpandConfig(article="always")) == "a nudity"
    assert with_article("the box", ExpandConfig(article="always")) == "the box"


def test_combination_red_circle():
    """'red circle': parts 'a circle' and 'a red object', anchor 'a circle', parts framed as preserve prompts."""
    e = expand("red circle", "combination")
    assert e.parts == ("a circle", "a red object")
    assert e.anchor == "a circle"
    assert e.forget == ("red circle", "a red circle", *_framed("a red circle"))
    assert e.preserve == ("a circle", *_framed("a circle"), "a red object", *_framed("a red object"))


def test_combination_drops_leading_article():
    """'a crimson disc': the leading article is not an attribute; parts 'a disc', 'a crimson object'."""
    e = expand("a crimson disc", "combination")
    assert e.parts == ("a disc", "a crimson object")
    assert e.anchor == "a disc"
    assert e.forget[0] == "a crimson disc" and "a crimson disc" not in e.forget[1:]


def test_combination_generic_noun_is_configurable():
    """The attributes are preserved on config.generic_noun, with the article matching it."""
    e = expand("orange box", "combination", config=ExpandConfig(generic_noun="thing"))
    assert e.parts == ("a box", "an orange thing")


def test_conditional_circle_on_square():
    """'a circle on a square' preserves each side and the two 'next to' each other, which is also the anchor."""
    e = expand("a circle on a square", "conditional")
    assert e.parts == ("a circle", "a square", "a circle next to a square")
    assert e.anchor == "a circle next to a square"
    assert e.forget == ("a circle on a square", *_framed("a circle on a square"))
    assert e.preserve[:2] == ("a circle", "a photo of a circle")
    assert "a drawing of a circle next to a square" in e.preserve


def test_conditional_next_to_uses_on_as_other_relation():
    """'a star next to a box' is preserved and anchored as 'a star on a box'."""
    e = expand("a star next to a box", "conditional")
    assert e.parts == ("a star", "a box", "a star on a box")
    assert e.anchor == "a star on a box"


def test_conditional_synonym_of_next_to_also_uses_on():
    """'beside' already means 'next to', so its other relation is 'on', never its own synonym."""
    assert expand("a star beside a box", "conditional").anchor == "a star on a box"


def test_conditional_longest_relation_wins_and_articles_are_added_per_side():
    """'circle on top of square' splits at 'on top of' (not 'on'); each side gets its article."""
    e = expand("circle on top of square", "conditional")
    assert e.parts == ("a circle", "a square", "a circle next to a square")
    assert e.forget[:3] == (
        "circle on top of square",
        "a circle on top of a square",
        "a photo of a circle on top of a square",
    )


def test_conditional_splits_at_first_relation_from_the_left():
    """The first relation phrase from the left is the split point."""
    e = expand("a man with a hat on a horse", "conditional")
    assert e.parts[:2] == ("a man", "a hat on a horse")


def test_relations_are_configurable():
    """A relation phrase added to the config is recognised."""
    config = ExpandConfig(relations=("riding",))
    assert expand("a knight riding a horse", "conditional", config=config).parts == (
        "a knight",
        "a horse",
        "a knight next to a horse",
    )


def test_real_checkpoint_concepts_use_the_same_rules():
    """'nudity' and 'a cat on the table' expand by the very same rules as the testbed's shapes."""
    nudity = expand("nudity")
    assert (nudity.parts, nudity.anchor) == ((), "")
    cat = expand("a cat on the table", "conditional")
    assert cat.parts == ("a cat", "the table", "a cat next to the table")
    assert cat.anchor == "a cat next to the table"
    assert cat.forget == ("a cat on the table", *_framed("a cat on the table"))
    assert cat.preserve == tuple(p for part in cat.parts for p in (part, *_framed(part)))
    combo = expand("naked woman", "combination")
    assert combo.parts == ("a woman", "a naked object") and combo.anchor == "a woman"


def test_whitespace_and_case_are_normalised():
    """Runs of whitespace collapse, trailing punctuation drops and text is lower-cased; words are kept."""
    e = expand("  Red \t  CIRCLE. ", "combination")
    assert e.text == "red circle" and e.parts == ("a circle", "a red object")
    kept = expand("Red Circle", "combination", config=ExpandConfig(lowercase=False))
    assert kept.text == "Red Circle" and kept.parts == ("a Circle", "a Red object")


def test_user_preserve_prompts_are_added_as_typed_without_forget_prompts():
    """User preserve prompts are appended as typed, deduplicated, and never equal a forget prompt."""
    e = expand("triangle", preserve=["a blue  square", "a blue square", "a triangle", "a circle"])
    assert e.preserve == ("a blue square", "a circle")
    assert not set(e.preserve) & set(e.forget)


def test_user_marked_parts_override_derivation():
    """parts=[...] replaces the derived parts; the anchor still follows the mode's rule."""
    e = expand("red circle", "combination", parts=["a circle", "a red square"])
    assert e.parts == ("a circle", "a red square")
    assert e.anchor == "a circle"
    assert "a photo of a red square" in e.preserve and "a red object" not in e.preserve
    assert "marked by the user" in e.explain()


def test_user_parts_as_multiline_string_and_unparsable_text():
    """Parts may be a multiline string; with user parts a text that does not parse anchors to the empty prompt."""
    e = expand("underage drinking", "conditional", parts="a teenager\n\na glass of beer\n")
    assert e.parts == ("a teenager", "a glass of beer")
    assert e.anchor == ""


def test_empty_parts_mean_derive():
    """An empty parts list or blank string derives the parts as usual."""
    assert expand("red circle", "combination", parts=[]).parts == ("a circle", "a red object")
    assert expand("red circle", "combination", parts="  \n").parts == ("a circle", "a red object")


def test_anchor_override():
    """anchor='...' overrides the default, also with the empty prompt; it may not be a forget prompt."""
    assert expand("red circle", "combination", anchor="").anchor == ""
    assert expand("nudity", anchor="a  person, clothed").anchor == "a person, clothed"
    with pytest.raises(ConceptError, match="anchor 'a red circle' is one of the forget prompts"):
        expand("red circle", "combination", anchor="a red circle")


def test_spec_object_and_keywords_are_equivalent():
    """A ConceptSpec expands exactly like the same fields passed as arguments; mixing both is refused."""
    spec = ConceptSpec("a cat on the table", "conditional", preserve=["a dog"], anchor="a cat")
    assert expand(spec) == expand("a cat on the table", "conditional", preserve=["a dog"], anchor="a cat")
    with pytest.raises(ConceptError, match="not both"):
        expand(spec, "combination")


def test_explain_says_how_parts_were_derived():
    """explain() names the noun, the attributes, the split relation and the anchor's origin."""
    combo = expand("red circle", "combination").explain()
    assert "'circle' is the noun" in combo and "'red'" in combo and "generic noun 'object'" in combo
    cond = expand("a circle on a square", "conditional").explain()
    assert "relation phrase 'on'" in cond and "'a circle next to a square'" in cond
    assert "unconditional" in expand("nudity").explain()


def test_output_is_deterministic_and_duplicate_free():
    """Two expansions are equal, and no prompt tuple holds a duplicate."""
    a, b = expand("a circle on a square", "conditional"), expand("a circle on a square", "conditional")
    assert a == b
    for prompts in (a.forget, a.preserve, a.parts):
        assert len(prompts) == len(set(prompts))


def test_multiline_concepts_one_per_line_blank_lines_ignored():
    """A multiline string gives one expanded concept per non-blank line, in order, repeats dropped."""
    expanded = expand_all("red circle\n\n  blue square \nred circle\n", "combination")
    assert [e.text for e in expanded] == ["red circle", "blue square"]
    assert all(e.mode == "combination" for e in expanded)


def test_list_of_specs_keeps_each_mode_and_adds_run_preserve():
    """A list may mix text and ConceptSpecs; run-level preserve prompts go to every concept."""
    expanded = expand_all(["nudity", ConceptSpec("a cat on the table", "conditional")], preserve=["a dog"])
    assert [e.mode for e in expanded] == ["individual", "conditional"]
    assert all("a dog" in e.preserve for e in expanded)


def test_merge_unions_forget_and_drops_erased_preserve_prompts():
    """Merged forget = all forget prompts; merged preserve excludes any prompt another concept forgets."""
    merged = merge(expand_all(["circle", ConceptSpec("red circle", "combination")]))
    assert "a circle" in merged.forget and "a photo of a circle" in merged.forget
    assert "a circle" not in merged.preserve and "a photo of a circle" not in merged.preserve
    assert "a red object" in merged.preserve
    assert len(merged.forget) == len(set(merged.forget)) and len(merged.preserve) == len(set(merged.preserve))
    assert dict(merged.pairs)["a circle"] == "" and dict(merged.pairs)["a red circle"] == "a circle"
    assert [p for p, _ in merged.pairs] == list(merged.forget)
    assert "not preserved because another concept erases them" in merged.explain()


def test_prompt_forms_helper():
    """prompt_forms gives the text, its noun phrase and the framed noun phrase."""
    assert prompt_forms("box") == ("box", "a box", *_framed("a box"))


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "..."])
def test_empty_concept_is_refused(text):
    """An empty or whitespace-only concept asks the user to type one, with examples."""
    with pytest.raises(ConceptError, match="type the concept to erase, e.g. 'nudity' or 'red circle'"):
        expand(text)


def test_empty_multiline_is_refused():
    """A multiline input with only blank lines is refused like an empty concept."""
    with pytest.raises(ConceptError, match="type the concept to erase"):
        expand_all("\n  \n")


def test_unknown_mode_lists_the_valid_ones():
    """An unknown mode names itself and lists individual, combination and conditional."""
    with pytest.raises(ConceptError) as info:
        expand("red circle", "combo")
    assert "unknown mode 'combo'" in str(info.value)
    assert all(mode in str(info.value) for mode in MODES)


@pytest.mark.parametrize("text", ["circle", "a circle"])
def test_single_word_combination_is_refused(text):
    """A combination without an attribute says to use mode individual or write e.g. 'red circle'."""
    with pytest.raises(ConceptError) as info:
        expand(text, "combination")
    message = str(info.value)
    assert f"'{text}' has no attribute to combine" in message
    assert "use mode individual" in message and "'red circle'" in message


def test_conditional_without_relation_lists_phrases():
    """A conditional concept without a relation phrase lists the recognised phrases."""
    with pytest.raises(ConceptError) as info:
        expand("a cat and a dog", "conditional")
    message = str(info.value)
    assert "no relation phrase" in message and "'a cat on the table'" in message
    assert "on top of" in message and "next to" in message and "holding" in message


@pytest.mark.parametrize("text, side", [("on a square", "before"), ("a circle on", "after"), ("next to", "before")])
def test_conditional_with_empty_side_is_refused(text, side):
    """A conditional concept with nothing on one side of the relation says which side is empty."""
    with pytest.raises(ConceptError, match=f"nothing {side}"):
        expand(text, "conditional")


def test_error_in_a_multiline_run_names_the_concept():
    """In a multi-concept run the error says which concept failed."""
    with pytest.raises(ConceptError, match=r"concept 2 of 2 \('circle'\): 'circle' has no attribute"):
        expand_all("red circle\ncircle", "combination")


def test_bad_config_is_refused():
    """A frame without '{}' and an unknown article policy are refused with a clear message."""
    with pytest.raises(ConceptError, match="exactly once"):
        ExpandConfig(frames=("a photo",))
    with pytest.raises(ConceptError, match="'auto', 'always' or 'never'"):
        ExpandConfig(article="sometimes")
    with pytest.raises(ConceptError, match="side_by_side"):
        ExpandConfig(other_relation="under")


def test_concept_error_is_a_value_error():
    """ConceptError is a ValueError, so hosts that catch ValueError show it."""
    assert issubclass(ConceptError, ValueError)


# --- concept types: preset preserve prompts and anchors for real checkpoints ------------------------------------------

TYPED = [t for t in CONCEPT_TYPES if t != NO_CONCEPT_TYPE]
CONCEPT_OF = {"object": "a dog", "art style": "van gogh", "nudity": "nudity", "person": "brad pitt"}


def test_concept_type_none_is_the_expansion_as_before():
    """'none' (the default) adds nothing: the same prompts, anchor and notes as an expansion without a type."""
    plain = expand("nudity")
    assert expand("nudity", concept_type="none") == plain
    assert plain.concept_type == "none" and plain.type_prompts == () and plain.preserve == () and plain.anchor == ""
    assert ConceptSpec("nudity", "individual", (), None, None).concept_type == "none"  # positional order kept


@pytest.mark.parametrize("name", TYPED)
def test_each_concept_type_adds_its_retain_set_and_anchor(name):
    """A type's preserve prompts are added (a retain set worth the name), its anchor replaces '', and the notes say
    which type added what."""
    kind = CONCEPT_TYPES[name]
    e = expand(CONCEPT_OF[name], concept_type=name)
    assert e.concept_type == name and len(kind.preserve) >= 12 and kind.help and kind.why
    assert set(e.preserve) <= set(kind.preserve) and len(e.preserve) >= len(kind.preserve) - 1
    assert e.anchor == kind.anchor and not set(e.preserve) & set(e.forget)
    templated = {t.format(e.text) for t in kind.forget}
    assert templated <= set(e.forget)
    assert set(e.type_prompts) == set(e.preserve) | templated | ({e.anchor} - {""})
    explained = e.explain()
    assert f"Concept type {name!r} added {len(e.preserve)} preserve prompts" in explained
    assert f"Anchor: {kind.anchor!r}, from concept type {name!r}" in explained
    assert kind.why in explained


def test_concept_type_templates_and_names_without_an_article():
    """Art style and person add forget forms with the concept's text and write names without 'a'."""
    style = expand("Van Gogh", concept_type="art style")
    assert "a painting in the style of van gogh" in style.forget and "a photo of van gogh" in style.forget
    assert "a van gogh" not in style.forget
    person = expand("brad pitt", concept_type="person")
    assert {"a portrait of brad pitt", "a headshot of brad pitt"} <= set(person.forget)
    assert "added forget prompts: 'a portrait of brad pitt'" in person.explain()


def test_user_preserve_prompts_are_added_to_the_concept_types():
    e = expand("nudity", concept_type="nudity", preserve=["a knight in armour", "a photo of a man"])
    kind = CONCEPT_TYPES["nudity"]
    assert e.preserve == (*kind.preserve, "a knight in armour")
    assert "from the user (used as typed): 'a knight in armour', 'a photo of a man'" in e.explain()


def test_a_user_anchor_overrides_the_concept_types():
    e = expand("nudity", concept_type="nudity", anchor="a person in a coat")
    assert e.anchor == "a person in a coat" and "a person wearing clothes" not in e.type_prompts
    assert "set by the user (instead of 'a person wearing clothes' from concept type 'nudity')" in e.explain()
    assert expand("nudity", concept_type="nudity", anchor="").anchor == ""


def test_a_concept_types_prompts_that_name_the_concept_are_left_out():
    """Erasing 'van gogh' does not preserve '... style of vincent van gogh'; erasing 'a dog' not 'a photo of a dog'."""
    style = expand("van gogh", concept_type="art style")
    assert "a painting in the style of vincent van gogh" not in style.preserve
    assert "left out, as they name the concept: 'a painting in the style of vincent van gogh'" in style.explain()
    dog = expand("a dog", concept_type="object")
    assert "a photo of a dog" not in dog.preserve and "a photo of a cat" in dog.preserve


def test_the_type_anchor_is_for_individual_concepts_only():
    """Combination and conditional concepts keep the closer anchor they derive; the type's preserve prompts are added."""
    e = expand("red car", "combination", concept_type="object")
    assert e.anchor == "a car" and "a photo of a bicycle" in e.preserve and "a red object" in e.preserve


def test_merge_drops_type_prompts_that_name_another_concept():
    """'van gogh' and 'monet' erased together: neither type's preserve set keeps the other painter."""
    merged = merge(expand_all("van gogh\nmonet", concept_type="art style"))
    assert not [p for p in merged.preserve if "monet" in p or "gogh" in p]
    assert "a painting in the style of rembrandt" in merged.preserve
    assert "name a concept of this run: 'a painting in the style of claude monet'" in merged.explain()


def test_concept_types_pass_through_expand_all_and_specs():
    expanded = expand_all(["nudity", ConceptSpec("cubism", concept_type="art style")], concept_type="nudity")
    assert [e.concept_type for e in expanded] == ["nudity", "art style"]
    with pytest.raises(ConceptError, match="not both"):
        expand(ConceptSpec("cubism"), concept_type="art style")


@pytest.mark.parametrize("name", ["Art-Style", "art_style", "  ART   style "])
def test_concept_type_names_are_forgiving(name):
    assert expand("cubism", concept_type=name).concept_type == "art style"


def test_an_unknown_concept_type_lists_the_valid_ones():
    with pytest.raises(ConceptError, match="unknown concept type 'nsfw'; choose one of 'none', 'object', 'art style'"):
        expand("nudity", concept_type="nsfw")


@pytest.mark.parametrize("name", TYPED)
def test_the_testbeds_closed_vocabulary_refuses_a_concept_type_by_name(name):
    """The types are written for real checkpoints: on the testbed the check names the type and what to do."""
    from trust_engine.testbed import world

    expanded = expand_all("triangle", concept_type=name)
    with pytest.raises(ConceptError, match=f"concept type {name!r} adds prompts written for real checkpoints.*"
                                           "use concept type 'none'.*does not know the word"):
        check_concept_types(expanded, world.check_words)
    check_concept_types(expand_all("triangle"), world.check_words)  # 'none' adds nothing to check


def test_the_readme_documents_every_concept_type():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Concept types"):]
    section = section[: section.index("\n#", 1)]
    for name in CONCEPT_TYPES:
        assert f"| `{name}`" in section, name
