"""Clients of the tool sandbox: our server (:class:`SandboxClient`), a remote Sandbox Fusion
(:class:`SandboxFusionClient`), and :class:`LocalSandbox`, which runs our server as a child process for the length
of a ``with`` block.

``open_sandbox(url, kind)`` is what a trainer calls: an external server when ``url`` is set, else a local one.

Both clients answer ``execute(env, call, timeout) -> ExecResult`` (and ``aexecute`` / ``execute_many``), so the tool
loop does not care which one it talks to. They never raise for a failed *call*: an unreachable server, an HTTP error
or a client-side timeout come back as an :class:`ExecResult` whose ``error`` the model reads, with ``status`` telling
the metrics what happened. ``health()`` does raise: it is for start-up checks.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import httpx

logger = logging.getLogger(__name__)

# the statuses an ExecResult can carry; "ok" and "error" are normal outcomes, the others are the sandbox stopping a call
STATUSES = ("ok", "error", "timeout", "memory", "crash", "output_limit", "refused", "sandbox_error")


@dataclass
class ExecResult:
    """One tool call's outcome, the official ``/execute`` reply plus two fields of ours.

    output: what the call printed (stdout and stderr), capped in bytes by the server.
    result: ``repr`` of the call's return value, or None when it returned None or failed.
    error: the exception (``"ZeroDivisionError: division by zero"``) or why the sandbox stopped the call, or None.
    status: one of :data:`STATUSES`.
    seconds: wall time of the call on the server (0 when it never got there).
    """

    output: str = ""
    result: str | None = None
    error: str | None = None
    status: str = "ok"
    seconds: float = 0.0

    def text(self) -> str:
        """What the model reads: ``result: \\n..`` / ``output: \\n..`` / ``error: \\n..``, parts present only when
        non-empty, stripped (the official client's format)."""
        parts = [(label, value) for label, value in (("result", self.result), ("output", self.output),
                                                      ("error", self.error)) if value]
        return "".join(f"{label}: \n{value}\n" for label, value in parts).strip()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExecResult:
        return cls(output=data.get("output") or "", result=None if data.get("result") is None else str(data["result"]),
                   error=data.get("error"), status=data.get("status") or ("error" if data.get("error") else "ok"),
                   seconds=float(data.get("seconds") or 0.0))


def _failed(status: str, message: str) -> ExecResult:
    return ExecResult(error=message, status=status)


class _BaseClient:
    """Shared plumbing: one pooled sync ``httpx.Client``, one ``httpx.AsyncClient`` per event loop, and transport
    failures turned into ExecResults. Subclasses say where to post (``_request``) and how to read a reply
    (``_decode``)."""

    service = "the sandbox"

    def __init__(self, url: str, http_slack_s: float = 30.0, max_connections: int = 16):
        """``max_connections``: the connection pool's size; more than the server's ``--max-concurrency`` buys nothing
        (calls past it wait on the server) and costs client CPU (httpx's pool: ~5 ms per call at 64 vs ~1 at 16)."""
        self.url = url.rstrip("/")
        self.http_slack_s = http_slack_s
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._sync = httpx.Client(limits=self._limits, timeout=None)
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())
        self._max_connections = max_connections

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = self._async[loop] = httpx.AsyncClient(limits=self._limits, timeout=None)
        return client

    def _request(self, env: str, call: str, timeout: float) -> tuple[str, dict, Any]:
        """(path, JSON body, context for ``_decode``)."""
        raise NotImplementedError

    def _decode(self, response: httpx.Response, context: Any, timeout: float) -> ExecResult:
        raise NotImplementedError

    def _transport_error(self, exc: httpx.HTTPError, timeout: float) -> ExecResult:
        if isinstance(exc, httpx.TimeoutException):
            return _failed("timeout", f"TimeoutError: no answer from {self.service} within "
                                      f"{timeout + self.http_slack_s:g} s")
        return _failed("sandbox_error", f"SandboxError: cannot reach {self.service} at {self.url}: {exc!r}")

    def _http_error(self, response: httpx.Response) -> ExecResult | None:
        if response.status_code == 200:
            return None
        return _failed("sandbox_error", f"SandboxError: HTTP {response.status_code} from {self.service}: "
                                        f"{response.text[:500]}")

    def execute(self, env: str, call: str, timeout: float = 5.0) -> ExecResult:
        """Run one call; never raises for the call's or the transport's failures."""
        path, body, context = self._request(env, call, timeout)
        try:
            response = self._sync.post(self.url + path, json=body, timeout=timeout + self.http_slack_s)
        except httpx.HTTPError as exc:
            return self._transport_error(exc, timeout)
        return self._http_error(response) or self._decode(response, context, timeout)

    async def aexecute(self, env: str, call: str, timeout: float = 5.0) -> ExecResult:
        path, body, context = self._request(env, call, timeout)
        try:
            response = await self._aclient().post(self.url + path, json=body, timeout=timeout + self.http_slack_s)
        except httpx.HTTPError as exc:
            return self._transport_error(exc, timeout)
        return self._http_error(response) or self._decode(response, context, timeout)

    def execute_many(self, calls: Sequence[tuple[str, str]], timeout: float = 5.0) -> list[ExecResult]:
        """Run ``(env, call)`` pairs concurrently (threads over the pooled sync client); results in input order."""
        if not calls:
            return []
        with ThreadPoolExecutor(max_workers=min(len(calls), self._max_connections)) as pool:
            return list(pool.map(lambda ec: self.execute(ec[0], ec[1], timeout), calls))

    def close(self) -> None:
        self._sync.close()


