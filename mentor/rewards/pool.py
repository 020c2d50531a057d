"""A process pool that scores rewards with a per-sample timeout and never crashes its caller.

``RewardPool(spec, num_workers, timeout_s, **reward_kwargs).score(reward_inputs)`` returns one
dict per input (order preserved; every dict has the same keys, ``overall`` among them) and a
:class:`RewardStats`. Workers are separate processes (``spawn`` by default: the driver later hosts
Ray and torch threads, which ``fork`` would copy half-locked); each loads the reward itself from
the spec string, so nothing but the spec, kwargs and plain inputs/outputs is pickled.

Failure handling, counted per sample:

- the reward raises -> 0, ``errors``; a worker that dies (segfault, ``os._exit``) counts the same;
- a call does not return within ``timeout_s`` -> the worker is killed and replaced, 0, ``timeouts``;
- the reward returns garbage (None, NaN, inf, a str, a dict without a numeric ``overall``, a list of
  the wrong length) -> 0, ``invalid``.

Inputs are sent in chunks of ``chunk_size`` samples; each call, whatever its size, must finish
within ``timeout_s``. A chunk that fails as a whole (raises, times out, dies, wrong length) is
retried one sample at a time, so one bad sample never zeroes its neighbours and each sample is
scored within its own ``timeout_s`` or given 0.

``submit(reward_inputs)`` runs ``score`` in a background thread and returns a ``Future`` at once, so the
caller can work meanwhile (the trainer computes old log-probs while the rewards are scored, as EasyR1 does).
Calls are serialised by a lock: a ``score`` or ``submit`` made while another is running waits for it.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import numbers
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_connections
from typing import Any

from mentor.rewards.loader import RewardFunctionError, load_reward_function

logger = logging.getLogger(__name__)

_MAX_AUTO_CHUNK = 16
_MAX_STARTUP_FAILURES = 3


@dataclass
class RewardStats:
    """Per-``score`` failure counts (samples, not chunks); ``restarts`` counts replaced workers."""

    errors: int = 0
    timeouts: int = 0
    invalid: int = 0
    restarts: int = 0
    first_error: str | None = field(default=None, repr=False)

    def as_metrics(self) -> dict[str, float]:
        return {"reward/errors": float(self.errors), "reward/timeouts": float(self.timeouts),
                "reward/invalid": float(self.invalid)}


def _as_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real) and not hasattr(value, "__float__"):
        return None
    try:
        f = float(value)
    except Exception:  # TypeError/ValueError, or RuntimeError from a multi-element tensor
        return None
    return f if math.isfinite(f) else None


def coerce_score(item: Any) -> dict[str, float] | None:
    """A reward item as ``{"overall": float, <other numeric keys>: float}``, or None if invalid.

    A bare number is an ``overall``; non-numeric extra keys (a verl ``pred`` string) are dropped.
    """
    if not isinstance(item, Mapping):
        item = {"overall": item}
    overall = _as_float(item.get("overall"))
    if overall is None:
        return None
    out = {"overall": overall}
    for key, value in item.items():
        f = _as_float(value)
        if f is not None and key != "overall":
            out[str(key)] = f
    return out


# ----------------------------------------------------------------------------- worker process


def _exit_with_parent() -> None:
    """Daemon thread: end this worker if the driver dies without closing the pool."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="reward-parent-watch").start()


def _run_task(fn, task_id: int, inputs: list[dict]) -> tuple:
    try:
        raw = fn(inputs)
    except Exception as e:
        return task_id, "error", f"{type(e).__name__}: {e}"[:1000]
    if not isinstance(raw, (list, tuple)) or len(raw) != len(inputs):
        got = f"{type(raw).__name__} of length {len(raw)}" if isinstance(raw, (list, tuple)) else type(raw).__name__
        return task_id, "invalid", f"expected a list of {len(inputs)} scores, got {got}"
    try:
        return task_id, "ok", [coerce_score(x) for x in raw]
    except Exception as e:  # a score object whose items cannot even be read
        return task_id, "invalid", f"unreadable scores: {type(e).__name__}: {e}"[:1000]


