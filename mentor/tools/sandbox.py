"""The tool sandbox server: the official MENTOR ``/execute`` API, with every call isolated.

    python -m mentor.tools.sandbox --host 127.0.0.1 --port P [--max-concurrency N]

serves until SIGTERM:

- ``POST /execute {"env": str, "call": str, "timeout": float = 5}`` -> ``{"output", "result", "error", "status",
  "seconds"}``. ``env`` is the Python source of the row's tools, ``call`` is ``name(k=repr(v), ...)``; the server
  runs ``env`` and then ``response = <call>`` in a fresh sandboxed process (:mod:`mentor.tools.isolation`).
  ``output`` is what the call printed (stdout and stderr, capped), ``result`` is ``repr(response)`` (None when
  it is None), ``error`` the exception as ``"Type: message"`` or why the sandbox stopped the call (timeout, memory,
  crash, output limit). ``status`` and ``seconds`` are ours; official clients ignore them. A call's outcome is
  always HTTP 200; 422 means a malformed request.
- ``GET /health`` -> ``{"status": "ok", "isolation", "enforced", "limits", "max_concurrency", "running", ...}``.

How it departs from the official ``scripts/serving/sandbox.py``: that server ``exec``s the model's code inside its
own process (no isolation; its ``timeout`` is ignored; a slow call blocks every other one) and listens on 0.0.0.0.
This one never runs model code in-process, honours ``timeout`` (clamped to ``--max-timeout``), runs calls
concurrently up to ``--max-concurrency``, refuses calls past ``--max-queue`` waiting ones, and binds the host you
give it (127.0.0.1 for the trainer). ``result`` is ``repr`` of the value (the official one returns the value
itself as JSON); error messages carry the exception type.

``--port 0`` binds a free port; ``--port-file F`` writes the bound port to F once listening (how
:class:`mentor.tools.sandbox_client.LocalSandbox` avoids port races). ``--parent-pid PID`` makes the server exit
when that process dies (how a trainer crash cannot leave it behind).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from mentor.tools.isolation import Executor, Limits, choose_isolation, describe

logger = logging.getLogger("mentor.tools.sandbox")

MAX_SOURCE_CHARS = 1 << 20  # env / call size a request may carry
_PR_SET_PDEATHSIG = 1


class ExecuteRequest(BaseModel):
    """The official request body."""

    env: str = Field("", max_length=MAX_SOURCE_CHARS, description="Python source that defines the tools")
    call: str = Field(..., max_length=MAX_SOURCE_CHARS, description="the call, e.g. add(a=1, b=2)")
    timeout: float = Field(5.0, gt=0, description="seconds; clamped to the server's --max-timeout")


def create_app(executor: Executor, parent_pid: int | None = None) -> FastAPI:
    """The FastAPI app around one :class:`Executor`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watchdog = asyncio.create_task(_watch_parent(parent_pid)) if parent_pid else None
        yield
        if watchdog is not None:
            watchdog.cancel()
        await executor.close()

    app = FastAPI(title="mentor tool sandbox", lifespan=lifespan)

    @app.post("/execute")
    async def execute(request: ExecuteRequest) -> dict[str, Any]:
        return (await executor.run(request.env, request.call, request.timeout)).to_json()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **describe(executor.isolation, executor.limits),
                "max_concurrency": executor.max_concurrency, "max_queue": executor.max_queue, **executor.stats()}

    return app


async def _watch_parent(parent_pid: int) -> None:
    """Exit (SIGTERM to ourselves: uvicorn's graceful shutdown) once the process that started us is gone."""
    while True:
        if os.getppid() != parent_pid:
            logger.warning("parent process %d is gone: shutting the sandbox down", parent_pid)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        await asyncio.sleep(0.5)


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        logger.warning("PR_SET_PDEATHSIG unavailable; relying on the parent watchdog")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(f"parent process {parent_pid} is already gone")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mentor.tools.sandbox", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; never expose it)")
    p.add_argument("--port", type=int, default=8123, help="port to bind; 0 = a free one (see --port-file)")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--max-concurrency", type=int, default=max(2, 2 * (os.cpu_count() or 1)),
                   help="calls running at once (default 2 x cores)")
    p.add_argument("--max-queue", type=int, default=1024, help="calls waiting for a slot before new ones are refused")
    p.add_argument("--max-timeout", type=float, default=30.0, help="upper bound on a request's timeout, seconds")
    p.add_argument("--memory-mib", type=int, default=512, help="address-space limit per call process")
    p.add_argument("--max-processes", type=int, default=32, help="processes + threads per call")
    p.add_argument("--max-open-files", type=int, default=64)
    p.add_argument("--max-file-mib", type=int, default=16, help="largest file a call may write; size of its /tmp")
    p.add_argument("--max-output-bytes", type=int, default=65536, help="stdout+stderr per call; past it: stopped")
    p.add_argument("--python", help="interpreter for calls (default: this one if the calls' uid can run it, "
                                    "else /usr/bin/python3)")
    p.add_argument("--sys-path", action="append", default=[],
                   help="directory added to calls' sys.path, e.g. a site-packages the calls' uid can read (repeatable; "
                        "calls start with python -I -S: the standard library only)")
    p.add_argument("--uid-base", type=int, default=200000, help="calls run as uid/gid uid_base + slot (root only)")
    p.add_argument("--hide", action="append", default=[], help="extra directory calls must not see (repeatable)")
    p.add_argument("--nice", type=int, default=5, help="niceness added to calls so the server stays responsive")
    p.add_argument("--no-namespaces", action="store_true", help="skip unshare (weaker; for debugging)")
    p.add_argument("--no-zygote", action="store_true",
                   help="start unshare + a fresh interpreter per call instead of forking a pre-started zygote")
    p.add_argument("--parent-pid", type=int, help="exit when this process is no longer our parent")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    limits = Limits(memory_mib=args.memory_mib, max_processes=args.max_processes, max_open_files=args.max_open_files,
                    max_file_mib=args.max_file_mib, max_output_bytes=args.max_output_bytes,
                    max_timeout_s=args.max_timeout)
    isolation = choose_isolation(python=args.python, namespaces=not args.no_namespaces, uid_base=args.uid_base,
                                 hide=args.hide, nice=args.nice, sys_path=args.sys_path, zygote=not args.no_zygote)
    executor = Executor(isolation, limits, max_concurrency=args.max_concurrency, max_queue=args.max_queue)
    enforced = isolation.enforced()
    logger.info("sandbox isolation: %s; not enforced: %s; calls run with %s",
                ", ".join(k for k, v in enforced.items() if v), ", ".join(k for k, v in enforced.items() if not v)
                or "-", isolation.python)

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(executor, args.parent_pid), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3, backlog=1024)
    server = uvicorn.Server(config)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    logger.info("sandbox listening on http://%s:%d (max concurrency %d)", args.host, port, args.max_concurrency)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
