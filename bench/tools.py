"""Tool-sandbox throughput: calls/s and p50/p99 latency at 1, 16 and 64 concurrent clients.

    python bench/tools.py [--clients 1,16,64] [--calls 320] [--max-concurrency 16] [--modes full,no-zygote]
                          [--json assets/bench/tools.json] [--quick]

One sandbox server (``LocalSandbox``: ``python -m mentor.tools.sandbox`` on 127.0.0.1) per mode; ``--clients``
async clients (each its own ``SandboxClient`` and keep-alive connection) issue ``--calls`` calls in total, each
``add(a=i, b=i)`` over a two-function tool source, the shape of the tiny tool task's calls. A call's latency is
the client's view: HTTP, queueing for a slot, the isolated process's start-up and teardown. calls/s = calls / wall
time of the whole batch. Modes: ``full`` is the default server (net + pid + mount namespaces, per-slot uid,
rlimits; each call a fork of the pre-started zygote); ``no-zygote`` (``--no-zygote``) the same isolation with
``unshare`` + a fresh ``python -I -S`` per call; ``no-namespaces`` (``--no-namespaces``) keeps the privilege drop
and rlimits but no namespaces.

CPU per call, which load on a shared machine does not change (much): ``server cpu ms`` (uvicorn, FastAPI, process
supervision), ``call cpu ms`` (the isolated processes: the zygote's forks, or unshare + the interpreter's start-up;
the runner; the call; read from the reaped-children times of the server and of the zygote) and ``client cpu ms``
(this script's httpx clients). Their sum bounds calls/s on an idle machine: cores x 1000 / sum. The table states
the load average each row ran under.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from _common import format_table, machine_line, write_json

from mentor.tools.sandbox_client import LocalSandbox, SandboxClient

TOOLS = "def add(a, b):\n    return a + b\n\ndef multiply(a, b):\n    return a * b\n"


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list: the ceil(q/100 * n)-th smallest value."""
    ordered = sorted(xs)
    rank = max(1, -(-int(q * len(ordered)) // 100))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(latencies_s: list[float], wall_s: float, failures: int) -> dict[str, Any]:
    return {"calls": len(latencies_s), "calls_per_s": len(latencies_s) / wall_s if wall_s > 0 else float("nan"),
            "p50_ms": 1000 * percentile(latencies_s, 50), "p99_ms": 1000 * percentile(latencies_s, 99),
            "failures": failures}


async def run_batch(clients: list[SandboxClient], calls: int) -> dict[str, Any]:
    """One worker per client (each its own connection) until ``calls`` calls are done."""
    latencies: list[float] = []
    failures = 0
    next_index = iter(range(calls))

    async def worker(client: SandboxClient) -> None:
        nonlocal failures
        for i in next_index:
            t0 = time.perf_counter()
            res = await client.aexecute(TOOLS, f"add(a={i}, b={i})", timeout=10)
            latencies.append(time.perf_counter() - t0)
            failures += res.result != str(2 * i)

    start = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in clients))
    return summarize(latencies, time.perf_counter() - start, failures)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU s of process ``pid``, CPU s of its reaped children): /proc/pid/stat utime+stime, cutime+cstime."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def cpu_snapshot(server: int) -> dict[str, float]:
    """Server CPU and the calls' CPU: the server's reaped children (unshare path) plus each live child (the zygote)
    with its own reaped children (the forks it made for calls)."""
    own, reaped = cpu_seconds(server)
    calls = reaped
    for child in children(server):
        try:
            calls += sum(cpu_seconds(child))
        except FileNotFoundError:
            pass
    return {"server": own, "calls": calls}


MODES = {"full": [], "no-zygote": ["--no-zygote"], "no-namespaces": ["--no-namespaces"]}


def bench_mode(mode: str, clients: list[int], calls: int, max_concurrency: int) -> list[dict[str, Any]]:
    rows = []
    with LocalSandbox(max_concurrency=max_concurrency, extra_args=MODES[mode] + ["--log-level", "warning"]) as box:
        enforced = box.health["enforced"]
        asyncio.run(run_batch([box.client] * min(4, max_concurrency), 16))  # warm-up: page cache, the zygote
        for c in clients:
            pool = [SandboxClient(box.url, max_connections=1) for _ in range(c)]  # built outside the clock
            load = os.getloadavg()[0]
            before, client0 = cpu_snapshot(box.proc.pid), time.process_time()
            row = asyncio.run(run_batch(pool, calls))
            after = cpu_snapshot(box.proc.pid)
            cpu = {"server_cpu_ms": 1000 * (after["server"] - before["server"]) / calls,
                   "call_cpu_ms": 1000 * (after["calls"] - before["calls"]) / calls,
                   "client_cpu_ms": 1000 * (time.process_time() - client0) / calls}
            for client in pool:
                client.close()
            rows.append({"mode": mode, "clients": c, **row, **cpu, "load_1min": round(load, 2),
                         "namespaces": enforced["network_namespace"], "privilege_drop": enforced["privilege_drop"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,16,64")
    p.add_argument("--calls", type=int, default=320, help="calls per row")
    p.add_argument("--max-concurrency", type=int, default=16, help="server --max-concurrency")
    p.add_argument("--modes", default="full")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 clients, 16 calls")
    args = p.parse_args()
    clients = [1, 4] if args.quick else [int(c) for c in args.clients.split(",")]
    calls = 16 if args.quick else args.calls
    from _common import machine

    info = machine()
    rows = [row for mode in args.modes.split(",") for row in bench_mode(mode, clients, calls, args.max_concurrency)]
    print(machine_line(info))
    print(format_table(["mode", "clients", "calls", "calls/s", "p50 ms", "p99 ms", "failures", "server cpu ms",
                        "call cpu ms", "client cpu ms", "load"],
                       [[r["mode"], r["clients"], r["calls"], r["calls_per_s"], r["p50_ms"], r["p99_ms"],
                         r["failures"], r["server_cpu_ms"], r["call_cpu_ms"], r["client_cpu_ms"], r["load_1min"]]
                        for r in rows], floatfmt=".1f"))
    write_json(args.json, {"machine": info, "max_concurrency": args.max_concurrency, "results": rows})


if __name__ == "__main__":
    main()
