"""The README says what the code does: no unfilled placeholders, the command line's real choices."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_no_unfilled_placeholder():
    found = re.findall(r"\b[A-Z]{3,}_(?:LIST|NAME|TODO|HERE|PLACEHOLDER)\b|\bTODO\b|\bTBD\b", README)
    assert not found, f"README.md has unfilled placeholders: {found}"


def test_the_finetune_methods_are_the_ones_the_command_takes():
    from course.finetune import METHODS

    sentence = re.search(r"`--method` is one of ([^.]+)\.", README)
    assert sentence, "README.md should say which --method values finetune takes"
    named = re.findall(r"`(\w+)`", sentence.group(1))
    assert sorted(named) == sorted(METHODS), f"README names {named}; finetune takes {list(METHODS)}"


def test_the_course_maps_times_are_the_notebooks_metadata():
    """The course map's "CPU time" column says it holds each solution's ``metadata.course.seconds``."""
    import nbformat

    solutions = sorted((Path(__file__).resolve().parents[1] / "solutions").glob("*.ipynb"))
    wrong = {}
    for path in solutions:
        row = re.search(rf"^\| {path.name[:2]} \| \[[^]]*\]\(solutions/{re.escape(path.name)}\) \|.*?\| ([0-9.]+) (s|min) \|",
                        README, re.M)
        assert row, f"README.md's course map has no row for {path.name}"
        seconds = nbformat.read(path, as_version=4).metadata["course"]["seconds"]
        shown = float(row.group(1)) * (60 if row.group(2) == "min" else 1)
        if abs(shown - seconds) > (3 if row.group(2) == "min" else 0.5):  # one decimal of a minute, or whole seconds
            wrong[path.name] = (f"{row.group(1)} {row.group(2)}", seconds)
    assert not wrong, f"README.md's course map times disagree with the notebooks' metadata (shown, seconds): {wrong}"