def _worker_main(conn, spec: str, reward_type: str, reward_kwargs: dict[str, Any]) -> None:
    """Load the reward by spec, report ``ready``, then answer ``(task_id, inputs)`` until None/EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _exit_with_parent()
    try:
        fn = load_reward_function(spec, reward_type=reward_type, **reward_kwargs)
    except Exception as e:
        conn.send(("init_error", str(e) if isinstance(e, RewardFunctionError) else f"{type(e).__name__}: {e}",
                   isinstance(e, RewardFunctionError)))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        conn.send(_run_task(fn, *msg))


# ----------------------------------------------------------------------------- driver side


class _Worker:
    """One worker process, its pipe, and what it is doing: starting, idle, or running a task."""

    def __init__(self, ctx, args: tuple, startup_timeout_s: float):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, *args), daemon=True, name="mentor-reward")
        self.proc.start()
        child.close()
        self.ready = False
        self.task: tuple[int, list[int]] | None = None  # (task_id, sample indices)
        self.deadline = time.monotonic() + startup_timeout_s

    def stop(self, graceful: bool) -> None:
        if graceful and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(1.0)
            except (OSError, ValueError):
                pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5.0)
        self.conn.close()


class RewardPool:
    """Score reward inputs in worker processes; see the module docstring for the failure policy.

    Args:
        spec: ``"math"`` or ``"path/to/file.py:fn"`` (see :func:`load_reward_function`).
        num_workers: worker processes.
        timeout_s: limit for each call into the reward (a chunk or a single sample).
        chunk_size: samples per call; None = ceil(n / (4 * num_workers)), at most 16.
        reward_type: ``auto`` | ``batch`` | ``sequential`` (signature detection, see the loader).
        start_method: ``spawn`` or ``forkserver``.
        startup_timeout_s: time a worker may take to import and load the reward.
        **reward_kwargs: bound to the reward function (``worker.reward.reward_kwargs``).

    Raises :class:`RewardFunctionError` at construction if the spec cannot be loaded.
    """

    def __init__(self, spec: str, num_workers: int = 2, timeout_s: float = 10.0, *,
                 chunk_size: int | None = None, reward_type: str = "auto", start_method: str = "spawn",
                 startup_timeout_s: float = 120.0, **reward_kwargs: Any):
        if num_workers < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {num_workers} (worker.reward.num_workers)")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool: timeout_s must be > 0, got {timeout_s} (worker.reward.timeout_s)")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"RewardPool: chunk_size must be >= 1 or None, got {chunk_size}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"RewardPool: start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        self.spec, self.num_workers, self.timeout_s, self.chunk_size = spec, num_workers, timeout_s, chunk_size
        self._ctx = mp.get_context(start_method)
        self._args = (spec, reward_type, dict(reward_kwargs))
        self._startup_timeout_s = startup_timeout_s
        self._startup_failures = 0
        self._task_ids = itertools.count()
        self._closed = False
        self._lock = threading.Lock()  # one scoring call at a time (submit's thread or the caller's)
        self._thread: threading.Thread | None = None  # the latest submit's
        self._workers: list[_Worker] = []
        try:
            for _ in range(num_workers):
                self._workers.append(self._spawn())
            while not all(w.ready for w in self._workers):
                self._poll(deque(), [], RewardStats())
        except BaseException:
            self.close()
            raise

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._args, self._startup_timeout_s)

    # ------------------------------------------------------------------ public API

    def score(self, reward_inputs: list[dict]) -> tuple[list[dict[str, float]], RewardStats]:
        """One score dict per input (failed samples: every key 0.0) and the failure counts."""
        with self._lock:
            return self._score(reward_inputs)

    def submit(self, reward_inputs: list[dict]) -> Future[tuple[list[dict[str, float]], RewardStats]]:
        """``score(reward_inputs)`` in a background thread; ``.result()`` of the returned future is its return
        value (or raises its exception). The inputs must not change until then."""
        if self._closed:
            raise RuntimeError("RewardPool.submit called after close()")
        future: Future = Future()

        def run() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self.score(reward_inputs))
            except BaseException as err:  # delivered to the caller by future.result()
                future.set_exception(err)

        self._thread = threading.Thread(target=run, name="reward-pool-submit", daemon=True)
        self._thread.start()
        return future

    def _score(self, reward_inputs: list[dict]) -> tuple[list[dict[str, float]], RewardStats]:
        if self._closed:
            raise RuntimeError("RewardPool.score called after close()")
        n = len(reward_inputs)
        stats = RewardStats()
        for slot, w in enumerate(self._workers):
            if w.task is not None:  # left running by a call that was interrupted (Ctrl-C): its result is stale
                self._replace(slot, stats)
        results: list[dict[str, float] | None] = [None] * n
        size = self.chunk_size or min(_MAX_AUTO_CHUNK, max(1, math.ceil(n / (4 * self.num_workers))))
        pending = deque(list(range(i, min(i + size, n))) for i in range(0, n, size))
        while pending or any(w.task for w in self._workers):
            if self._closed:  # close() from another thread; it waits for this call to return
                raise RuntimeError("RewardPool closed while scoring")
            self._dispatch(pending, reward_inputs, results, stats)
            self._poll(pending, results, stats)
        if stats.errors or stats.timeouts or stats.invalid:
            logger.warning("reward %s: %d errors, %d timeouts, %d invalid of %d samples (scored 0); first: %s",
                           self.spec, stats.errors, stats.timeouts, stats.invalid, n, stats.first_error)
        return _rectangular(results), stats

    def close(self) -> None:
        """Stop all workers (idle ones politely, busy ones killed). Idempotent."""
        if getattr(self, "_closed", True):  # closed, or __init__ failed before starting workers
            return
        self._closed = True
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # a submitted call stops at its next poll (within timeout_s); then no one uses the workers
        for w in getattr(self, "_workers", []):
            w.stop(graceful=w.task is None)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ scheduling

    def _dispatch(self, pending: deque, inputs: list[dict], results: list, stats: RewardStats) -> None:
        for slot, w in enumerate(self._workers):
            if not pending:
                return
            if not w.ready or w.task is not None:
                continue
            indices = pending.popleft()
            task_id = next(self._task_ids)
            try:
                w.conn.send((task_id, [inputs[i] for i in indices]))
            except (OSError, EOFError):  # died while idle: requeue, replace
                pending.appendleft(indices)
                self._replace(slot, stats)
                continue
            except Exception as e:  # the inputs themselves do not pickle
                self._fail(indices, "errors", f"inputs not picklable: {type(e).__name__}: {e}", pending, results, stats)
                continue
            w.task, w.deadline = (task_id, indices), time.monotonic() + self.timeout_s

    def _poll(self, pending: deque, results: list, stats: RewardStats) -> None:
        """Wait for the next message or deadline among busy and starting workers, and handle it."""
        watched = [(slot, w) for slot, w in enumerate(self._workers) if w.task is not None or not w.ready]
        if not watched:
            return
        wait_s = max(0.0, min(w.deadline for _, w in watched) - time.monotonic())
        readable = wait_connections([w.conn for _, w in watched], wait_s)
        for slot, w in watched:
            if w.conn in readable:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    self._on_death(slot, w, pending, results, stats)
                    continue
                self._on_message(w, msg, pending, results, stats)
            elif time.monotonic() >= w.deadline:
                self._on_deadline(slot, w, pending, results, stats)

    def _on_message(self, w: _Worker, msg: tuple, pending: deque, results: list, stats: RewardStats) -> None:
        if msg[0] == "ready":
            w.ready, w.deadline = True, math.inf
            self._startup_failures = 0
            return
        if msg[0] == "init_error":
            self.close()
            if msg[2]:
                raise RewardFunctionError(msg[1])
            raise RuntimeError(f"reward worker failed to load {self.spec!r}: {msg[1]}")
        task_id, status, payload = msg
        if w.task is None or w.task[0] != task_id:
            return
        indices = w.task[1]
        w.task, w.deadline = None, math.inf
        if status == "ok":
            for i, item in zip(indices, payload):
                if item is None:
                    self._fail([i], "invalid", "a score without a finite numeric 'overall'", pending, results, stats)
                else:
                    results[i] = item
        else:
            self._fail(indices, "errors" if status == "error" else "invalid", payload, pending, results, stats)

    def _on_deadline(self, slot: int, w: _Worker, pending: deque, results: list, stats: RewardStats) -> None:
        task = w.task
        self._replace(slot, stats)
        if task is None:
            self._startup_failed(f"a reward worker did not start within {self._startup_timeout_s}s")
            return
        self._fail(task[1], "timeouts", f"no result within {self.timeout_s}s", pending, results, stats)

    def _on_death(self, slot: int, w: _Worker, pending: deque, results: list, stats: RewardStats) -> None:
        w.proc.join(1.0)
        task, code = w.task, w.proc.exitcode
        self._replace(slot, stats)
        if task is None:
            self._startup_failed(f"a reward worker exited with code {code} while starting")
            return
        self._fail(task[1], "errors", f"worker process died (exit code {code})", pending, results, stats)

    def _startup_failed(self, why: str) -> None:
        self._startup_failures += 1
        logger.error("reward %s: %s", self.spec, why)
        if self._startup_failures >= _MAX_STARTUP_FAILURES:
            self.close()
            raise RuntimeError(
                f"reward pool for {self.spec!r}: {why} ({self._startup_failures} times in a row); with the "
                f"spawn/forkserver start methods the launching script needs an `if __name__ == '__main__':` guard"
            )

    def _replace(self, slot: int, stats: RewardStats) -> None:
        self._workers[slot].stop(graceful=False)
        if not self._closed:  # a submitted call that close() is waiting for starts no new process
            self._workers[slot] = self._spawn()
        stats.restarts += 1

    @staticmethod
    def _fail(indices: list[int], kind: str, why: str, pending: deque, results: list, stats: RewardStats) -> None:
        """A failed call: retry a chunk one sample at a time; a single sample scores 0."""
        if len(indices) > 1:
            pending.extendleft([i] for i in reversed(indices))
            return
        setattr(stats, kind, getattr(stats, kind) + 1)
        if stats.first_error is None:
            stats.first_error = f"sample {indices[0]}: {kind}: {why}"


def _rectangular(results: list[dict[str, float] | None]) -> list[dict[str, float]]:
    """Every dict gets the union of keys; failed samples and missing keys are 0.0."""
    keys = {"overall": None}
    for r in results:
        if r is not None:
            keys.update(dict.fromkeys(r))
    return [{k: (r.get(k, 0.0) if r is not None else 0.0) for k in keys} for r in results]
