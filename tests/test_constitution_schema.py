"""Constitution schema: normalisation, and errors that name file, line and field."""

from __future__ import annotations

import textwrap

import pytest

from safejudge.constitution import ConstitutionError, Thresholds, load_constitution, load_directory, parse_constitution

VALID = textwrap.dedent(
    """\
    name: sample
    version: 2
    description: two rules
    thresholds:
      beta: 0.5
    rules:
      - id: knife-held
        title: Person holding a knife
        category: violence
        text: A person visibly holds a knife in a hand.
        preconditions:
          - A person is visible
          - - {text: A knife is visible, central_object: knife}
            - A dagger is visible
          - A hand is on the knife's handle
      - id: flame-house
        title: Flame near a house
        category: shocking
        severity: medium
        text: Flames are visible next to a house.
        preconditions: [Flames are visible, A house is visible]
    """
)


def test_valid_constitution_normalises_items():
    constitution = parse_constitution(VALID, "sample.yaml")
    rule = constitution.rule("knife-held")
    assert [[alt.text for alt in item] for item in rule.preconditions] == [
        ["A person is visible"],
        ["A knife is visible", "A dagger is visible"],
        ["A hand is on the knife's handle"],
    ]
    assert rule.preconditions[1][0].central_object == "knife"
    assert constitution.version == "2"
    assert constitution.thresholds.beta == 0.5 and constitution.thresholds.alpha2_factor == 0.8
    assert constitution.rule("flame-house").severity.value == "medium"


@pytest.mark.parametrize(
    "edit, message",
    [
        (("    preconditions: [Flames are visible, A house is visible]", "    preconditions: []"),
         "sample.yaml:21: rules[1].preconditions: must not be empty"),
        (("    severity: medium", "    severity: medium\n    colour: red"),
         "sample.yaml:20: rules[1].colour: unknown key"),
        (("  - id: flame-house", "  - id: knife-held"), "sample.yaml:16: rules[1].id: duplicate rule id 'knife-held'"),
        (("  beta: 0.5", "  beta: 2"), "sample.yaml:5: thresholds.beta: Input should be less than or equal to 1"),
        (("    title: Person holding a knife\n", ""), "sample.yaml:7: rules[0].title: Field required"),
        (("      - - {text: A knife", "      - - {txt: A knife"), "sample.yaml:13: rules[0].preconditions[1][0].txt: unknown key"),
        (("    severity: medium", "    severity: dire"), "sample.yaml:19: rules[1].severity: Input should be"),
        (("  - id: knife-held", "  - id: Knife Held"), "sample.yaml:7: rules[0].id: String should match pattern"),
    ],
)
def test_errors_name_file_line_and_field(edit, message):
    broken = VALID.replace(*edit)
    assert broken != VALID
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(broken, "sample.yaml")
    assert message in str(info.value)


def test_invalid_yaml_and_non_mapping():
    with pytest.raises(ConstitutionError, match=r"x.yaml:2: invalid YAML"):
        parse_constitution("name: a\n  bad: [", "x.yaml")
    with pytest.raises(ConstitutionError, match="x.yaml:1: a constitution must be a YAML mapping"):
        parse_constitution("- 1\n- 2\n", "x.yaml")


def test_content_hash_ignores_formatting_but_not_content():
    a = parse_constitution(VALID)
    b = parse_constitution(VALID.replace("description: two rules", "description:   two rules  # comment"))
    c = parse_constitution(VALID.replace("A dagger is visible", "A sword is visible"))
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_threshold_overrides_are_validated_by_name():
    assert Thresholds().merged({"beta": 0.4}).beta == 0.4
    with pytest.raises(ValueError, match="gamma"):
        Thresholds().merged({"gamma": 1.0})


def test_directory_loading_and_duplicate_names(tmp_path):
    (tmp_path / "a.yaml").write_text(VALID)
    assert list(load_directory(tmp_path)) == ["sample"]
    (tmp_path / "b.yaml").write_text(VALID)
    with pytest.raises(ConstitutionError, match="b.yaml:1: name: 'sample' is already used"):
        load_directory(tmp_path)
    with pytest.raises(ConstitutionError, match="cannot read"):
        load_constitution(tmp_path / "missing.yaml")


def test_hostile_yaml_is_refused_quickly_with_the_limit():
    # Found by tests/test_fuzz.py: deep nesting crashed the composer (RecursionError) and alias chains
    # made the line-number pass exponential (10^7 values here).
    deep = "name: " + "[" * 3000 + "]" * 3000
    with pytest.raises(ConstitutionError, match=r"^<string>:1: YAML nests deeper than 64 levels$"):
        parse_constitution(deep)
    chain = [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    laughs = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]", *chain])
    with pytest.raises(ConstitutionError, match="more than 100000 values once its aliases are expanded"):
        parse_constitution(laughs)
    reused = textwrap.dedent(
        """\
        name: anchors
        version: 1
        rules:
          - {id: a, title: A, category: c, text: a, preconditions: &shared [A person is visible]}
          - {id: b, title: B, category: c, text: b, preconditions: *shared}
        """
    )
    first, second = parse_constitution(reused).rules  # anchors and aliases within bounds still work
    assert first.preconditions == second.preconditions
