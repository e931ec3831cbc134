"""The notebook runner behind ``python -m course notebooks run`` and the grader (``course.grade_worker``).

``NotebookClient`` is nbclient's, with one change: it waits for each cell's reply in polls of a few
seconds instead of one poll for the whole cell. nbclient awaits the kernel's ``execute_reply`` with a
single ``zmq.asyncio`` poll of the shell socket, and that poll can miss its wake-up: the socket's
file descriptor is edge-triggered (``ZMQ_FD``), and an edge consumed elsewhere leaves the poll asleep
while the reply sits in the socket. Seen here (2026-12-04, pyzmq 27.3, nbclient 0.11, ipykernel 7.4,
a chapter 02 hand-in under bubblewrap): the kernel had run the cell and was idle, the cell's output
task had finished, and the shell socket's ``zmq.EVENTS`` said POLLIN, yet the grader waited until its
time limit. A poll that times out asks libzmq directly (``zmq_poll`` with timeout 0), which sees the
waiting reply: so polling again every ``shell_timeout_interval`` seconds (nbclient's own setting,
default 5) recovers within seconds. The cell's own time limit (``timeout``) still holds as in nbclient.
"""

from __future__ import annotations

import asyncio
from queue import Empty
from time import monotonic

from nbclient import NotebookClient as _NbClient
from nbclient.client import timestamp
from nbclient.exceptions import CellTimeoutError
from nbclient.util import ensure_async


class NotebookClient(_NbClient):
    """nbclient's ``NotebookClient`` that polls the shell socket again every ``shell_timeout_interval`` s."""

    async def _async_poll_for_reply(self, msg_id, cell, timeout, task_poll_output_msg, task_poll_kernel_alive):
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - monotonic()
            if left is not None and left <= 0:  # the cell's own limit, handled as nbclient handles it
                task_poll_kernel_alive.cancel()
                await self._async_check_alive()
                reply = await self._async_handle_timeout(timeout, cell)  # raises unless interrupt_on_timeout
                if reply is not None:
                    reply["parent_header"] = {"msg_id": msg_id}
                    return reply
                deadline = None  # interrupted: wait for the interrupted cell's reply
                continue
            interval = self.shell_timeout_interval if left is None else min(self.shell_timeout_interval, left)
            try:
                msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=interval))
            except Empty:
                continue  # a fresh poll: a reply whose wake-up was missed is found now
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if self.record_timing:
                cell["metadata"]["execution"]["shell.execute_reply"] = timestamp(msg)
            try:
                await asyncio.wait_for(task_poll_output_msg, self.iopub_timeout)
            except (asyncio.TimeoutError, Empty):
                if self.raise_on_iopub_timeout:
                    task_poll_kernel_alive.cancel()
                    raise CellTimeoutError.error_from_timeout_and_cell(
                        "Timeout waiting for IOPub output", self.iopub_timeout, cell) from None
                self.log.warning("Timeout waiting for IOPub output")
            task_poll_kernel_alive.cancel()
            return msg
