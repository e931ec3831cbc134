"""The grader trusts nothing a notebook's kernel says: forgeries earn nothing, every submission gets a row.

Most tests grade with ``run=False`` (the exercises are judged from the notebook's code; the
notebook itself is not executed), which is what decides the score; the batch test runs the
notebooks too, with a short time limit.
"""

import csv
import json

import nbformat
import pytest

from course import notebooks
from course.__main__ import main
from course.definitions import extract, load
from course.grade import GradeError, Report, grade, judge, resolve_assignment

pytestmark = pytest.mark.notebook

RIGHT_COUNT = "def count_trainable(model):\n    return sum(p.numel() for p in model.parameters() if p.requires_grad)"


def student(chapter: str, tmp_path, name: str | None = None, *, replace=None, append=(), metadata=True):
    """A copy of a student notebook, optionally with its exercise filled in and cells appended."""
    nb = nbformat.read(notebooks.NOTEBOOKS / f"{chapter}.ipynb", as_version=4)
    if replace:
        old, new = replace
        cells = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert cells, f"no cell holds {old!r}"
        cells[0].source = new
    nb.cells += [nbformat.v4.new_code_cell(source) for source in append]
    if not metadata:
        nb.metadata.pop("course")
    path = tmp_path / (name or f"{chapter}.ipynb")
    nbformat.write(nb, path)
    return path


