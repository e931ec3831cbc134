"""course.notebook_client: a cell whose reply arrives while the shell socket's wake-up is missed still
finishes (the grader's stall of 2026-12-04, see the module's docstring).

The missed wake-up is simulated the way it showed itself: a poll of the shell socket never wakes on
its own, and only a poll that times out finds the reply waiting (pyzmq answers that case with
``zmq_poll(0)``). nbclient's own client then waits for ever; the course's finishes."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.notebook

RUN = textwrap.dedent("""
    import asyncio, sys
    import nbformat
    if sys.argv[1] == "course":
        from course.notebook_client import NotebookClient
    elif sys.argv[1].startswith("nbgrader"):  # nbgrader's Execute preprocessor, as autograde runs it
        if sys.argv[1] == "nbgrader-course":
            from course.classroom.nbgrader_execute import Execute
        else:
            from nbgrader.preprocessors import Execute
    else:
        from nbclient import NotebookClient

    def missed_wake_ups(client):
        original = client.kc.shell_channel.get_msg
        async def get_msg(timeout=None, **kwargs):
            if timeout is None:
                await asyncio.Event().wait()  # a poll whose wake-up was missed: it never returns
            await asyncio.sleep(timeout)     # it returns only when it times out ...
            return await original(timeout=0)  # ... and then finds the reply waiting
        client.kc.shell_channel.get_msg = get_msg

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 6 * 7"), nbformat.v4.new_code_cell("print(x)")]
    if sys.argv[1].startswith("nbgrader"):
        client = Execute(timeout=None, kernel_name="python3", shell_timeout_interval=1)
        client.on_cell_start = lambda cell, cell_index: cell_index or missed_wake_ups(client)
        client.preprocess(nb, {})
    else:
        client = NotebookClient(nb, timeout=None, kernel_name="python3", shell_timeout_interval=1)
        client.on_notebook_start = lambda notebook: missed_wake_ups(client)
        client.execute()
    print("OUTPUT", nb.cells[1].outputs[0]["text"].strip())
""")


def run(which, timeout):
    process = subprocess.Popen([sys.executable, "-c", RUN, which], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the client and its kernel
        process.communicate()
        return None, "", ""


def test_the_course_client_finishes_despite_missed_wake_ups():
    rc, out, err = run("course", timeout=120)
    assert rc == 0 and "OUTPUT 42" in out, (rc, out[-2000:], err[-2000:])


def test_nbclients_own_client_waits_for_ever_there():
    # What the course's client fixes: if nbclient ever polls again by itself, this test says so, and
    # course.notebook_client can go.
    rc, out, _ = run("nbclient", timeout=15)
    assert rc is None and "OUTPUT" not in out, "nbclient's client finished: course.notebook_client may no longer be needed"


def test_the_execute_the_nbgrader_export_installs_finishes_despite_missed_wake_ups():
    pytest.importorskip("nbgrader")
    rc, out, err = run("nbgrader-course", timeout=120)
    assert rc == 0 and "OUTPUT 42" in out, (rc, out[-2000:], err[-2000:])


def test_nbgraders_own_execute_waits_for_ever_there():
    pytest.importorskip("nbgrader")
    rc, out, _ = run("nbgrader", timeout=15)
    assert rc is None and "OUTPUT" not in out, "nbgrader's Execute finished: course.classroom.nbgrader_execute may go"


def test_the_exported_nbgrader_config_puts_the_course_execute_in_nbgraders_place(tmp_path):
    pytest.importorskip("nbgrader")
    from nbgrader.converters.autograde import Autograde
    from nbgrader.preprocessors import Execute as NbgraderExecute
    from traitlets.config import Config

    from course.__main__ import main
    from course.classroom.nbgrader_execute import Execute

    assert main(["classroom", "export", "--format", "nbgrader", "--chapters", "01", str(tmp_path / "course")]) == 0
    config = Config()
    exec((tmp_path / "course" / "nbgrader_config.py").read_text(), {"get_config": lambda: config})
    installed = list(config.Autograde.autograde_preprocessors)
    default = list(Autograde.class_traits()["autograde_preprocessors"].default())
    assert Execute in installed and NbgraderExecute not in installed
    assert installed == [Execute if p is NbgraderExecute else p for p in default]
    assert config.Execute.timeout == 1800
