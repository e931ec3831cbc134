"""Grading that holds in a classroom (issue 22): each attack a motivated student tried earns nothing
and changes nothing outside its sandbox.

Every attack runs through ``python -m course grade`` against a temporary copy of the package,
never the checkout; the copy, the other hand-ins, the gradebook and the environment's
site-packages are compared before and after, and no process of a submission may outlive grading.
"""

import csv
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from course import notebooks
from course.grade_integrity import changed_file, fingerprint
from course.grade_sandbox import Limits, Mode, Sandbox, _sandbox_user, detect

pytestmark = pytest.mark.notebook

CHECKOUT = Path(__file__).resolve().parent.parent
# In the command line of every process an attack starts; per test process, so that two xdist workers
# running this module side by side never count each other's attackers.
MARKER = f"COURSE-ATTACK-7f3a-{os.getpid()}"
RIGHT_COUNT = "def count_trainable(model):\n    return sum(p.numel() for p in model.parameters() if p.requires_grad)"
STUB = "def count_trainable(model):\n    raise NotImplementedError()"


@pytest.fixture(scope="module")
def package():
    """A temporary copy of the course package, readable by everyone (the sandbox user included)."""
    if detect(str(CHECKOUT)).kind == "off":
        pytest.skip("no sandbox on this machine (not root, no bubblewrap): " + detect(str(CHECKOUT)).describe(
            Limits.for_timeout(60)))
    root = Path(tempfile.mkdtemp(prefix="course-pkg-"))
    shutil.copytree(CHECKOUT / "course", root / "course", ignore=shutil.ignore_patterns(".*"))
    for item in [root, *root.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def grade_cli(package, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(package), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "course", "grade", "--json", *map(str, args)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, {Path(r["notebook"]).name: r for r in rows}, done.stderr


def small(path, *cells, chapter="00_welcome", metadata=None):
    nb = nbformat.v4.new_notebook()
    nb.metadata["course"] = {"chapter": chapter} if metadata is None else metadata
    nb.cells = [nbformat.v4.new_code_cell(source) for source in ("from course import check", *cells)]
    nbformat.write(nb, path)
    return path


def student(chapter, path, *, replace=None, append=(), metadata=None):
    nb = nbformat.read(notebooks.NOTEBOOKS / f"{chapter}.ipynb", as_version=4)
    if replace:
        for old, new in replace:
            next(c for c in nb.cells if c.cell_type == "code" and old in c.source).source = new
    nb.cells += [nbformat.v4.new_code_cell(source) for source in append]
    if metadata is not None:
        nb.metadata["course"] = metadata
    nbformat.write(nb, path)
    return path


def survivors(marker: str = MARKER) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(entry.name)
        except OSError:
            pass
    return found


def hooks() -> list[Path]:
    return [p for folder in site.getsitepackages() for p in Path(folder).glob("*")
            if p.name in ("sitecustomize.py", "usercustomize.py") or p.suffix == ".pth"]


# ---------------------------------------------------------------------------
# The executed batch: rows 1, 2, 3, 5, 9, sitecustomize.py, exercises.json (row 8 on its own, below)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(package, tmp_path_factory):
    work = tmp_path_factory.mktemp("classroom")
    hand_ins, gradebook = work / "hand_ins", work / "grades.csv"
    hand_ins.mkdir()
    code = f"import course\nfrom pathlib import Path\nPKG = Path(course.__file__).parent\nHAND_INS = Path({str(hand_ins)!r})\n"
    small(hand_ins / "a_patch_checks.ipynb", STUB, code + "for f in (PKG / 'check').glob('*.py'):\n"
          "    f.write_text(f.read_text() + '\\n\\n' + '\\n'.join(f'{n}.__code__ = (lambda *a, **k: None).__code__' "
          "for n in ('expect',)))")
    small(hand_ins / "b_honest_stub.ipynb", STUB, "check.count_trainable(count_trainable)")
    small(hand_ins / "c_rewrite_all.ipynb", STUB, code + "import glob\nfor folder in (Path.cwd(), HAND_INS):\n"
          "    for f in folder.glob('*.ipynb'):\n        f.write_text('{}')")
    small(hand_ins / "d_diligent.ipynb", RIGHT_COUNT, "check.count_trainable(count_trainable)")
    small(hand_ins / "e_detached.ipynb", STUB, "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
          f"'import time\\nfor _ in range(600):\\n    time.sleep(0.2)\\n    try: open({str(gradebook)!r}, \"w\").write(\"forged\")"
          f"\\n    except OSError: pass', '{MARKER}'], start_new_session=True)")
    small(hand_ins / "g_huge_alloc.ipynb", "def count_trainable(model):\n    return len(bytearray(200 << 30))",
          "count_trainable(None)")
    small(hand_ins / "h_sitecustomize.ipynb", STUB, code + "import site\nfor folder in [*site.getsitepackages(), PKG.parent]:\n"
          "    for name in ('sitecustomize.py', 'course-attack.pth'):\n        try:\n"
          "            (Path(folder) / name).write_text('import course.check.core as c; c.FAILED = \"passed\"')\n"
          "        except OSError as e:\n            print(e)")
    small(hand_ins / "i_empty_manifest.ipynb", STUB, code + "(PKG / 'exercises.json').write_text('{}')")
    small(hand_ins / "j_meta_string.ipynb", RIGHT_COUNT, metadata="00_welcome")
    small(hand_ins / "k_chapter_list.ipynb", RIGHT_COUNT, metadata={"chapter": ["00_welcome"]})
    (hand_ins / "l_nul.ipynb").write_bytes(b'{"cells": [], "metadata": {}\x00, "nbformat": 4}')
    (hand_ins / "m_not_json.ipynb").write_text("this is not JSON")
    huge = nbformat.read(small(hand_ins / "n_huge.ipynb", RIGHT_COUNT), as_version=4)
    huge.cells[1].outputs = [nbformat.v4.new_output("stream", text="x" * (65 << 20))]
    nbformat.write(huge, hand_ins / "n_huge.ipynb")
    student("02_lora_from_scratch", hand_ins / "o_claims_08.ipynb", metadata={"chapter": "08_from_notebook_to_cluster"})
    before = {p.name: p.read_bytes() for p in hand_ins.iterdir()}
    package_before, hooks_before = fingerprint(package), hooks()  # the root: a sitecustomize.py beside course/
    rc, rows, stderr = grade_cli(package, "--quick", "--timeout", "120", "--csv", gradebook, hand_ins, cwd=work)
    left = survivors()
    time.sleep(1.0)  # a detached writer would have struck by now
    return {"rc": rc, "rows": rows, "stderr": stderr, "survivors": left, "before": before, "hand_ins": hand_ins,
            "gradebook": gradebook, "package_before": package_before, "hooks_before": hooks_before, "package": package}


def test_the_batch_names_its_protections_and_leaves_everything_as_it_was(batch):
    assert batch["rc"] == 2, batch["stderr"][-2000:]  # some hand-ins could not be graded
    assert "sandbox user" in batch["stderr"] or "sandbox bwrap" in batch["stderr"]
    assert "limits: memory" in batch["stderr"]
    assert fingerprint(batch["package"]) == batch["package_before"]  # rows 1, h and i: the package and beside it
    assert hooks() == batch["hooks_before"]  # row h: no sitecustomize.py, no .pth
    assert {p.name: p.read_bytes() for p in batch["hand_ins"].iterdir()} == batch["before"]  # row 2
    assert batch["survivors"] == [] and survivors() == []  # row 3 (row 8: its own test): no process outlived grading
    assert len(batch["rows"]) == len(batch["before"])  # row 5: a row for every hand-in


@pytest.mark.parametrize("name", ["a_patch_checks", "b_honest_stub", "c_rewrite_all", "e_detached",
                                  "h_sitecustomize", "i_empty_manifest"])
def test_an_attack_or_a_stub_earns_nothing(batch, name):
    row = batch["rows"][f"{name}.ipynb"]
    assert row["score"] == 0.0 and row["checks"][0]["status"] == "not_attempted", row


def test_the_diligent_student_still_gets_full_marks(batch):
    row = batch["rows"]["d_diligent.ipynb"]
    assert row["score"] == 1.0 and row["errors"] == [] and row["flagged"] == "", row


def test_an_endless_notebook_with_a_setsid_child_is_stopped(package, tmp_path):
    # Row 8, graded on its own with a short limit, so the batch above never waits for a timeout.
    hand_ins = tmp_path / "hand_ins"
    hand_ins.mkdir()
    small(hand_ins / "f_setsid_loop.ipynb", STUB, "import subprocess, sys\nsubprocess.Popen(['setsid', sys.executable, "
          f"'-c', 'import time; time.sleep(3000)', '{MARKER}-setsid'])", "while True:\n    pass")
    _, rows, stderr = grade_cli(package, "--quick", "--timeout", "30", hand_ins, cwd=tmp_path)
    row = rows["f_setsid_loop.ipynb"]
    assert row["score"] == 0.0 and "did not finish within 30 s" in row["errors"][0], (row, stderr[-2000:])
    assert survivors(f"{MARKER}-setsid") == [], "a process the notebook started outlived its grading"


def test_a_huge_allocation_fails_inside_the_limit(batch):
    row = batch["rows"]["g_huge_alloc.ipynb"]
    assert row["score"] == 0.0 and row["checks"][0]["status"] == "failed"
    assert "MemoryError" in row["checks"][0]["message"]


@pytest.mark.parametrize(("name", "phrase"), [
    ("j_meta_string", "metadata `course` is a str"), ("k_chapter_list", "`course.chapter` is a list"),
    ("l_nul", "NUL bytes"), ("m_not_json", "not a readable notebook"), ("n_huge", "clear its outputs"),
    ("o_claims_08", "its metadata says 08_from_notebook_to_cluster"),
])
def test_a_malformed_or_inconsistent_notebook_gets_its_own_error_row(batch, name, phrase):
    row = batch["rows"][f"{name}.ipynb"]
    assert row["score"] is None and phrase in row["errors"][0], row


def test_the_gradebook_is_written_once_with_every_row(batch):
    table = list(csv.DictReader(batch["gradebook"].open()))
    assert len(table) == len(batch["before"]) and "flagged" in table[0]
    assert {r["notebook"].rsplit("/", 1)[-1]: r["score"] for r in table}["d_diligent.ipynb"] == "1"


# ---------------------------------------------------------------------------
# Judged without running: rows 4, 6, 7
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judged(package, tmp_path_factory):
    work = tmp_path_factory.mktemp("judged")
    hand_ins = work / "hand_ins"
    hand_ins.mkdir()
    small(hand_ins / "constants.ipynb", "def sneaky(f):\n    from course.check import core\n"
          "    core.FAILED = core.NOT_ATTEMPTED = 'passed'\n    return f\n\n\n@sneaky\n" + STUB)
    student("02_lora_from_scratch", hand_ins / "helpers.ipynb", append=[
        "class Sneaky:\n    import course.check.lora as L\n    L.run_on_both_shapes = lambda *a, **k: None\n"
        "    L._judge_injection = lambda *a, **k: None"])
    student("02_lora_from_scratch", hand_ins / "wrapper.ipynb", replace=[
        ("class LoRALinear", "import course.lora\n\n\ndef LoRALinear(b, r, a, dropout=0.0):\n"
         "    return course.lora.LoRALinear(b, r, a, dropout=dropout)"),
        ("def inject(", "import course.lora\n\n\ndef inject(model, targets, r, alpha, layer):\n"
         "    course.lora.inject_lora(model, targets, r, alpha, layer=layer)\n"
         "    for name, p in model.named_parameters():\n        p.requires_grad_('lora_' in name)\n    return model")])
    small(hand_ins / "frames.ipynb", "import sys\n\n\ndef count_trainable(model):\n"
          "    sys._getframe(1).f_locals\n    raise NotImplementedError()")
    return grade_cli(package, "--no-execute", hand_ins, cwd=work)


def test_rebinding_the_checks_constants_is_tampering(judged):
    row = judged[1]["constants.ipynb"]
    assert row["score"] == 0.0 and row["checks"][0]["status"] == "tampered"
    assert "core.FAILED" in row["checks"][0]["message"] and row["flagged"].startswith("tampering")


def test_replacing_unchecked_helpers_is_tampering(judged):
    row = judged[1]["helpers.ipynb"]
    assert row["score"] == 0.0 and {c["status"] for c in row["checks"]} == {"tampered"}, row
    assert "run_on_both_shapes" in row["checks"][0]["message"]


def test_a_wrapper_around_the_reference_earns_nothing_and_is_flagged(judged):
    row = judged[1]["wrapper.ipynb"]
    assert row["score"] == 0.0 and [c["status"] for c in row["checks"]] == ["failed", "failed"], row
    assert all("calls the course's reference" in c["message"] for c in row["checks"])
    assert "course.lora.LoRALinear" in row["flagged"] and "course.lora.inject_lora" in row["flagged"]


def test_stack_frames_are_flagged_for_a_human(judged):
    row = judged[1]["frames.ipynb"]
    assert row["score"] == 0.0 and "stack frames" in row["flagged"], row


def test_the_assignment_grades_every_file_as_its_chapter(package, tmp_path):
    anonymous = student("02_lora_from_scratch", tmp_path / "homework.ipynb", metadata={})
    nb = nbformat.read(anonymous, as_version=4)
    nb.cells = [c for c in nb.cells[2:] if "check." not in c.source]  # no badge, no checks: only the assignment says
    nbformat.write(nb, anonymous)
    other = small(tmp_path / "welcome.ipynb", RIGHT_COUNT)
    rc, rows, _ = grade_cli(package, "--no-execute", "--assignment", "02_lora_from_scratch", anonymous, other,
                            cwd=tmp_path)
    assert rc == 2 and rows["homework.ipynb"]["chapter"] == "02_lora_from_scratch"
    assert rows["homework.ipynb"]["expected"] == 2 and rows["homework.ipynb"]["score"] == 0.0
    assert rows["welcome.ipynb"]["score"] is None
    assert "not the assignment 02_lora_from_scratch" in rows["welcome.ipynb"]["errors"][0]
    rc, rows, stderr = grade_cli(package, "--assignment", "99_no_such_chapter", other, cwd=tmp_path)
    assert rc == 2 and rows == {} and "not a chapter with exercises" in stderr


# ---------------------------------------------------------------------------
# The sandbox itself
# ---------------------------------------------------------------------------


def test_a_changed_package_stops_grading_naming_the_file(tmp_path, monkeypatch, capsys):
    import course.grade
    import course.grade_sandbox
    from course.grade import Report, grade_many

    fake = tmp_path / "pkg" / "course"
    fake.mkdir(parents=True)
    (fake / "lora.py").write_text("x = 1\n")
    monkeypatch.setattr(course.grade, "PACKAGE", fake)
    monkeypatch.setattr(course.grade_sandbox, "detect", lambda root: Mode("off", ["test"]))

    def tamper(path, **kwargs):
        (fake / "lora.py").write_text("x = 2\n")
        return Report(str(path), "00_welcome", 1.0, 1, 1)

    monkeypatch.setattr(course.grade, "grade", tamper)
    one, two = small(tmp_path / "one.ipynb", RIGHT_COUNT), small(tmp_path / "two.ipynb", RIGHT_COUNT)
    assert grade_many([one, two], csv_path=tmp_path / "grades.csv", as_json=True) == 3
    err = capsys.readouterr().err
    assert f"{fake / 'lora.py'} was changed" in err and "two.ipynb" in err and "no gradebook written" in err
    assert not (tmp_path / "grades.csv").exists()


def test_a_startup_module_planted_beside_the_package_is_a_change(tmp_path):
    fake = tmp_path / "pkg" / "course"
    fake.mkdir(parents=True)
    (fake / "lora.py").write_text("x = 1\n")
    before = fingerprint(fake)
    assert changed_file(before, fake) is None
    (fake.parent / "sitecustomize.py").write_text("import course.check.core as c; c.FAILED = 'passed'\n")
    assert changed_file(before, fake) == f"{fake.parent / 'sitecustomize.py'} appeared"


def test_the_memory_limit_holds_inside_the_sandbox():
    mode = detect(str(CHECKOUT))
    box = Sandbox(mode, Limits(memory=1 << 30, cpu=60))
    try:
        done = box.popen([sys.executable, "-c", "bytearray(3 << 30)"], env=box.environment(dict(os.environ)),
                         stderr=subprocess.PIPE)
        _, err = done.communicate(timeout=120)
    finally:
        box.close()
    assert done.returncode != 0 and b"MemoryError" in err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None, reason="needs root and useradd")
def test_the_unprivileged_user_sandbox_ends_every_process_and_writes_nowhere_else():
    ids = _sandbox_user(create=True)
    box = Sandbox(Mode("user", ["test"], *ids), Limits.for_timeout(60))
    script = (f"id -u > \"$HOME/uid\"; setsid sh -c 'sleep 300' {MARKER} & touch /etc/{MARKER} 2>/dev/null; "
              f"touch /tmp/{MARKER}; exec sleep 300")
    try:
        process = box.popen(["/bin/sh", "-c", script], env=box.environment(dict(os.environ)))
        for _ in range(100):
            if (box.work / "home" / "uid").is_file() and Path(f"/tmp/{MARKER}").exists():
                break
            time.sleep(0.1)
        assert (box.work / "home" / "uid").read_text().strip() == str(box.uid) != "0"
        box.stop(process)
        assert box._survivors() == set() and not Path(f"/etc/{MARKER}").exists()
        assert not Path(f"/tmp/{MARKER}").exists()  # swept from the shared /tmp
    finally:
        box.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None, reason="needs root and useradd")
