"""The notebooks' prose says what the runs and the sources show (issue 23, section 5).

Checked by program where a sentence can be: no unfilled placeholders; chapter 00's map names every
chapter; chapter 08 names every method the command takes; every sentence that names a winner either
cites an interval over at least five seeds or says that the runs cannot tell; every interval the prose
quotes is one the notebook printed (so a re-run cannot leave stale numbers in the text); every chapter that
quantises to 4 bits says that the base may already be the de-quantised Q4_1 copy; chapter 07's
description of GRPO matches the settings TRL runs with.
"""

import re

import nbformat
import pytest

from course import notebooks

SOLUTIONS = sorted(notebooks.SOLUTIONS.glob("*.ipynb"))
PLACEHOLDER = re.compile(r"\b[A-Z]{3,}_(?:LIST|NAME|TODO|HERE|PLACEHOLDER)\b|\bTODO\b|\bTBD\b")

# A sentence that names a winner: one of these words, outside code, math and quotation marks.
VERDICT = re.compile(r"\b(wins?|won|winner|beats?|beaten|outperform\w*|better|worse|faster|slower)\b", re.I)
# ... is fine with a printed interval over at least five seeds ("+0.03 [-0.05, +0.11] over 5 seeds"), repeats
# of a timing, or weights (a deterministic computation, replicated over a model's layers) ...
INTERVAL = re.compile(r"\[\s*[−+-]?\d[\d.]*\s*,\s*[−+-]?\d[\d.]*\s*\][^.]*?\bover (\d+) (?:paired )?(?:seeds|repeats|weights)")
# ... or when it says what the runs cannot tell.
CANNOT_TELL = re.compile(r"\b(cannot|can't|can not) tell\b", re.I)


def markdown(path):
    return [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "markdown"]


def prose(text):
    """Markdown without code blocks, inline code, math and quotations (others' words, not verdicts)."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`|\$[^$]*\$", " ", text)
    return re.sub(r"\"[^\"\n]*\"|“[^”]*”", " ", text)


def sentences(text):
    """Sentences of a markdown cell: paragraphs, list items and table rows split, then on full stops."""
    blocks = re.split(r"\n\s*\n|\n(?=\s*(?:[*-] |\d+\. |\||#))", prose(text))
    for block in blocks:
        yield from (s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z*(])", " ".join(block.split())) if s.strip())


def unsupported_verdicts(text):
    found = []
    for sentence in sentences(text):
        if not VERDICT.search(sentence) or sentence.rstrip("*_ ").endswith("?"):  # a question names no winner
            continue
        if CANNOT_TELL.search(sentence) or any(int(n) >= 5 for n in INTERVAL.findall(sentence)):
            continue
        found.append(sentence)
    return found


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_no_unfilled_placeholder_in_the_prose(path):
    found = [m for text in markdown(path) for m in PLACEHOLDER.findall(text)]
    assert not found, f"{path.name}: unfilled placeholders in markdown: {found}"


def test_the_welcome_map_names_every_chapter_and_marks_only_missing_ones_as_coming():
    table = next(text for text in markdown(notebooks.SOLUTIONS / "00_welcome.ipynb") if "| notebook |" in text)
    rows = dict(re.findall(r"^\|\s*(\d\d) · ([^|]*)\|", table, flags=re.M))
    chapters = {path.name[:2] for path in SOLUTIONS}
    missing = sorted(chapters - set(rows))
    assert not missing, f"00_welcome's course map has no row for chapter(s) {missing}: add one per solutions/NN_*.ipynb"
    written = [number for number, title in rows.items() if "coming" in title and number in chapters]
    assert not written, f"00_welcome's course map marks chapter(s) {written} as coming, but they exist: drop 'coming'"


def test_chapter_08_introduction_names_every_method_the_command_takes():
    from course.finetune import METHODS

    names = {"lora": "LoRA", "dora": "DoRA", "olora": "OLoRA", "nola": "NOLA", "vera": "VeRA"}
    assert set(METHODS) <= set(names), f"a new --method: give it its display name here ({sorted(METHODS)})"
    intro = markdown(notebooks.SOLUTIONS / "08_from_notebook_to_cluster.ipynb")[0]
    missing = [names[m] for m in METHODS if not re.search(rf"\b{names[m]}\b", intro)]
    assert not missing, f"08's introduction leaves out {missing}, which `python -m course finetune --method` takes"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_a_sentence_that_names_a_winner_has_an_interval_or_says_the_runs_cannot_tell(path):
    found = [sentence for text in markdown(path) for sentence in unsupported_verdicts(text)]
    assert not found, (
        f"{path.name}: these sentences name a winner without evidence. Cite the printed `course.evidence` "
        "interval over at least 5 seeds (e.g. '+0.03 [-0.05, +0.11] over 5 seeds'), say what the runs "
        "cannot tell, or quote the source whose claim it is:\n  " + "\n  ".join(found))


# An interval quoted in prose: "+0.92 s [+0.18, +1.66]" (a value, an optional unit, the bounds).
NUMBER = r"[−+-]?\d[\d.,]*"
QUOTED = re.compile(rf"({NUMBER})\s*(?:[a-zA-Z%]+\s*)?\[\s*({NUMBER})\s*,\s*({NUMBER})\s*\]")


def printed(notebook) -> str:
    """Everything the notebook's code cells printed, with the minus sign as ASCII."""
    texts = [output.get("text", "") or output.get("data", {}).get("text/plain", "")
             for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    return "\n".join(texts).replace("−", "-")


def stale_intervals(notebook) -> list[str]:
    """Intervals quoted in markdown that no output of the notebook prints."""
    out = printed(notebook)
    stale = []
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        for match in QUOTED.finditer(cell.source):
            value, low, high = (re.escape(g.replace("−", "-")) for g in match.groups())
            if not re.search(rf"{value}\s*(?:[a-zA-Z%]+\s*)?\[\s*{low}\s*,\s*{high}\s*\]", out):
                stale.append(match.group(0))
    return stale


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_every_interval_the_prose_quotes_is_one_the_notebook_printed(path):
    stale = stale_intervals(nbformat.read(path, as_version=4))
    assert not stale, (f"{path.name}: the prose quotes intervals that its outputs do not print (left from an earlier "
                       f"run?): {stale}. Quote the printed line, or point at it without its numbers")


def test_the_stale_interval_rule_reads_notebooks_as_intended():
    def notebook(markdown_text, output_text):
        cells = [nbformat.v4.new_markdown_cell(markdown_text), nbformat.v4.new_code_cell("print()")]
        cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text=output_text)]
        return nbformat.v4.new_notebook(cells=cells)

    line = "checkpointing − none = +0.92 [+0.18, +1.66] over 5 paired seeds"
    assert not stale_intervals(notebook("It was slower (+0.92 s [+0.18, +1.66] over 5 repeats).", line))
    assert not stale_intervals(notebook("The gap, −0.54 [−1.09, +0.01], …", "= -0.54 [-1.09, +0.01] over 5"))
    assert stale_intervals(notebook("It was slower (+0.92 s [+0.18, +1.66] over 5 repeats).",
                                    line.replace("+1.66", "+1.67"))) == ["+0.92 s [+0.18, +1.66]"]
    assert stale_intervals(notebook("Rank 8 wins: +0.84 [+0.22, +1.47] over 5 seeds.", "")) == ["+0.84 [+0.22, +1.47]"]
    assert not stale_intervals(notebook("The list [1, 2] and x[0] are not intervals.", ""))