class SandboxClient(_BaseClient):
    """Client of our sandbox server (and of the official ``scripts/serving/sandbox.py``: same ``/execute`` API).

        client = SandboxClient("http://127.0.0.1:8123")
        client.execute("def add(a, b):\\n    return a + b", "add(a=1, b=2)").text()   # 'result: \\n3'
    """

    def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        response = self._sync.get(self.url + "/health", timeout=timeout_s)
        response.raise_for_status()
        return response.json()

    def _request(self, env: str, call: str, timeout: float) -> tuple[str, dict, Any]:
        return "/execute", {"env": env, "call": call, "timeout": timeout}, None

    def _decode(self, response: httpx.Response, context: Any, timeout: float) -> ExecResult:
        try:
            return ExecResult.from_json(response.json())
        except ValueError as exc:
            return _failed("sandbox_error", f"SandboxError: unreadable reply from the sandbox: {exc}")


# The program a Sandbox Fusion run executes: the tools' source and the call travel as string literals and are
# exec'd exactly as our runner does; the outcome is printed after a per-call random tag so prints cannot fake it.
_FUSION_DRIVER = '''\
import sys as _sys
_ns = {{}}
_result = _error = None
try:
    exec(compile({env!r}, "<env>", "exec"), _ns)
    exec(compile("response = " + {call!r}, "<call>", "exec"), _ns)
    if _ns.get("response") is not None:
        _result = repr(_ns["response"])[:{cap}]
except BaseException as _exc:
    import traceback as _tb
    _error = "".join(_tb.format_exception_only(type(_exc), _exc)).strip()
_sys.stdout.flush()
_sys.stderr.flush()
_sys.stdout.write("\\n" + {tag!r} + repr({{"result": _result, "error": _error}}) + "\\n")
'''


