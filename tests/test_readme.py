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
