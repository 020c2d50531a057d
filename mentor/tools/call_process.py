"""The process behind one sandboxed call, as the :class:`~mentor.tools.isolation.Executor` sees it: a pid that leads
its process group, the call's stdout and status pipes, a way to send the request and to wait for the end.

- :class:`SubprocessCall`: ``[unshare ...] python -I -S -u _sandbox_runner.py`` started per call by asyncio;
- :class:`ZygoteCall`: a fork of the :class:`Zygote`; its end is awaited through a pidfd (it is not our child).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

RUNNER = str(Path(__file__).resolve().with_name("_sandbox_runner.py"))


class SubprocessCall:
    """A call started as ``[unshare ...] python runner`` by asyncio; killed through its process group."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc, self.pid = proc, proc.pid
        self.stdout, self.stderr = proc.stdout, proc.stderr

    async def send(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
            self.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass

    async def wait(self) -> None:
        await self.proc.wait()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


class ZygoteCall:
    """A call forked by the :class:`Zygote`; ``pid`` leads its process group (it called setsid)."""

    def __init__(self, pid: int, stdin_fd: int, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader):
        self.pid, self._stdin_fd, self.stdout, self.stderr = pid, stdin_fd, stdout, stderr
        self.returncode: int | None = None
        self._exited: asyncio.Future | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone
            self._pidfd = None

    async def send(self, data: bytes) -> None:
        fd, view = self._stdin_fd, memoryview(data)
        os.set_blocking(fd, False)
        try:
            while view:
                view = view[os.write(fd, view):]
        except BlockingIOError:  # bigger than the pipe: finish in a thread, blocking
            await asyncio.to_thread(_write_blocking, fd, bytes(view))
            return
        except (BrokenPipeError, ConnectionResetError):
            pass
        os.close(fd)

    async def wait(self) -> None:
        """Until the forked process exits; it waits for the namespace's init, so then the whole call is gone."""
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if self._pidfd is None:
                self._exited.set_result(None)
            else:
                asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)
        await asyncio.shield(self._exited)
        self.returncode = 0

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        if not self._exited.done():
            self._exited.set_result(None)


def _write_blocking(fd: int, data: bytes) -> None:
    try:
        os.set_blocking(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        os.close(fd)


async def pipe_reader(fd: int, limit: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader


class Zygote:
    """A pristine ``python -I -S`` process (the runner with ``--zygote``) that forks one process per call.

    Starting a fresh interpreter, ``unshare`` and ctypes per call costs ~15 ms of CPU; a fork of this process costs
    a few. The zygote never runs model code and never sees a request: the server sends it only the three pipe ends
    of a call (SCM_RIGHTS over a socketpair); the fork makes its own namespaces, becomes their init's parent and
    reads the request from its stdin, as the unshare path does.
    """

    def __init__(self, python: str):
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._lock: asyncio.Lock | None = None

    def _start(self) -> None:
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([self.python, "-I", "-S", "-u", RUNNER, "--zygote", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env={}, cwd="/", stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        ours.setblocking(False)
        self.sock = ours

    async def spawn(self, fds: list[int]) -> int:
        """Fork a call with ``fds`` as its stdin/stdout/stderr; its pid (= process group). A dead zygote is replaced
        (once per call)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        answer = b""
        async with self._lock:  # one request at a time: the answers come back in order
            for _ in range(2):
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                try:
                    socket.send_fds(self.sock, [b"c"], fds)
                    answer = await asyncio.get_running_loop().sock_recv(self.sock, 16)
                except OSError:
                    answer = b""
                if len(answer) == 4 and int.from_bytes(answer, "little") > 0:
                    return int.from_bytes(answer, "little")
                logger.warning("the sandbox zygote did not answer (%r); starting a new one", answer)
                self.proc.kill()
                self.close()
        raise OSError(f"the sandbox zygote did not fork (answer {answer!r})")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()  # the zygote reads EOF and exits
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