class SandboxFusionClient(_BaseClient):
    """The same interface over a remote Sandbox Fusion service (bytedance/SandboxFusion, the one verl uses).

    Each call becomes one ``POST {url}/run_code`` with ``language="python"``, ``run_timeout=timeout`` and
    ``memory_limit_MB``; the call is wrapped in a small driver (``_FUSION_DRIVER``) that execs ``env`` and
    ``response = <call>`` and prints the outcome after a random tag. Isolation is whatever that service enforces.
    """

    service = "Sandbox Fusion"

    def __init__(self, url: str, memory_limit_mb: int = 512, max_result_chars: int = 65536, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.memory_limit_mb = memory_limit_mb
        self.max_result_chars = max_result_chars

    def _request(self, env: str, call: str, timeout: float) -> tuple[str, dict, Any]:
        tag = f"<<sandbox-result-{secrets.token_hex(8)}>>"
        code = _FUSION_DRIVER.format(env=env, call=call, tag=tag, cap=self.max_result_chars)
        return "/run_code", {"code": code, "language": "python", "run_timeout": timeout, "compile_timeout": timeout,
                             "memory_limit_MB": self.memory_limit_mb}, tag

    def _decode(self, response: httpx.Response, tag: Any, timeout: float) -> ExecResult:
        """Sandbox Fusion's ``RunCodeResponse`` -> ExecResult (its statuses: Success / Failed / SandboxError; the
        run's own: Finished / TimeLimitExceeded / Error)."""
        data = response.json()
        run = data.get("run_result") or {}
        stdout, stderr = run.get("stdout") or "", run.get("stderr") or ""
        seconds = float(run.get("execution_time") or 0.0)
        if data.get("status") == "SandboxError":
            return ExecResult(error=f"SandboxError: {data.get('message') or stderr[-500:]}", status="sandbox_error",
                              seconds=seconds)
        head, found, tail = stdout.rpartition("\n" + tag)
        output = (head if found else stdout) + stderr
        if run.get("status") == "TimeLimitExceeded":
            return ExecResult(output=output, error=f"TimeoutError: the call did not finish within {timeout:g} s "
                                                   "and was killed", status="timeout", seconds=seconds)
        if not found:
            return ExecResult(output=output, status="crash", seconds=seconds,
                              error=f"the call ended without returning (exit status {run.get('return_code')})")
        outcome = ast.literal_eval(tail.strip())
        error = outcome["error"]
        status = "ok" if error is None else "memory" if error.startswith("MemoryError") else "error"
        return ExecResult(output=output, result=outcome["result"], error=error, status=status, seconds=seconds)


class LocalSandbox:
    """Our sandbox server as a child process on 127.0.0.1 for the length of a ``with`` block.

        with LocalSandbox(max_concurrency=16) as sandbox:
            sandbox.client.execute(env, "add(a=1, b=2)")

    The server binds a free port chosen by the OS (``--port 0``) and writes it to a file, so there is no race for
    the port; ``start`` returns once ``/health`` answers. It is stopped (SIGTERM to its process group, SIGKILL after
    ``stop_timeout_s``) by ``stop``, at interpreter exit (atexit), and — when this process dies without running
    either (SIGKILL, segfault) — by the server itself: it is started with ``--parent-pid`` and exits when it is
    orphaned (PR_SET_PDEATHSIG plus a parent watchdog). PR_SET_PDEATHSIG fires when the *thread* that started the
    server exits, so call ``start`` from a thread that lives as long as the sandbox is needed (the main thread).
    """

    def __init__(self, max_concurrency: int | None = None, extra_args: Iterable[str] = (),
                 startup_timeout_s: float = 60.0, stop_timeout_s: float = 5.0, log_path: str | None = None):
        self.max_concurrency = max_concurrency
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.client: SandboxClient | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def command(self, port_file: str) -> list[str]:
        cmd = [sys.executable, "-m", "mentor.tools.sandbox", "--host", "127.0.0.1", "--port", "0",
               "--port-file", port_file, "--parent-pid", str(os.getpid())]
        if self.max_concurrency:
            cmd += ["--max-concurrency", str(self.max_concurrency)]
        return cmd + self.extra_args

    def start(self) -> LocalSandbox:
        self._tmp = tempfile.TemporaryDirectory(prefix="mentor-sandbox-")
        port_file = os.path.join(self._tmp.name, "port")
        log = open(self.log_path or os.path.join(self._tmp.name, "server.log"), "ab")
        repo = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(self.command(port_file), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=env, start_new_session=True)
        log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the sandbox server exited with status {self.proc.returncode} during start-up; "
                                   f"its log:\n{self.log_tail()}")
            port = Path(port_file).read_text().strip() if os.path.exists(port_file) else ""
            if port.isdigit():
                self.url = f"http://127.0.0.1:{port}"
                client = SandboxClient(self.url, max_connections=self.max_concurrency or 16)
                try:
                    self.health = client.health(timeout_s=2.0)
                    self.client = client
                    return self
                except httpx.HTTPError:
                    client.close()
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the sandbox server did not answer /health within {self.startup_timeout_s:g} s; "
                           f"its log:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        path = self.log_path or (os.path.join(self._tmp.name, "server.log") if self._tmp else None)
        try:
            return Path(path).read_text(errors="replace")[-chars:] if path else ""
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if self.client is not None:
            self.client.close()
            self.client = None
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass

    def __enter__(self) -> LocalSandbox:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def open_sandbox(url: str | None = None, kind: str = "mentor", max_concurrency: int | None = None,
                 extra_args: Iterable[str] = ()) -> Iterator[SandboxClient | SandboxFusionClient]:
    """The trainer's entry point: a client for ``url`` (an external server; ``kind`` "mentor" = our ``/execute``
    API or the official one, "fusion" = Sandbox Fusion), or, with no url, a :class:`LocalSandbox` for the block."""
    if url:
        if kind not in ("mentor", "fusion"):
            raise ValueError(f"sandbox kind must be 'mentor' or 'fusion', got {kind!r}")
        client = SandboxClient(url) if kind == "mentor" else SandboxFusionClient(url)
        try:
            yield client
        finally:
            client.close()
        return
    with LocalSandbox(max_concurrency=max_concurrency, extra_args=extra_args) as box:
        yield box.client
