"""How the sandbox runs one tool call in a fresh, isolated, limited process (server side; no HTTP here).

Per call, :class:`Executor` gets a new process in new network, pid and mount namespaces, in its own session, with
an empty environment, and hands it the request on stdin (``_sandbox_runner.py`` says what happens inside). Two ways
to get that process, same result:

- default: a fork of the :class:`~mentor.tools.call_process.Zygote`, a ``python -I -S`` started once that never
  runs model code nor reads a request; the fork calls ``unshare(2)`` and forks the namespace's init (~5 ms of CPU
  per call here);
- ``--no-zygote``: ``unshare --net --pid --fork --kill-child --mount -- PYTHON -I -S -u _sandbox_runner.py``, a
  fresh interpreter per call (~15 ms).

What each layer enforces:

- network namespace: only a loopback that is down, so every connect fails (``Network is unreachable``), 127.0.0.1
  included; abstract unix sockets are per namespace too;
- pid namespace: the call sees only its own processes; when the runner (pid 1) exits, the kernel kills everything
  the call left behind (double forks and ``setsid`` included);
- mount namespace: ``/`` read-only for this call, a fresh size-limited tmpfs as ``/tmp`` (the working directory,
  owned by the call's uid, gone with the namespace), fresh ``/var/tmp`` and ``/dev/shm``, and an empty tmpfs over
  each hidden path (the repo, the server's working directory, ``$HOME``, ``--hide``);
- privileges: the call runs as a per-slot unprivileged uid/gid (``uid_base + slot``; no supplementary groups, no
  new privileges), so root-only files (``/etc/shadow``) are closed to it, ``RLIMIT_NPROC`` counts only this call's
  processes, and it cannot signal or ptrace the runner or other calls;
- rlimits: address space, CPU seconds, processes, open files, file size, no core files;
- the server: a wall-clock deadline per call (from the moment the call's code starts) that SIGKILLs the
  namespace's init (the process group without namespaces), stdout capped in bytes (the call is stopped past the cap), a bound on concurrent calls and queued ones.

Where namespaces are not available (not root, no ``unshare``, or the start-up probe fails) the executor falls back
to what it can still do and says so loudly (log + ``/health``): rlimits, the process-group kill and a temporary
working directory always; the privilege drop when root. Without the pid namespace a child that calls ``setsid``
outlives its call unless the privilege drop is on (then every process of the slot's uid is killed after the call).
"""

from __future__ import annotations

import ast
import asyncio
import collections
import logging
import marshal
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mentor.tools.call_process import RUNNER, SubprocessCall, Zygote, ZygoteCall, pipe_reader
from mentor.tools.sandbox_client import ExecResult

logger = logging.getLogger(__name__)

REPO = str(Path(__file__).resolve().parents[2])
STATUS_PREFIX = b"\x00sandbox-status "  # = _sandbox_runner.STATUS_PREFIX
UNSHARE_ARGS = ("--net", "--pid", "--fork", "--kill-child", "--mount")  # the runner mounts the new /proc itself


@dataclass(frozen=True)
class Limits:
    """Per-call limits. Sizes in MiB/bytes as named; the CPU limit is derived from each call's timeout."""

    memory_mib: int = 512
    """RLIMIT_AS of the call process (its children get the same, each)."""
    max_processes: int = 32
    """RLIMIT_NPROC: processes and threads of the call's uid (only enforced with the privilege drop)."""
    max_open_files: int = 64
    max_file_mib: int = 16
    """RLIMIT_FSIZE; also the size of the private /tmp, /var/tmp and /dev/shm (namespaces on)."""
    max_output_bytes: int = 65536
    """stdout+stderr of a call; past it the call is stopped and the output truncated. Also caps ``repr(result)``."""
    max_timeout_s: float = 30.0
    """A request's ``timeout`` is clamped to this."""
    startup_timeout_s: float = 10.0
    """Time a call's process may take to start (interpreter start-up under load) before it counts as hung."""

    def __post_init__(self) -> None:
        for name in ("memory_mib", "max_processes", "max_open_files", "max_file_mib", "max_output_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox limit {name} must be >= 1, got {getattr(self, name)}")
        if not self.max_timeout_s > 0:
            raise ValueError(f"sandbox limit max_timeout_s must be > 0, got {self.max_timeout_s}")

    def rlimits(self, timeout_s: float) -> dict[str, int]:
        """The runner's rlimit table for a call of ``timeout_s`` seconds (keys as in ``_sandbox_runner._RLIMITS``)."""
        return {"cpu_s": math.ceil(timeout_s) + 1, "as_bytes": self.memory_mib << 20, "nproc": self.max_processes,
                "nofile": self.max_open_files, "fsize_bytes": self.max_file_mib << 20, "core_bytes": 0}


