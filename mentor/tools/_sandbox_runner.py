"""One sandboxed tool call. Run by :mod:`mentor.tools.isolation`, never imported by it. Two ways in:

    unshare --net --pid --fork --kill-child --mount -- python -I -S -u _sandbox_runner.py < request   (per call)
    python -I -S -u _sandbox_runner.py --zygote FD                                                     (once)

The zygote (:func:`zygote`) forks once per call; the fork does what ``unshare --fork --kill-child`` does (new
session and namespaces, the init as its child, dying together) and the init reads the request from stdin as in the
per-call path. Standard library only, and only modules that load fast: it runs under whichever interpreter the
server chose for calls (``--python``), which need not have mentor installed. The request (a ``marshal``-ed dict on
stdin: no json/re import) carries ``env``, ``call`` and the limits the server computed
(``mentor.tools.isolation.Executor._request``).

Two processes:

- the **init** (pid 1 of the fresh pid namespace when namespaces are on, root): reads the request, makes the
  filesystem view private (its own ``/proc``, read-only ``/``, fresh size-limited tmpfs on ``/tmp``, ``/var/tmp``
  and ``/dev/shm``, empty tmpfs over the hidden paths such as the repo), forks the call process, waits for it and
  reports how it ended. It runs no model code. When it exits the kernel kills whatever the call left in the namespace.
- the **call** process: lowers its rlimits, drops to the slot's unprivileged uid/gid (no groups, no new privileges),
  moves into the private working directory, says "ready", then ``exec``s ``env`` and ``response = <call>`` exactly
  as the official server does, and reports ``repr(response)`` or the exception.

Status lines go to the server on stderr as ``STATUS_PREFIX + repr(dict) + "\n"`` (read back with
``ast.literal_eval``); anything else there is interpreter noise. The call's own stdout and stderr both go to stdout.
"""

import marshal
import os
import resource
import _signal as signal  # the C module: "signal" imports enum, ~10x the start-up cost of everything else here
import sys

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 8, 32, 4096
_MS_REC, _MS_PRIVATE = 16384, 1 << 18
_PR_SET_NO_NEW_PRIVS = 38

_RLIMITS = {"cpu_s": resource.RLIMIT_CPU, "as_bytes": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC,
            "nofile": resource.RLIMIT_NOFILE, "fsize_bytes": resource.RLIMIT_FSIZE, "core_bytes": resource.RLIMIT_CORE}


STATUS_PREFIX = "\x00sandbox-status "