def test_the_verdict_rule_reads_sentences_as_intended():
    assert unsupported_verdicts("DoRA beats LoRA here.") == ["DoRA beats LoRA here."]
    assert unsupported_verdicts("LoRA was faster on one seed; OLoRA won the other.")
    assert unsupported_verdicts("DoRA − LoRA = +0.03 [−0.01, +0.07] over 3 seeds, so DoRA is better.")
    assert not unsupported_verdicts("DoRA − LoRA = +0.05 [+0.01, +0.09] over 5 seeds: DoRA is better.")
    assert not unsupported_verdicts("It was slower (+0.9 s [+0.2, +1.7] over 5 repeats of the step).")
    assert unsupported_verdicts("It was slower (+0.9 s [+0.2, +1.7] over 3 repeats of the step).")
    assert not unsupported_verdicts("LoftQ is better: −0.005 [−0.006, −0.004] over 60 paired weights.")
    assert unsupported_verdicts("LoftQ is better: −0.005 [−0.006, −0.004] over 2 weights.")
    assert not unsupported_verdicts("One seed each: these runs cannot tell which is better.")
    assert not unsupported_verdicts('The paper claims "significantly faster convergence".')
    assert not unsupported_verdicts("## 4. Does OLoRA converge faster?")
    assert not unsupported_verdicts("`faster_kernel=True` and $x_{better}$ are names, not verdicts.")
    assert unsupported_verdicts("One draw.\n\n* NOLA wins at K = 64.") == ["* NOLA wins at K = 64."]


def quantises_to_4_bits(path):
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    return bool(re.search(r"load_in_4bit=True|quantize_4bit\(", code))


QUANTISING = [path for path in SOLUTIONS if quantises_to_4_bits(path)]


def test_the_4_bit_rule_finds_the_chapters_that_quantise():
    assert {path.name[:2] for path in QUANTISING} >= {"03", "04", "06"}


@pytest.mark.parametrize("path", QUANTISING, ids=lambda p: p.name)
def test_a_chapter_that_quantises_to_4_bits_says_the_base_may_already_be_q4_1(path):
    assert any("Q4_1" in text for text in markdown(path)), (
        f"{path.name} quantises the base model to 4 bits: say where its numbers appear that the embedded base "
        "is already the de-quantised Q4_1 copy, and what that means for QLoRA on the original weights")


def test_chapter_07_describes_grpo_with_the_settings_trl_runs():
    from course.rlhf import grpo_config, rlhf_budget

    config = grpo_config(rlhf_budget("cpu"))
    text = "\n".join(markdown(notebooks.SOLUTIONS / "07_trl_rlhf.ipynb"))
    said = {
        "loss_type": f'`loss_type="{config.loss_type}"`',
        "num_iterations": f"`num_iterations={config.num_iterations}`",
        "scale_rewards": f'`scale_rewards="{config.scale_rewards}"`',
        "epsilon": f"\\epsilon = {config.epsilon:g}",
    }
    missing = {key: phrase for key, phrase in said.items() if phrase not in text}
    assert not missing, (f"07's GRPO section must describe what TRL runs; the config has {missing} "
                         "(a TRL upgrade may have changed a default): update section 5's text")
    assert config.num_iterations == 1 and "exactly 1" in text, "with one iteration per batch the ratio is 1: say so"


def test_chapter_06_states_how_the_ties_authors_trim():
    """Issue 23, section 5: per tensor (as PEFT and the course) against the authors' whole flattened task vector,
    keeping int(density * d) + 1 entries (``topk_values_mask`` in prateeky2806/ties-merging: k = d - int(d K),
    then every entry at or above the k-th smallest magnitude)."""
    text = " ".join(markdown(notebooks.SOLUTIONS / "06_merging.ipynb"))
    assert "each tensor on its own" in text and "topk_values_mask" in text
    assert re.search(r"operatorname\{int\}\(\\text\{density\} \\cdot d\) \+ 1\$ entries", text)