@dataclass
class Isolation:
    """What the executor enforces on this machine (reported by ``GET /health``)."""

    namespaces: bool
    """net + pid + mount namespaces via ``unshare``."""
    drop_privileges: bool
    """run calls as ``uid_base + slot`` (needs root)."""
    python: str
    """the interpreter that runs calls; must be readable by the calls' uid."""
    uid_base: int = 200000
    hidden_paths: list[str] = field(default_factory=list)
    unshare: str | None = None
    nice: int = 5
    """added niceness of calls, so the server (and its event loop) wins the CPU over hostile calls."""
    zygote: bool = True
    """with namespaces: fork calls from a pre-started zygote instead of starting unshare + python per call."""
    sys_path: list[str] = field(default_factory=list)
    """directories appended to a call's sys.path (calls start with ``-S``: the standard library only)."""
    warnings: list[str] = field(default_factory=list)

    def enforced(self) -> dict[str, bool]:
        return {"fresh_process": True, "empty_environment": True, "rlimits": True, "process_group_kill": True,
                "wall_clock_timeout": True, "output_cap": True, "private_workdir": True,
                "network_namespace": self.namespaces, "pid_namespace": self.namespaces,
                "readonly_root_and_hidden_paths": self.namespaces, "privilege_drop": self.drop_privileges,
                "nproc_limit": self.drop_privileges}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Executor:
    """Runs calls concurrently, ``max_concurrency`` at a time and up to ``max_queue`` waiting; never raises for a call.

    Each running call owns a slot (0..max_concurrency-1), hence its own uid with the privilege drop.
    """

    def __init__(self, isolation: Isolation, limits: Limits = Limits(), max_concurrency: int = 8,
                 max_queue: int = 1024):
        if max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {max_concurrency}")
        self.isolation = isolation
        self.limits = limits
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._free_slots = list(range(max_concurrency))
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._running: set[SubprocessCall | ZygoteCall] = set()
        self._zygote = Zygote(isolation.python) if isolation.namespaces and isolation.zygote else None
        self._server_mnt_ns = os.stat("/proc/self/ns/mnt").st_ino if os.path.exists("/proc/self/ns/mnt") else -1
        self.counts: dict[str, int] = {}

    # --- one call -------------------------------------------------------------------------------------------

    async def run(self, env: str, call: str, timeout: float) -> ExecResult:
        """Run ``env`` then ``response = <call>`` in a fresh sandboxed process; the outcome, errors included."""
        timeout = min(max(float(timeout), 0.01), self.limits.max_timeout_s)
        if not self._free_slots and len(self._slot_waiters) >= self.max_queue:
            return self._count(ExecResult(status="refused", error=f"SandboxBusy: {len(self._slot_waiters)} calls "
                                          "are already waiting for the sandbox; this call was refused"))
        slot = await self._acquire_slot()
        try:
            return self._count(await self._run_in_slot(slot, env, call, timeout))
        finally:
            self._release_slot(slot)

    async def _acquire_slot(self) -> int:
        """A free slot, first come first served: a released slot goes straight to the longest waiter (asyncio's
        Semaphore lets a newcomer take it first, which starved some of 64 concurrent calls for seconds)."""
        if self._free_slots and not self._slot_waiters:
            return self._free_slots.pop()
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot(waiter.result())
            else:
                self._slot_waiters.remove(waiter)
            raise

    def _release_slot(self, slot: int) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free_slots.append(slot)

    def _count(self, result: ExecResult) -> ExecResult:
        self.counts[result.status] = self.counts.get(result.status, 0) + 1
        return result

    def _command(self) -> list[str]:
        runner = [self.isolation.python, "-I", "-S", "-u", RUNNER]
        return [self.isolation.unshare, *UNSHARE_ARGS, "--", *runner] if self.isolation.namespaces else runner

    def _request(self, slot: int, env: str, call: str, timeout: float, workdir: str) -> dict[str, Any]:
        iso, uid = self.isolation, (self.isolation.uid_base + slot if self.isolation.drop_privileges else None)
        return {"env": env, "call": call, "limits": self.limits.rlimits(timeout), "uid": uid, "gid": uid,
                "mounts": iso.namespaces, "server_mnt_ns": self._server_mnt_ns, "hide": iso.hidden_paths,
                "tmp_bytes": (self.limits.max_file_mib + 4) << 20, "workdir": workdir, "nice": iso.nice,
                "max_result_bytes": self.limits.max_output_bytes, "sys_path": iso.sys_path,
                "init_deadline_s": math.ceil(self.limits.startup_timeout_s + timeout + 5)}

    async def _start_call(self) -> SubprocessCall | ZygoteCall:
        if self._zygote is None:
            return SubprocessCall(await asyncio.create_subprocess_exec(
                *self._command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={}, cwd="/", start_new_session=True,
                limit=self._status_budget()))  # a status line carries repr(result): up to ~4 bytes per character
        (stdin_r, stdin_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
        try:
            pid = await self._zygote.spawn([stdin_r, out_w, err_w])
        except BaseException:
            for fd in (stdin_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, out_w, err_w):
                os.close(fd)
        return ZygoteCall(pid, stdin_w, await pipe_reader(out_r, 65536),
                           await pipe_reader(err_r, self._status_budget()))

    async def _run_in_slot(self, slot: int, env: str, call: str, timeout: float) -> ExecResult:
        iso = self.isolation
        uid = iso.uid_base + slot if iso.drop_privileges else None
        workdir = "/tmp" if iso.namespaces else tempfile.mkdtemp(prefix="mentor-sandbox-call-")
        if not iso.namespaces and uid is not None:
            os.chown(workdir, uid, uid)
        start = time.monotonic()
        try:
            proc = await self._start_call()
        except OSError as exc:
            if not iso.namespaces:
                shutil.rmtree(workdir, ignore_errors=True)
            return ExecResult(status="sandbox_error", error=f"SandboxError: cannot start the call process: {exc}")
        self._running.add(proc)
        try:
            return await self._supervise(proc, self._request(slot, env, call, timeout, workdir), timeout, start)
        finally:
            self._running.discard(proc)
            await self._kill(proc, uid)
            if not iso.namespaces:
                shutil.rmtree(workdir, ignore_errors=True)

    async def _supervise(self, proc: SubprocessCall | ZygoteCall, request: dict, timeout: float,
                         start: float) -> ExecResult:
        cap = self.limits.max_output_bytes
        ready, overflow = asyncio.Event(), asyncio.Event()
        statuses: list[dict] = []
        noise = bytearray()

        async def read_output() -> bytes:
            buf = bytearray()
            while chunk := await proc.stdout.read(65536):
                buf += chunk
                if len(buf) > cap:
                    overflow.set()
                    return bytes(buf[:cap])
            return bytes(buf)

        async def read_status() -> None:
            budget = self._status_budget()  # the call can write here too (the fd is inherited): bound what we keep
            try:
                while line := await proc.stderr.readline():
                    budget -= len(line)
                    if budget < 0:
                        overflow.set()
                        return
                    if line.startswith(STATUS_PREFIX):
                        try:
                            statuses.append(ast.literal_eval(line[len(STATUS_PREFIX):].decode()))
                        except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError):
                            noise.extend(line[:200])
                            continue
                        if isinstance(statuses[-1], dict) and statuses[-1].get("ready"):
                            ready.set()
                    elif len(noise) < 8192:
                        noise.extend(line[:4096])
            except ValueError:  # a line longer than the stream's limit
                overflow.set()

        output_task = asyncio.create_task(read_output())
        status_task = asyncio.create_task(read_status())
        exited = asyncio.create_task(proc.wait())
        stopped_for = None
        await proc.send(marshal.dumps(request))
        phases = ((ready, self.limits.startup_timeout_s, "startup"), (None, timeout, "timeout"))
        for gate, seconds, reason in phases:
            waits = [exited, asyncio.create_task(overflow.wait())]
            if gate is not None:
                waits.append(asyncio.create_task(gate.wait()))
            done, _ = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            for task in waits[1:]:
                task.cancel()
            if overflow.is_set():
                stopped_for = "output_limit"
                break
            if exited in done:
                break
            if not done:
                stopped_for = reason
                break
        if stopped_for is not None:
            self._stop(proc)
        await exited
        output = b""
        try:
            output = await asyncio.wait_for(output_task, 2.0)
            await asyncio.wait_for(status_task, 2.0)
        except asyncio.TimeoutError:  # only without the pid namespace: a leftover child still holds the pipes
            output_task.cancel()
            status_task.cancel()
        seconds = time.monotonic() - start
        if noise:
            logger.debug("sandbox runner stderr: %s", bytes(noise[:2000]).decode(errors="replace"))
        return self._interpret(output.decode("utf-8", errors="replace"), statuses, stopped_for, timeout, seconds,
                               proc.returncode, bytes(noise).decode(errors="replace"))

    def _status_budget(self) -> int:
        return 8 * self.limits.max_output_bytes + 65536

    def _interpret(self, output: str, statuses: list[dict], stopped_for: str | None, timeout: float,
                   seconds: float, returncode: int | None, noise: str) -> ExecResult:
        """The call's statuses -> the ExecResult the model sees."""
        final = {k: v for s in statuses if isinstance(s, dict) for k, v in s.items()}
        cap = self.limits.max_output_bytes
        if stopped_for == "timeout":
            return ExecResult(output=output, status="timeout", seconds=seconds,
                              error=f"TimeoutError: the call did not finish within {timeout:g} s and was killed")
        if stopped_for == "output_limit":
            return ExecResult(output=output + f"\n[output truncated at {cap} bytes]", status="output_limit",
                              seconds=seconds, error=f"OutputLimitExceeded: the call printed more than {cap} bytes "
                                                     "and was stopped")
        if "result" in final or "error" in final:
            error = final.get("error")
            status = "ok" if error is None else "memory" if error.startswith("MemoryError") else "error"
            return ExecResult(output=output, result=final.get("result"), error=error, status=status, seconds=seconds)
        if "setup_error" in final or stopped_for == "startup" or not statuses:
            if "setup_error" in final:
                why = final["setup_error"]
            elif stopped_for == "startup":
                why = f"the call process did not start within {self.limits.startup_timeout_s:g} s"
            else:
                why = f"the sandbox runner ended with status {returncode}: {noise[-500:]}"
            why = str(why)[:1000]  # the call can write to the status channel too: keep logs bounded
            logger.warning("sandbox set-up failure: %s", why)
            return ExecResult(output=output, status="sandbox_error", seconds=seconds, error=f"SandboxError: {why}")
        if "signal" in final:
            name = _signal_name(final["signal"])
            hint = {"SIGKILL": " (killed: CPU time limit, out of memory, or by itself)", "SIGXCPU": " (CPU time limit)",
                    "SIGSEGV": " (segmentation fault)", "SIGABRT": " (aborted)", "SIGBUS": " (bus error)"}.get(name, "")
            return ExecResult(output=output, status="crash", seconds=seconds,
                              error=f"the call crashed: {name}{hint}")
        if final.get("init_timeout"):
            return ExecResult(output=output, status="timeout", seconds=seconds,
                              error=f"TimeoutError: the call did not finish within {timeout:g} s and was killed")
        return ExecResult(output=output, status="crash", seconds=seconds,
                          error=f"the call exited with status {final.get('exit')} before returning")

    # --- killing ----------------------------------------------------------------------------------------------

    @staticmethod
    def _killpg(proc: SubprocessCall | ZygoteCall) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _stop(self, proc: SubprocessCall | ZygoteCall) -> None:
        """Stop a running call. With namespaces, SIGKILL the namespace's init (the child of ``proc``): the kernel
        then kills everything in the namespace and ``proc``, which waits for the init, exits once all of it is gone.
        Killing the whole group at once would orphan the init to the host's pid 1, whose reaping we would wait for.
        """
        if self.isolation.namespaces:
            try:
                inits = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            except (OSError, ValueError):
                inits = []
            for pid in inits:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if inits:
                return
        self._killpg(proc)

    async def _kill(self, proc: SubprocessCall | ZygoteCall, uid: int | None) -> None:
        """After a call: nothing of it may survive. With the pid namespace that already holds once ``proc`` exited
        (it outlives the namespace's init); otherwise kill the process group and, with the privilege drop, every
        process of the slot's uid."""
        if proc.returncode is None:
            self._stop(proc)
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except asyncio.TimeoutError:
                self._killpg(proc)
                await proc.wait()
        # the group empties only once every process of it is released (a killed init may still be tearing down)
        for _ in range(400):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            await asyncio.sleep(0.005)
        if not self.isolation.namespaces and uid is not None and uid_has_processes(uid):
            await kill_uid(self.isolation.python, uid)

    async def close(self) -> None:
        """Kill every running call (server shutdown)."""
        for proc in list(self._running):
            self._killpg(proc)
        if self._zygote is not None:
            self._zygote.close()

    def stats(self) -> dict[str, Any]:
        return {"running": len(self._running), "waiting": len(self._slot_waiters), "calls": dict(self.counts)}