def _status(fd: int, **fields) -> None:
    try:
        os.write(fd, (STATUS_PREFIX + repr(fields) + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _mount(libc, ctypes, source: str, target: str, fstype, flags: int, data) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'remount'} on {target}: {os.strerror(err)}")


def setup_mounts(req: dict) -> None:
    """Private filesystem view; runs as root inside the fresh mount namespace.

    Refuses unless this process is pid 1 of a new pid namespace and its mount namespace differs from the server's
    (``req["server_mnt_ns"]``): the same mounts made in the host namespace would hide the repo and /tmp for everyone.
    """
    if os.getpid() != 1 or os.stat("/proc/self/ns/mnt").st_ino == req["server_mnt_ns"]:
        raise RuntimeError("refusing to mount: not inside a fresh pid + mount namespace")
    ctypes, libc = _libc()
    _mount(libc, ctypes, None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing below propagates to the host
    _mount(libc, ctypes, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)  # this pid ns only
    uid, gid = req.get("uid") or 0, req.get("gid") or 0
    size = int(req["tmp_bytes"])
    for path in req.get("hide", []):
        if os.path.isdir(path):
            _mount(libc, ctypes, "hidden", path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                   "size=4k,nr_inodes=2,mode=000")
    scratch = f"size={size},nr_inodes=4096"
    _mount(libc, ctypes, "sandbox", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"{scratch},mode=0700,uid={uid},gid={gid}")
    for path in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _mount(libc, ctypes, "sandbox", path, "tmpfs", _MS_NOSUID | _MS_NODEV, f"{scratch},mode=1777")
    # a read-only view of / for this namespace only (per-mount flag; the filesystem itself stays writable outside)
    _mount(libc, ctypes, None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None)


def _set_limits(limits: dict) -> None:
    for key, value in limits.items():
        value = int(value)
        resource.setrlimit(_RLIMITS[key], (value, value) if key != "cpu_s" else (value, value + 1))


def _drop_privileges(uid, gid) -> None:
    if uid is None:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _no_new_privs() -> None:
    try:
        ctypes, libc = _libc()
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except OSError:
        pass


def _describe(exc: BaseException, req: dict) -> str:
    if isinstance(exc, MemoryError):
        return f"MemoryError: out of memory (the sandbox allows {req['limits']['as_bytes'] >> 20} MiB per call)"
    if isinstance(exc, OSError) and exc.errno == 27:  # EFBIG: RLIMIT_FSIZE (CPython ignores SIGXFSZ)
        return f"OSError: file too large (the sandbox allows files up to {req['limits']['fsize_bytes'] >> 20} MiB)"
    try:
        import traceback

        return "".join(traceback.format_exception_only(type(exc), exc)).strip()
    except Exception:  # noqa: BLE001 - e.g. the stdlib is not readable as the call's uid
        return f"{type(exc).__name__}: {exc}"


def run_call(req: dict, status_fd: int) -> None:
    """The call process: limits, privileges, then the model's code. Never returns."""
    code = 0
    try:
        os.dup2(1, 2)  # the call's stderr joins its stdout; status_fd stays the server's channel
        _set_limits(req["limits"])
        _drop_privileges(req.get("uid"), req.get("gid"))
        _no_new_privs()
        os.chdir(req["workdir"])
        if req.get("nice"):
            os.nice(int(req["nice"]))
        os.environ.clear()
        sys.path.extend(req.get("sys_path", []))  # -S: no site-packages unless the server adds some (--sys-path)
        ns: dict = {}
        result = error = None
        _status(status_fd, ready=True)
        try:
            exec(compile(req["env"], "<env>", "exec"), ns)
            exec(compile("response = " + req["call"], "<call>", "exec"), ns)
            value = ns.get("response")
            if value is not None:
                result = repr(value)
        except BaseException as exc:  # noqa: BLE001 - everything the model's code raises is the model's answer
            error = _describe(exc, req)
        cap = int(req["max_result_bytes"])
        if result is not None and len(result) > cap:
            result = result[:cap] + f"... [result truncated: repr was {len(result)} characters]"
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        _status(status_fd, result=result, error=error)
    except BaseException as exc:  # noqa: BLE001 - a sandbox set-up failure, reported to the server
        _status(status_fd, setup_error=_describe(exc, req))
        code = 70
    os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def init_main() -> None:
    """The init: request on fd 0, call output on fd 1, status lines on fd 2. Never returns."""
    req = marshal.loads(_read_all(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the call reads EOF (input() -> EOFError); fd 0 must not be left free for the dup below
    os.close(devnull)
    status_fd = os.dup(2)  # non-inheritable
    try:
        if req.get("mounts"):
            setup_mounts(req)
    except BaseException as exc:  # noqa: BLE001
        _status(status_fd, setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(70)
    os.set_inheritable(status_fd, True)
    pid = os.fork()
    if pid == 0:
        run_call(req, status_fd)
    os.close(1)
    # the server kills us at its deadline; this one only matters if the server itself is gone
    signal.signal(signal.SIGALRM, lambda *_: (_status(status_fd, init_timeout=True), os._exit(71)))
    signal.alarm(int(req["init_deadline_s"]))
    while True:
        try:
            _, wstatus = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            wstatus = 0
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(wstatus):
        _status(status_fd, signal=os.WTERMSIG(wstatus))
    else:
        _status(status_fd, exit=os.WEXITSTATUS(wstatus))
    os._exit(0)


_CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG = 1


def _spawn_from_zygote(ctypes, libc, fds: list) -> None:
    """In a fresh fork of the zygote: new session and namespaces, then the init as pid 1. Never returns.

    This process plays ``unshare --fork --kill-child``: it waits for the init, and the init dies with it
    (PR_SET_PDEATHSIG), so killing this process's group ends the call.
    """
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        for target, fd in enumerate(fds):  # stdin (the request), stdout (the call's output), stderr (status)
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        if libc.unshare(_CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET) != 0:
            _status(2, setup_error=f"unshare failed: {os.strerror(ctypes.get_errno())}")
            os._exit(70)
        pid = os.fork()
        if pid == 0:
            libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
            init_main()
        for fd in (0, 1, 2):
            os.close(fd)
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
    finally:
        os._exit(0)


def zygote(sock_fd: int) -> None:
    """Fork one call per message on ``sock_fd`` (a SOCK_SEQPACKET socket from the server; each message carries the
    call's three pipe ends as SCM_RIGHTS) and answer with the forked pid. Runs no model code and reads no request:
    a fresh fork of it is as clean as a fresh ``python -I -S``, minus the start-up cost. Exits when the server goes.
    """
    import socket

    ctypes, libc = _libc()  # loaded once here, inherited by every fork

    def reap(*_) -> None:  # promptly (the server waits for a call's process group to empty), and with waitpid so
        try:               # the forks' CPU time adds up in our cutime (the bench reads it)
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass

    signal.signal(signal.SIGCHLD, reap)
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 3)
        except InterruptedError:
            continue
        except OSError:
            break
        if not msg:
            break
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            sock.send(b"\0\0\0\0")
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            _spawn_from_zygote(ctypes, libc, fds)
        for fd in fds:
            os.close(fd)
        sock.send(pid.to_bytes(4, "little"))
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]))
    else:
        init_main()
