"""docs/config.md is generated from the schema: every field documented, the file never stale."""

from dataclasses import dataclass

from tandem.config import reference

REGENERATE = "run `python -m tandem.config.reference` and commit docs/config.md"


def test_every_config_field_has_a_docstring():
    assert reference.undocumented() == [], (
        "give each of these fields a docstring (the string literal under it in "
        "tandem/config/schema.py or cluster.py); it becomes its line in docs/config.md")


def test_docs_config_md_is_generated_from_the_current_schema():
    assert reference.DOC_PATH.read_text() == reference.render(), REGENERATE


def test_check_flag_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text(reference.DOC_PATH.read_text().replace("handoff_p", "handoff_q"))
    assert reference.main(["--check", "--out", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert reference.main(["--out", str(stale)]) == 0
    assert reference.main(["--check", "--out", str(stale)]) == 0


def test_rows_carry_type_default_range_and_paper_value():
    rows = {line.split(" | ")[0].strip("| `"): line for line in reference.render().splitlines()
            if line.startswith("| `")}
    assert rows["algorithm.handoff_p"].startswith(
        "| `algorithm.handoff_p` | `float` | `0.5` | [0, 1] |")
    # ranges that live in a loop over field names, and in a bare check() message
    assert "| >= 0 |" in rows["algorithm.kl_coef"]
    assert "must be >= 2" in rows["algorithm.group_size"]
    assert "must be in [1, eval.n]" in rows["eval.pass_k"]
    # the paper preset's value where it differs from the default
    assert "| `0.6` |" in rows["rollout.temperature"]
    # the junior defaults to the senior (self-paired)
    assert "`${model.senior.path}`" in rows["model.junior.path"]


def test_a_field_without_docstring_is_found():
    @dataclass
    class Section:
        documented: int = 1
        """Why it exists."""
        bare: int = 2

    assert reference.field_docs(Section) == {"documented": "Why it exists."}