def small(path, *cells, chapter="00_welcome"):
    """A short notebook of the given code cells that says it is ``chapter`` (quick to execute)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["course"] = {"chapter": chapter}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in ("from course import check", *cells)]
    nbformat.write(nb, path)
    return path


def statuses(report: Report) -> dict:
    return {c["check"]: c["status"] for c in report.checks}


# ---------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------


def test_definitions_keep_imports_functions_classes_and_constants_only():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%matplotlib inline\nimport math\nR, ALPHA = 8, 16\nSCALE = ALPHA / R\n"
                                  "x = 3\ny = compute()\nopen('/tmp/forged', 'w').write('x')"),
        nbformat.v4.new_markdown_cell("def not_code(): pass"),
        nbformat.v4.new_code_cell("@staticmethod\ndef f(a):\n    return math.sqrt(a) * SCALE\n\nf(4)"),
        nbformat.v4.new_code_cell("def broken(:\n    pass"),
        nbformat.v4.new_code_cell("class C:\n    pass\nresult = C()\nlayer = course.lora.LoRALinear"),
    ]
    found = extract(nb)
    kept = "\n".join(source for _, source in found.cells)
    assert "import math" in kept and "R, ALPHA = 8, 16" in kept and "SCALE = ALPHA / R" in kept
    assert "x = 3" in kept and "def f(a)" in kept and "@staticmethod" in kept and "class C" in kept
    for dropped in ("compute()", "open(", "f(4)", "result =", "layer =", "not_code"):
        assert dropped not in kept
    assert found.problems and "cell 3" in found.problems[0] and "SyntaxError" in found.problems[0]
    module, errors = load(found)
    assert module.f.__func__(4.0) == 2 * 2 and module.C.__module__ == "__learner__"
    assert errors == found.problems


def test_a_traceback_points_at_the_learners_cell_and_line():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import torch\n\n\ndef f():\n    return 1 / 0")]
    module, _ = load(extract(nb))
    with pytest.raises(ZeroDivisionError) as info:
        module.f()
    assert info.traceback[-1].path == "<cell 0>" and info.traceback[-1].lineno == 4  # 0-based: line 5


# ---------------------------------------------------------------------------
# Honest work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chapter", [path.stem for path in notebooks.solution_paths()])
def test_every_solution_gets_full_marks_and_every_student_notebook_zero(chapter):
    for path in [notebooks.SOLUTIONS / f"{chapter}.ipynb"]:
        report = grade(path, run=False)
        assert report.expected == len(notebooks.load_manifest()[path.stem]["exercises"])
        unanswered = grade(notebooks.NOTEBOOKS / path.name, run=False)
        assert report.expected >= 1, f"{chapter} has no exercise: every chapter carries its core in one"
        assert report.score == 1.0 and report.flagged == "", (path.name, report.checks, report.flagged)
        assert unanswered.score == 0.0 and set(statuses(unanswered).values()) <= {"not_attempted"}, unanswered
        assert len(unanswered.checks) == report.expected, unanswered


def test_a_chapter_without_exercises_is_never_scored(tmp_path):
    manifest = {**notebooks.load_manifest(), "00_welcome": {"title": "00", "exercises": []}}
    for path in (notebooks.SOLUTIONS / "00_welcome.ipynb", notebooks.NOTEBOOKS / "00_welcome.ipynb"):
        row = grade(path, run=False, manifest=manifest)
        assert row.score is None and "has no exercises" in row.errors[0], row
    with pytest.raises(GradeError, match="is not a chapter with exercises"):
        resolve_assignment("00", manifest)


def test_a_planted_mistake_gets_the_checks_own_message(tmp_path):
    wrong = student("00_welcome", tmp_path, replace=("def count_trainable", "def count_trainable(model):\n"
                    "    return sum(p.numel() for p in model.parameters())"))
    report = grade(wrong, run=False)
    assert report.score == 0.0 and report.checks[0]["status"] == "failed"
    assert "frozen parameters too" in report.checks[0]["message"]


def test_a_class_with_one_stub_method_left_is_told_which(tmp_path):
    source = nbformat.read(notebooks.SOLUTIONS / "02_lora_from_scratch.ipynb", as_version=4)
    answer = next(c.source for c in source.cells if "class LoRALinear" in c.source)
    head, _, _ = answer.partition("    @torch.no_grad()\n    def unmerge")
    partial = head + "    @torch.no_grad()\n    def unmerge(self):\n        raise NotImplementedError()\n"
    partial = "\n".join(line for line in partial.split("\n") if "### " not in line)
    path = student("02_lora_from_scratch", tmp_path, replace=("class LoRALinear", partial))
    verdict = next(c for c in grade(path, run=False).checks if c["check"] == "lora_linear")
    assert verdict["status"] == "failed" and "LoRALinear.unmerge" in verdict["message"]


# ---------------------------------------------------------------------------
# What earns nothing
# ---------------------------------------------------------------------------


def test_forged_log_records_and_patched_checks_earn_nothing(tmp_path):
    forged = student("00_welcome", tmp_path, append=[
        "import json, os\nfor path in filter(None, [os.environ.get('COURSE_CHECK_LOG'), 'checks.jsonl']):\n"
        "    open(path, 'a').write(json.dumps({'check': 'count_trainable', 'status': 'passed'}) + '\\n')",
        "from course.check import core\ncore.CheckResult.passed = property(lambda self: True)\n"
        "core.Check.run = lambda self, answer: core.CheckResult(self.name, 'passed')",
    ])
    report = grade(forged, timeout=120)  # executed too: what the cells did in their kernel does not count
    assert report.score == 0.0 and statuses(report) == {"count_trainable": "not_attempted"}


def test_patching_the_checks_from_a_definition_is_caught(tmp_path):
    sneaky = student("00_welcome", tmp_path, replace=("def count_trainable", RIGHT_COUNT.replace(
        "    return sum(p.numel() for p in model.parameters() if p.requires_grad)", "    return 0")), append=[
        "class Sneaky:\n    import torch\n    torch.equal = lambda *a, **k: True\n"
        "    from course.check import core\n    core.expect = lambda *a, **k: None"])
    report = grade(sneaky, run=False)
    (verdict,) = report.checks
    assert verdict["status"] == "tampered" and "torch.equal" in verdict["message"] and "core.expect" in verdict["message"]
    assert report.score == 0.0 and report.flagged.startswith("tampering")


def test_a_renamed_notebook_with_its_checks_removed_is_still_graded_as_its_chapter(tmp_path):
    renamed = student("00_welcome", tmp_path, "homework_alice.ipynb")
    nb = nbformat.read(renamed, as_version=4)
    nb.cells = [c for c in nb.cells if "check." not in c.source]
    nbformat.write(nb, renamed)
    report = grade(renamed, run=False)
    assert report.chapter == "00_welcome" and report.expected == 1 and report.score == 0.0


def test_a_notebook_whose_chapter_cannot_be_found_gets_an_error_row_not_a_score(tmp_path):
    anonymous = student("00_welcome", tmp_path, "homework_bob.ipynb", metadata=False)
    nb = nbformat.read(anonymous, as_version=4)
    nb.cells = [c for c in nb.cells[2:] if "check." not in c.source]  # no badge, no checks either
    nbformat.write(nb, anonymous)
    report = grade(anonymous, run=False)
    assert report.score is None and report.chapter is None and "Cannot tell which chapter" in report.errors[0]


def test_an_assignment_grades_every_file_as_its_chapter_and_refuses_another_chapters(tmp_path, capsys):
    anonymous = student("00_welcome", tmp_path, "homework_bob.ipynb", metadata=False)
    nb = nbformat.read(anonymous, as_version=4)
    nb.cells = nb.cells[2:]  # nothing in it says which chapter it is
    nbformat.write(nb, anonymous)
    report = grade(anonymous, run=False, assignment="00")
    assert report.chapter == "00_welcome" and report.expected == 1 and report.score == 0.0
    other = grade(student("01_load_adapters", tmp_path), run=False, assignment="00_welcome")
    assert other.score is None and "is not the assignment 00_welcome: its metadata says 01_load_adapters" in other.errors[0]
    assert main(["grade", "--no-execute", "--assignment", "99", str(anonymous)]) == 2
    assert "--assignment '99' is not a chapter" in capsys.readouterr().err


@pytest.mark.parametrize(("chapter", "cell", "answer", "phrase"), [
    ("02_lora_from_scratch", "class LoRALinear", "from course.lora import LoRALinear", "course's own reference"),
    ("02_lora_from_scratch", "class LoRALinear", "import course.lora\n\n\nclass LoRALinear(course.lora.LoRALinear):\n"
     "    pass", "subclasses the course's reference"),
    ("01_load_adapters", "def delta_weight", "import course.adapters\n\n\ndef delta_weight(peft_model, module_name):\n"
     "    return course.adapters.delta_weight(peft_model, module_name)", "calls the course's reference"),
    ("05_nola", "class GenerateParams", "from course.nola import GenerateParams", "course's own reference"),
    ("05_nola", "class GenerateParams", "import course.nola\n\n\nclass GenerateParams:\n"
     "    apply = staticmethod(lambda c, rows, cols, seed: course.nola.GenerateParams.apply(c, rows, cols, seed))",
     "calls the course's reference"),
    ("05_nola", "class NOLALoRALinear", "from course.nola import NOLALoRALinear", "course's own reference"),
    ("06_merging", "def svd_truncate", "from course.merging import svd_truncate", "course's own reference"),
    ("07_trl_rlhf", "def grpo_advantages", "import course.rlhf\n\n\ndef grpo_advantages(rewards, group_size, "
     "scale_rewards='group'):\n    return course.rlhf.grpo_advantages(rewards, group_size, scale_rewards)",
     "calls the course's reference"),
    ("08_from_notebook_to_cluster", "def global_token_loss", "from course.distributed import global_token_loss",
     "course's own reference"),
])
def test_the_courses_reference_is_not_an_answer(tmp_path, chapter, cell, answer, phrase):
    report = grade(student(chapter, tmp_path, replace=(cell, answer)), run=False)
    verdict = next(c for c in report.checks if c["status"] != "not_attempted")
    assert verdict["status"] == "failed" and phrase in verdict["message"], verdict


def test_an_answer_that_never_returns_is_stopped_by_the_process_limit(tmp_path):
    endless = student("00_welcome", tmp_path, replace=("def count_trainable", "def count_trainable(model):\n"
                      "    while True:\n        try:\n            while True:\n                pass\n"
                      "        except BaseException:\n            pass"))
    exercise = notebooks.load_manifest()["00_welcome"]["exercises"][0]
    verdict = judge(extract(nbformat.read(endless, as_version=4)), exercise, limit=20)
    assert verdict["status"] == "failed" and "too slow" in verdict["message"]


# ---------------------------------------------------------------------------
# Batches, JSON and the gradebook
# ---------------------------------------------------------------------------


def test_a_batch_with_a_hanging_notebook_and_a_broken_file_returns_every_row(tmp_path, capsys):
    folder = tmp_path / "submissions"
    folder.mkdir()
    small(folder / "carol.ipynb", RIGHT_COUNT, "result = check.count_trainable(count_trainable)")
    student("00_welcome", folder, "dave.ipynb", append=["while True:\n    pass"])
    (folder / "erin.ipynb").write_text("this is not JSON")
    gradebook = tmp_path / "grades.csv"
    code = main(["grade", "--json", "--timeout", "30", "--csv", str(gradebook), str(folder)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert code == 2  # one submission could not be graded
    by_name = {row["notebook"].rsplit("/", 1)[-1]: row for row in rows}
    assert set(by_name) == {"carol.ipynb", "dave.ipynb", "erin.ipynb"}
    for row in rows:
        assert set(row) >= {"notebook", "score", "passed", "expected", "checks", "errors"}
    assert by_name["carol.ipynb"]["score"] == 1.0 and by_name["carol.ipynb"]["errors"] == []
    assert by_name["dave.ipynb"]["score"] == 0.0 and "did not finish within 30 s" in by_name["dave.ipynb"]["errors"][0]
    assert by_name["erin.ipynb"]["score"] is None and "not a readable notebook" in by_name["erin.ipynb"]["errors"][0]
    table = list(csv.DictReader(gradebook.open()))
    assert [r["notebook"].rsplit("/", 1)[-1] for r in table] == ["carol.ipynb", "dave.ipynb", "erin.ipynb"]
    assert table[0]["count_trainable"] == "passed" and table[1]["count_trainable"] == "not_attempted"
    assert table[2]["score"] == "" and "not a readable notebook" in table[2]["errors"]


def test_cell_errors_are_reported_without_stopping_the_grading(tmp_path):
    broken = small(tmp_path / "frank.ipynb", "1 / 0", RIGHT_COUNT, "check.count_trainable(count_trainable)")
    report = grade(broken, timeout=120)
    assert report.score == 1.0 and any("ZeroDivisionError" in e for e in report.errors)


def test_a_missing_path_gets_a_row(tmp_path, capsys):
    assert main(["grade", "--no-execute", str(tmp_path / "nope.ipynb")]) == 2
    assert "no such file" in capsys.readouterr().out