def uid_has_processes(uid: int) -> bool:
    """Whether any process of ``uid`` is alive (a scan of /proc; ~1 ms)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    return True
            except FileNotFoundError:
                continue
    return False


async def kill_uid(python: str, uid: int) -> None:
    """SIGKILL every process of ``uid``: a throw-away process becomes that uid and calls ``kill(-1, SIGKILL)``."""
    code = (f"import os, signal; os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); "
            f"os.setresuid({uid}, {uid}, {uid}); os.kill(-1, signal.SIGKILL)")
    proc = await asyncio.create_subprocess_exec(python, "-I", "-S", "-c", code, env={}, cwd="/",
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await proc.wait()


# --- choosing the isolation on this machine -----------------------------------------------------------------------

_PROBE_ENV = '''
import os, socket
def probe():
    try:
        socket.create_connection(("127.0.0.1", 9), timeout=1).close()
        net = "open"
    except OSError as exc:
        net = type(exc).__name__
    import json, math, fractions, decimal  # lazily loaded stdlib must be readable as the call's uid
    return {"uid": os.getuid(), "pid": os.getpid(), "net": net, "cwd": os.getcwd(),
            "repo": os.access(REPO, os.R_OK)}
'''


async def _probe(isolation: Isolation) -> tuple[bool, str]:
    executor = Executor(isolation, Limits(), max_concurrency=1)
    try:
        res = await executor.run(f"REPO = {REPO!r}\n" + _PROBE_ENV, "probe()", timeout=10)
    finally:
        await executor.close()
    if res.status != "ok":
        return False, f"{res.status}: {res.error} {res.output[-300:]}"
    info = ast.literal_eval(res.result)
    checks = {"net": info["net"] != "open" or not isolation.namespaces,
              "pid": info["pid"] == 2 or not isolation.namespaces,
              "uid": info["uid"] == isolation.uid_base or not isolation.drop_privileges,
              "repo": not info["repo"] or not isolation.namespaces}
    failed = [k for k, ok in checks.items() if not ok]
    return not failed, f"probe {info}: failed checks {failed}" if failed else "ok"


def default_hidden_paths() -> list[str]:
    """The repo, the server's working directory and home: tool code has no business reading them."""
    paths = [REPO, os.getcwd(), os.path.expanduser("~")]
    return sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p) and os.path.realpath(p) != "/"})


