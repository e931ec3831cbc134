"""nbgrader's ``Execute`` preprocessor with the course's reply poll (``classroom export --format nbgrader``).

``nbgrader autograde`` runs each notebook through nbclient, whose client waits for a cell's reply in a
single poll of the shell socket; that poll can miss its wake-up and sleep until the cell's time limit
(``course.notebook_client`` tells the story: 2026-12-04, with the grader). The course's CI met the
same stall under nbgrader: a chapter 02 autograde that takes a minute waited past 15 minutes. This
``Execute`` is nbgrader's own, with ``course.notebook_client``'s poll, which asks again every
``shell_timeout_interval`` seconds; the ``nbgrader_config.py`` the export writes installs it in place
of nbgrader's (``autograde_preprocessors``), leaving every other preprocessor as nbgrader has it.
"""

from __future__ import annotations

from nbgrader.preprocessors import Execute as _NbgraderExecute

from course.notebook_client import NotebookClient


class Execute(_NbgraderExecute):
    """nbgrader's ``Execute`` whose wait for each cell's reply polls again every few seconds."""

    _async_poll_for_reply = NotebookClient._async_poll_for_reply


def autograde_preprocessors() -> list:
    """nbgrader's default ``Autograde.autograde_preprocessors`` with this ``Execute`` in its place."""
    from nbgrader.converters.autograde import Autograde

    default = Autograde.class_traits()["autograde_preprocessors"].default()
    return [Execute if preprocessor is _NbgraderExecute else preprocessor for preprocessor in default]
