"""A real IPython kernel driven cell by cell, for tests of notebook behaviour."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

__all__ = ["Cell", "Kernel"]


@dataclass
class Cell:
    """What one execute request produced."""

    msg_id: str
    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)
    """The ``text/plain`` of each execute_result and display_data."""
    error: tuple[str, str] | None = None
    """``(ename, evalue)`` if the cell raised."""
    status: str = ""
    """The execute_reply status: ``ok``, ``error`` or ``aborted``."""

    @property
    def text(self) -> str:
        """Everything the cell printed or displayed, in one string."""
        return self.stdout + "".join(self.results)


class Kernel:
    """A kernel started with the ``python3`` spec (this interpreter), shut down on exit.

    Messages of every cell are buffered by parent, so a test can interleave
    :meth:`start`, :meth:`wait_for_output` and :meth:`finish` freely.
    """

    def __init__(self, cwd: Path, *, timeout: float = 60) -> None:
        self.timeout = timeout
        # Unix sockets in the test's own directory, not TCP ports picked by binding port 0
        # and closing it: another process (a parallel test) could take one in between.
        self.manager = KernelManager(kernel_name="python3", transport="ipc", ip=str(cwd / "k"))
        self.manager.start_kernel(cwd=str(cwd))
        try:
            self.client: BlockingKernelClient = self.manager.client()
            self.client.start_channels()
            self.client.wait_for_ready(timeout=timeout)
        except BaseException:
            self.manager.shutdown_kernel(now=True)
            raise
        self._cells: dict[str, Cell] = {}
        self._idle: set[str] = set()
        self._replied: set[str] = set()

    def close(self) -> None:
        """Stop the channels and shut the kernel down."""
        try:
            self.client.stop_channels()
        finally:
            self.manager.shutdown_kernel(now=False)

    def __enter__(self) -> Kernel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def interrupt(self) -> None:
        """Interrupt the kernel as a frontend's Interrupt button does."""
        self.manager.interrupt_kernel()

    def start(self, code: str, *, stop_on_error: bool = True) -> str:
        """Send a cell for execution; return its message id."""
        msg_id: str = self.client.execute(code, stop_on_error=stop_on_error)
        self._cells[msg_id] = Cell(msg_id)
        return msg_id

    def run(self, code: str) -> Cell:
        """Execute a cell and return what it produced; fail if it raised."""
        cell = self.finish(self.start(code))
        assert cell.error is None, f"cell raised {cell.error}:\n{code}"
        return cell

    def wait_for_output(self, msg_id: str, text: str) -> Cell:
        """Block until the cell has printed ``text``."""
        cell = self._cells[msg_id]
        while text not in cell.stdout:
            assert msg_id not in self._idle, f"the cell finished without printing {text!r}"
            self._pump_iopub()
        return cell

    def finish(self, msg_id: str) -> Cell:
        """Block until the cell has finished: its outputs and its reply are in."""
        while msg_id not in self._idle:
            self._pump_iopub()
        while msg_id not in self._replied:
            self._pump_shell()
        return self._cells[msg_id]

    def _pump_iopub(self) -> None:
        try:
            msg: dict[str, Any] = self.client.get_iopub_msg(timeout=self.timeout)
        except queue.Empty:
            raise AssertionError(f"no kernel output for {self.timeout} s") from None
        cell = self._cells.get(msg["parent_header"].get("msg_id", ""))
        if cell is None:
            return
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                cell.stdout += content["text"]
            else:
                cell.stderr += content["text"]
        elif kind in ("execute_result", "display_data"):
            cell.results.append(content["data"].get("text/plain", ""))
        elif kind == "error":
            cell.error = (content["ename"], content["evalue"])
        elif kind == "status" and content["execution_state"] == "idle":
            self._idle.add(cell.msg_id)

    def _pump_shell(self) -> None:
        try:
            msg: dict[str, Any] = self.client.get_shell_msg(timeout=self.timeout)
        except queue.Empty:
            raise AssertionError(f"no kernel reply for {self.timeout} s") from None
        cell = self._cells.get(msg["parent_header"].get("msg_id", ""))
        if cell is not None:
            cell.status = msg["content"]["status"]
            self._replied.add(cell.msg_id)