def choose_isolation(python: str | None = None, namespaces: bool = True, uid_base: int = 200000,
                     hide: list[str] | None = None, nice: int = 5, sys_path: list[str] | None = None,
                     zygote: bool = True) -> Isolation:
    """The strongest isolation that works here, checked by running a probe call in it; warns about what is missing.

    ``python``: the interpreter for calls (default: this one if the calls' uid can run it, else /usr/bin/python3).
    """
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    hidden = default_hidden_paths() + [os.path.realpath(p) for p in hide or []]
    candidates = [python] if python else list(dict.fromkeys([os.path.realpath(sys.executable), "/usr/bin/python3"]))
    candidates = [c for c in candidates if c and os.path.exists(c)]
    if not candidates:
        raise RuntimeError(f"no interpreter for sandbox calls: {python!r} does not exist (flag --python)")
    wanted = []  # (namespaces, privilege drop, zygote), strongest and fastest first
    if namespaces and root and unshare and sys.platform.startswith("linux"):
        wanted += [(True, True, True)] * (zygote and hasattr(os, "pidfd_open")) + [(True, True, False)]
    if root:
        wanted.append((False, True, False))
    wanted.append((False, False, False))
    failures = []
    for use_ns, drop, use_zygote in wanted:
        for interpreter in candidates:
            inside = [p for p in hidden if (interpreter + "/").startswith(p.rstrip("/") + "/")]
            if use_ns and inside and not python:  # e.g. a venv copied into the repo: prefer an interpreter outside
                failures.append(f"python={interpreter}: inside the hidden path(s) {inside}")
                continue
            if use_ns and inside:
                logger.warning("--python %s lies inside %s: those paths stay visible to calls", interpreter, inside)
            hidden_here = [p for p in hidden if p not in inside]
            iso = Isolation(namespaces=use_ns, drop_privileges=drop, python=interpreter, uid_base=uid_base,
                            hidden_paths=hidden_here if use_ns else [], unshare=unshare if use_ns else None, nice=nice,
                            sys_path=list(sys_path or []), zygote=use_zygote)
            ok, why = asyncio.run(_probe(iso))
            if ok:
                iso.warnings = _warnings(iso, namespaces, root, unshare, failures)
                for warning in iso.warnings:
                    logger.warning("SANDBOX ISOLATION REDUCED: %s", warning)
                return iso
            failures.append(f"namespaces={use_ns} drop_privileges={drop} zygote={use_zygote} python={interpreter}: "
                            f"{why}")
    raise RuntimeError("the sandbox cannot run a call on this machine:\n" + "\n".join(failures))


def _warnings(iso: Isolation, wanted_ns: bool, root: bool, unshare: str | None, failures: list[str]) -> list[str]:
    out = []
    if not iso.namespaces:
        reason = ("disabled by --no-namespaces" if not wanted_ns else "not root" if not root
                  else "unshare not found" if not unshare else "the namespace probe failed")
        out.append(f"no network/pid/mount namespaces ({reason}): calls can use the network, see host processes, "
                   "read world-readable files (the repo included) and write world-writable ones")
    if not iso.drop_privileges:
        out.append("calls run as this server's uid: RLIMIT_NPROC counts all of its processes, calls can read "
                   "everything it can, and a child that calls setsid can outlive its call")
    if out:
        out += [f"probe failure: {f}" for f in failures]
    else:
        for f in failures:
            logger.info("sandbox configuration rejected: %s", f)
    return out


def describe(iso: Isolation, limits: Limits) -> dict[str, Any]:
    return {"isolation": asdict(iso), "enforced": iso.enforced(), "limits": asdict(limits)}