def test_two_sandboxes_side_by_side_never_end_each_others_processes():
    """Two graders at once (two pytest workers, two instructors' batches): each sandbox has a user of
    its own, so ending one submission's processes (``kill(-1)`` as its user) spares the other's."""
    mode = Mode("user", ["test"], *_sandbox_user(create=True))
    first, second = Sandbox(mode, Limits.for_timeout(60)), Sandbox(mode, Limits.for_timeout(60))
    try:
        assert first.uid != second.uid
        env = first.environment(dict(os.environ))
        one = first.popen(["/bin/sh", "-c", "exec sleep 300", MARKER], env=env)
        two = second.popen(["/bin/sh", "-c", "exec sleep 300", MARKER], env=second.environment(dict(os.environ)))
        time.sleep(0.5)
        assert one.poll() is None and two.poll() is None
        first.stop(one)
        assert one.poll() is not None and two.poll() is None, "stopping one sandbox ended the other's process"
        second.stop(two)
        assert two.poll() is not None
    finally:
        first.close()
        second.close()
    third = Sandbox(mode, Limits.for_timeout(60))  # the users are free again once closed
    try:
        assert third.uid in {first.uid, second.uid}
    finally:
        third.close()


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
def test_a_finished_sandbox_never_ends_processes_of_a_namespace_number_given_to_another():
    """A pid namespace's number (its inode) is reused once the namespace has ended. A sandbox that noted
    it must not take a later sandbox's processes (another grader's, side by side) for its own."""
    mode = Mode("bwrap", ["test"])
    first, second = Sandbox(mode, Limits.for_timeout(60)), Sandbox(mode, Limits.for_timeout(60))
    try:
        done = first.popen(["/bin/sh", "-c", "exit 0"], env=first.environment(dict(os.environ)))
        done.wait(timeout=60)
        first.stop(done)
        (noted,) = first._namespaces.values() or [(done.pid, "0")]
        live = second.popen(["/bin/sh", "-c", "exec sleep 300", MARKER], env=second.environment(dict(os.environ)))
        (taken,) = second._namespaces
        first._namespaces = {taken: noted}  # as if the number had come round to the second sandbox
        first._cgroup = None  # where no pids cgroup can be made, the namespaces are all a sandbox has
        first.stop()
        assert live.poll() is None, "the first sandbox ended the second one's process"
        second.stop(live)
        assert live.poll() is not None and second._survivors() == set()
    finally:
        first.close()
        second.close()
