"""Atomic writes: a reader never sees half a file or half a folder, and a failure changes nothing."""

import os

import pytest

from course.files import atomic_directory, atomic_write, remove_leftovers


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "nb.ipynb"
    atomic_write(path, "one")
    atomic_write(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["nb.ipynb"]


def test_atomic_directory_replaces_the_old_folder_as_a_whole(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        assert not target.joinpath("new.txt").exists()  # nothing visible before the block ends
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_failure_inside_the_block_keeps_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise OSError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


# --- Permissions, the working folder, leftovers (issue 21) ----------------------------------------


def test_written_files_and_folders_get_the_umask_modes_not_private_ones(tmp_path):
    old = os.umask(0o002)  # a group-shared cache
    try:
        atomic_write(tmp_path / "gradebook.csv", "a,b\n")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "gradebook.csv").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "model" / "sub").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == 0o664


def test_keep_others_updates_the_working_folder_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "weights.bin").write_text("old")
    with atomic_directory(".", keep_others=True) as tmp:
        (tmp / "weights.bin").write_text("new")
        (tmp / "nola").mkdir()
        (tmp / "nola" / "coefficients").write_text("c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "nola", "weights.bin"]
    assert (tmp_path / "weights.bin").read_text() == "new" and (tmp_path / "README.md").read_text() == "mine"
    assert (tmp_path / "nola" / "coefficients").read_text() == "c"
    with pytest.raises(ValueError, match="working folder"):  # replacing it as a whole cannot work
        with atomic_directory("."):
            pass


def test_a_file_is_never_replaced_by_a_folder(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    for keep in (False, True):
        with pytest.raises(FileExistsError, match="is a file"), atomic_directory(notes, keep_others=keep):
            pass
    assert notes.read_text() == "notes"


def test_remove_leftovers_removes_only_what_killed_writes_left(tmp_path):
    for name in (".model.tmp-ab12_x9z", ".model.old-q1w2e3r4", ".other.tmp-zzzzzzzz", ".tmp-abcdefgh"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "half.safetensors").write_text("half")
    for name in ("model", ".git", ".model.tmp-notes.txt", "tmp-visible"):
        (tmp_path / name).mkdir()
    (tmp_path / ".model.tmp-file").write_text("a file, not a folder a write made")
    removed = remove_leftovers(tmp_path, "model")
    assert sorted(p.name for p in removed) == [".model.old-q1w2e3r4", ".model.tmp-ab12_x9z"]
    assert sorted(p.name for p in remove_leftovers(tmp_path)) == [".other.tmp-zzzzzzzz", ".tmp-abcdefgh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", ".model.tmp-file", ".model.tmp-notes.txt",
                                                          "model", "tmp-visible"]


def test_a_finished_folder_is_readable_by_everyone(tmp_path):
    # safetensors writes 0600; the model cache and adapters are shared (the grader's sandbox user reads them)
    import os

    with atomic_directory(tmp_path / "model") as tmp:
        os.close(os.open(tmp / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
        (tmp / "sub").mkdir(mode=0o700)
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model" / "sub").stat().st_mode & 0o777 == 0o755
