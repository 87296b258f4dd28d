#!/usr/bin/env python
"""Network benchmark for ``distributed``: rpc latency, peer-to-peer transfer, raw TCP.

Run from the repository root (the package must be importable, e.g. installed
with ``pip install -e .``)::

    python benchmarks/bench_network.py                 # the full run, ~10 s
    python benchmarks/bench_network.py --size-mib 64 --calls 500   # quicker

Everything runs on loopback (127.0.0.1) against **other processes**, on free
ports only, and every process started is killed on exit (also on error):

1. ``rpc`` round-trip latency: ``ping`` against a ``dcenter --port 0``
   process, and an 11-byte echo against a small ``Server({'echo': ...})``
   subprocess (this script with ``--serve echo``).
2. Worker-to-worker transfer of a float64 numpy array (default 256 MiB):
   ``dcenter`` and two ``dworker --ncores 1`` processes from the CLI.  The
   array is made *on* worker A (``compute`` of a function that builds it);
   worker B is then asked to ``compute`` a cheap function of it
   (``keys=['x']``), so B fetches it from A directly.  Reported: B's
   ``transfer_stop - transfer_start`` (from the compute reply), the whole
   client-side call, throughput, and the peak RSS over baseline of both
   worker processes (psutil, sampled every ~5 ms from a background thread)
   as a multiple of the payload.  Repeated ``--repeat`` times, deleting the
   copy on B (``delete_data`` on B) in between; before them one cold run
   (reported on its own), after them one run with tracemalloc on both
   workers (exact Python-level peak) and ``--repeat`` runs with a ``bytes``
   value of the same size instead of the array.
3. The ceiling: a plain-socket ping-pong (11 bytes) and a plain-socket
   transfer of the same payload to another process, into a reused buffer,
   into a fresh ``numpy.empty(n)`` and into a fresh ``bytearray(n)`` per
   message (the two ways ``core.read`` has allocated large frames).

CPU columns are user+system seconds per call of the client and the server
process (psutil; 10 ms clock ticks).

Internal modes (used by the script itself): ``--serve echo`` and
``--serve raw`` start the helper servers.
"""

import argparse
import asyncio
import contextlib
import datetime
import gc
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import sys
import threading
import time

import numpy as np
import psutil

HERE = os.path.abspath(__file__)
PY = sys.executable
ECHO_PAYLOAD = b"hello world"  # 11 bytes
assert len(ECHO_PAYLOAD) == 11


# ---------------------------------------------------------------------------
# helper servers (run in subprocesses: ``--serve echo`` / ``--serve raw``)


def serve_echo():
    """A distributed ``Server`` with an ``echo`` handler, until SIGTERM."""
    from distributed.core import Server

    def echo(stream, data=None):
        return data

    async def main():
        server = Server({"echo": echo})
        server.listen(0, "127.0.0.1")
        print("Serving echo at %s" % server.address, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()

    asyncio.run(main())


def _recv_exactly(sock, view):
    """Fill ``view`` (a writable memoryview) from ``sock``; False on EOF."""
    pos, n = 0, len(view)
    while pos < n:
        k = sock.recv_into(view[pos:], n - pos)
        if k == 0:
            return False
        pos += k
    return True


def serve_raw():
    """Plain sockets, one connection at a time; the first byte picks the mode.

    ``E``: echo 11-byte messages until EOF.  ``S`` + u64 length: receive that
    many bytes into a preallocated (pre-touched, reused) buffer, answer ``k``;
    repeat until EOF.  ``F``: like ``S`` but into a fresh ``bytearray(length)``
    per message (zero-filled up front); ``N``: into a fresh
    ``numpy.empty(length, 'u1')`` per message (no zero-fill; numpy asks for
    transparent huge pages for big allocations).
    """
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    print("Serving raw at 127.0.0.1:%d" % lsock.getsockname()[1], flush=True)
    sink = bytearray()
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            mode = conn.recv(1)
            if mode == b"E":
                buf = bytearray(len(ECHO_PAYLOAD))
                view = memoryview(buf)
                while _recv_exactly(conn, view):
                    conn.sendall(buf)
            elif mode in (b"S", b"F", b"N"):
                head = bytearray(8)
                while _recv_exactly(conn, memoryview(head)):
                    (n,) = struct.unpack("<Q", head)
                    if mode == b"F":
                        sink = None
                        sink = bytearray(n)
                    elif mode == b"N":
                        sink = None
                        sink = np.empty(n, dtype="u1")
                    elif len(sink) != n:
                        sink = bytearray(n)  # zero-filled: pages are touched once here
                    if not _recv_exactly(conn, memoryview(sink)):
                        break
                    conn.sendall(b"k")


# ---------------------------------------------------------------------------
# functions shipped to the workers (cloudpickled by value from __main__)


def make_array(n):
    """Runs on worker A: the payload is created there, never sent by us."""
    import numpy as np

    return np.random.default_rng(42).random(n)


def probe(x):
    """Runs on worker B with ``keys=['x']``: cheap, and tells how x arrived."""
    return {
        "first": float(x[0]),
        "last": float(x[-1]),
        "nbytes": int(x.nbytes),
        "owndata": bool(x.flags.owndata),
        "writeable": bool(x.flags.writeable),
        "base": _base_chain(x),
    }


def make_bytes(n):
    """Runs on worker A: a ``bytes`` payload, for comparison with the array."""
    return bytes(n)


def _base_chain(x):
    """``'ndarray<-bytearray'``: who owns the memory behind ``x``."""
    names = []
    while x is not None:
        names.append(type(x).__name__)
        x = getattr(x, "base", None) if type(x).__name__ == "ndarray" else getattr(x, "obj", None)
    return "<-".join(names)


def tracemalloc_start():
    """Runs on a worker (``run``): start tracing allocations from now on."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    return tracemalloc.get_traced_memory()[0]


def tracemalloc_stop():
    """Runs on a worker (``run``): ``(current, peak)`` traced bytes; stop tracing."""
    import tracemalloc

    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current, peak


# ---------------------------------------------------------------------------
# measuring


def percentile(sorted_values, q):
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1)
    return sorted_values[k]


def summarize_ns(samples_ns):
    s = sorted(samples_ns)
    return {
        "median_us": statistics.median(s) / 1e3,
        "p99_us": percentile(s, 99) / 1e3,
        "min_us": s[0] / 1e3,
        "n": len(s),
    }


class CPUMeter:
    """CPU seconds (user+system) used per call by this process and a server process."""

    def __init__(self, server_pid):
        self.me, self.server = psutil.Process(), psutil.Process(server_pid)

    def _read(self):
        a, b = self.me.cpu_times(), self.server.cpu_times()
        return a.user + a.system, b.user + b.system

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        self.stop = self._read()

    def per_call_us(self, n):
        return tuple((e - s) / n * 1e6 for s, e in zip(self.start, self.stop))


async def rpc_latency(address, server_pid, op, calls, warmup, expect, **kwargs):
    from distributed.core import rpc

    r = rpc(address)
    try:
        for _ in range(warmup):
            reply = await r.call(op, **kwargs)
            assert reply == expect, reply
        times = []
        clock = time.perf_counter_ns
        with CPUMeter(server_pid) as cpu:
            for _ in range(calls):
                t0 = clock()
                await r.call(op, **kwargs)
                times.append(clock() - t0)
        result = summarize_ns(times)
        result["cpu_client_us"], result["cpu_server_us"] = cpu.per_call_us(calls)
        return result
    finally:
        r.close_streams()


def raw_pingpong(address, server_pid, calls, warmup):
    ip, port = address.rsplit(":", 1)
    with socket.create_connection((ip, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"E")
        buf = bytearray(len(ECHO_PAYLOAD))
        view = memoryview(buf)
        clock = time.perf_counter_ns
        times = []
        for i in range(warmup):
            s.sendall(ECHO_PAYLOAD)
            if not _recv_exactly(s, view):
                raise EOFError("raw echo server closed the connection")
        with CPUMeter(server_pid) as cpu:
            for i in range(calls):
                t0 = clock()
                s.sendall(ECHO_PAYLOAD)
                if not _recv_exactly(s, view):
                    raise EOFError("raw echo server closed the connection")
                times.append(clock() - t0)
        assert bytes(buf) == ECHO_PAYLOAD
    result = summarize_ns(times)
    result["cpu_client_us"], result["cpu_server_us"] = cpu.per_call_us(calls)
    return result


def raw_throughput(address, nbytes, repeat, mode=b"S"):
    ip, port = address.rsplit(":", 1)
    payload = np.ones(nbytes // 8)  # touched, like the worker's array
    view = memoryview(payload).cast("B")
    times = []
    with socket.create_connection((ip, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(mode)
        ack = bytearray(1)
        # one untimed round so that the server allocates (and touches) its buffer
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            s.sendall(struct.pack("<Q", view.nbytes))
            s.sendall(view)
            if not _recv_exactly(s, memoryview(ack)):
                raise EOFError("raw sink closed the connection")
            if i:
                times.append(time.perf_counter() - t0)
    return times


class RSSSampler(threading.Thread):
    """Samples the RSS of some processes every ``interval`` s; keeps the peak."""

    def __init__(self, pids, interval=0.005):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.peak = {name: 0 for name in pids}
        self.nsamples = 0
        self._halt = threading.Event()

    def rss(self):
        return {name: p.memory_info().rss for name, p in self.procs.items()}

    def run(self):
        while not self._halt.is_set():
            for name, value in self.rss().items():
                if value > self.peak[name]:
                    self.peak[name] = value
            self.nsamples += 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        for name, value in self.rss().items():  # one last sample
            self.peak[name] = max(self.peak[name], value)
        return self.peak


def process_tree_pid(proc, reported):
    """The PID a worker reported, checked to be ``proc`` or one of its children."""
    if reported == proc.pid:
        return reported
    kids = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    if reported not in kids:
        raise RuntimeError("worker pid %d is not in the process tree of %d"
                           % (reported, proc.pid))
    return reported


async def stable_rss(procs, settle=0.05, tries=40):
    """RSS of each process once two samples ``settle`` s apart agree within 1 MiB."""
    prev = {k: p.memory_info().rss for k, p in procs.items()}
    for _ in range(tries):
        await asyncio.sleep(settle)
        cur = {k: p.memory_info().rss for k, p in procs.items()}
        if all(abs(cur[k] - prev[k]) < 2**20 for k in cur):
            return cur
        prev = cur
    return cur


async def transfer_bench(center_addr, a_addr, b_addr, a_proc, b_proc, nbytes, repeat):
    """Make x on A; ``repeat + 2`` times let B compute ``probe(x)`` (fetching x from A).

    Run 0 is the cold one (first connection A<->B, first unpickling of numpy
    on B, first touch of that much memory) and is reported on its own; the
    last run traces allocations of both workers with tracemalloc (exact
    Python-level peak; slower, so not timed with the others).
    """
    from distributed.core import rpc

    ra, rb, rc = rpc(a_addr), rpc(b_addr), rpc(center_addr)
    try:
        pids = {
            "A": process_tree_pid(a_proc, await ra.run(function=os.getpid)),
            "B": process_tree_pid(b_proc, await rb.run(function=os.getpid)),
        }
        procs = {k: psutil.Process(v) for k, v in pids.items()}

        t0 = time.perf_counter()
        status, meta = await ra.compute(function=make_array, args=(nbytes // 8,), key="x")
        make_s = time.perf_counter() - t0
        assert status == b"OK", (status, meta)
        assert meta["nbytes"] == nbytes, meta
        status, meta = await ra.compute(function=probe, keys=["x"], key="probe-A")
        assert status == b"OK", (status, meta)
        expect = (await ra.get_data(keys=["probe-A"]))["probe-A"]
        await ra.delete_data(keys=["probe-A"])
        who = await rc.who_has(keys=["x"])
        assert set(who["x"]) == {a_addr}, who

        async def one(i, traced=False, x="x", function=probe):
            key = "probe-%d" % i
            gc.collect()
            if traced:
                await ra.run(function=tracemalloc_start)
                await rb.run(function=tracemalloc_start)
            base = await stable_rss(procs)
            sampler = RSSSampler(pids)
            sampler.start()
            t0 = time.perf_counter()
            status, meta = await rb.compute(function=function, keys=[x], key=key)
            call_s = time.perf_counter() - t0
            peak = sampler.stop()
            assert status == b"OK", (status, meta)
            if traced:
                traced_peak = {"A": (await ra.run(function=tracemalloc_stop))[1] / nbytes,
                               "B": (await rb.run(function=tracemalloc_stop))[1] / nbytes}
            after = await stable_rss(procs)
            seen = (await rb.get_data(keys=[key]))[key]
            if function is probe:
                assert (seen["first"], seen["last"], seen["nbytes"]) == (
                    expect["first"], expect["last"], expect["nbytes"]), (seen, expect)
            else:
                assert seen == nbytes, seen
            # drop B's copy (and the probe result) on B only; A keeps x
            await rb.delete_data(keys=[x, key])
            who = await rc.who_has(keys=[x])
            assert set(who[x]) == {a_addr}, who
            freed = await stable_rss(procs)
            run = {
                "transfer_s": meta["transfer_stop"] - meta["transfer_start"],
                "call_s": call_s,
                "compute_s": meta["compute_stop"] - meta["compute_start"],
                "peak_B": (peak["B"] - base["B"]) / nbytes,
                "peak_A": (peak["A"] - base["A"]) / nbytes,
                "kept_B": (after["B"] - base["B"]) / nbytes,
                "freed_B": (freed["B"] - base["B"]) / nbytes,
                "samples": sampler.nsamples,
                "how": seen,
            }
            if traced:
                run["traced"] = traced_peak
            return run

        cold = await one(0)
        runs = [await one(i) for i in range(1, repeat + 1)]
        traced = await one(repeat + 1, traced=True)
        # the same with a bytes value instead of an array (first run untimed)
        await ra.delete_data(keys=["x"])
        status, meta = await ra.compute(function=make_bytes, args=(nbytes,), key="xb")
        assert status == b"OK", (status, meta)
        brun = [await one(repeat + 2 + i, x="xb", function=len) for i in range(repeat + 1)][1:]
        await ra.delete_data(keys=["xb"])
        return {"pids": pids, "make_s": make_s, "cold": cold, "runs": runs,
                "traced": traced, "bytes": brun}
    finally:
        for r in (ra, rb, rc):
            r.close_streams()


# ---------------------------------------------------------------------------
# processes


def command(name):
    """``dcenter``/``dworker`` from PATH, else the module with this Python."""
    exe = shutil.which(name)
    if exe:
        return [exe]
    return [PY, "-m", "distributed.cli." + name]


def start_center(stack):
    from distributed.utils_test import popen, wait_for_line

    proc = stack.enter_context(popen(command("dcenter") + ["--port", "0"]))
    line = wait_for_line(proc, r"Start center at")
    return proc, line.split()[-1]


def start_worker(stack, center_addr):
    from distributed.utils_test import popen, wait_for_line

    proc = stack.enter_context(popen(command("dworker") + [center_addr, "--ncores", "1"]))
    address = wait_for_line(proc, r"Start worker at").split()[-1]
    wait_for_line(proc, r"Registered with center at")
    return proc, address


def start_helper(stack, mode):
    from distributed.utils_test import popen, wait_for_line

    proc = stack.enter_context(popen([PY, HERE, "--serve", mode]))
    return proc, wait_for_line(proc, r"Serving %s at" % mode).split()[-1]


# ---------------------------------------------------------------------------
# report


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stats3(values):
    return statistics.median(values), min(values), max(values)


def print_report(args, lat, raw_lat, xfer, raw):
    import tornado

    nbytes = args.size_mib * 2**20
    mb = nbytes / 1e6
    w = 52

    def line(name, values, fmt):
        print("  %-*s " % (w - 2, name) + " ".join(fmt % v for v in values))

    print()
    print("distributed network benchmark   %s"
          % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
    print("nproc=%d  cpu=%s  RAM=%.0f GiB  python %s  tornado %s  numpy %s"
          % (os.cpu_count(), cpu_model(), psutil.virtual_memory().total / 2**30,
             platform.python_version(), tornado.version, np.__version__))
    print("load average before the run: %.2f (other work on the machine skews results)"
          % args.loadavg)
    print()
    print("%-*s %8s %8s %8s %8s %8s" % (w, "round trip, loopback, server in another process",
                                        "median", "p99", "min", "CPU cli", "CPU srv"))
    rows = [("rpc ping -> dcenter", lat["ping"]),
            ("rpc echo 11 B -> Server subprocess", lat["echo"]),
            ("raw socket ping-pong 11 B (ceiling)", raw_lat)]
    for name, r in rows:
        print("  %-*s %8.1f %8.1f %8.1f %8.1f %8.1f"
              % (w - 2, name, r["median_us"], r["p99_us"], r["min_us"],
                 r["cpu_client_us"], r["cpu_server_us"]))
    print("  (µs; %d calls each after %d warm-up calls; CPU = user+system µs per call"
          % (lat["ping"]["n"], args.warmup))
    print("   of the client and of the server process, from psutil: 10 ms ticks, so")
    print("   +-%.0f µs at this number of calls)" % (10000.0 / lat["ping"]["n"]))
    print()
    runs = xfer["runs"]
    print("%-*s %10s %10s %10s" % (w, "%d MiB float64, dworker A -> dworker B, %d runs"
                                   % (args.size_mib, len(runs)), "median", "min", "max"))
    table = [
        ("fetch time on B (transfer_stop-start) s", [r["transfer_s"] for r in runs], "%10.3f"),
        ("fetch throughput MB/s", [mb / r["transfer_s"] for r in runs], "%10.0f"),
        ("whole compute call (client) s", [r["call_s"] for r in runs], "%10.3f"),
        ("whole-call throughput MB/s", [mb / r["call_s"] for r in runs], "%10.0f"),
        ("receiver B: peak RSS - baseline (x payload)", [r["peak_B"] for r in runs], "%10.2f"),
        ("sender A: peak RSS - baseline (x payload)", [r["peak_A"] for r in runs], "%10.2f"),
        ("B: RSS kept after the call (x payload)", [r["kept_B"] for r in runs], "%10.2f"),
        ("B: RSS after delete_data (x payload)", [r["freed_B"] for r in runs], "%10.2f"),
    ]
    for name, values, fmt in table:
        line(name, stats3(values), fmt)
    cold, traced = xfer["cold"], xfer["traced"]
    line("first (cold) run: fetch s / call s / peak B x",
         [cold["transfer_s"], cold["call_s"], cold["peak_B"]], "%10.3f")
    line("tracemalloc peak during 1 extra run: B x / A x",
         [traced["traced"]["B"], traced["traced"]["A"]], "%10.2f")
    print("  %-*s %s" % (w - 2, "fetch s of each run, in order",
                         " ".join("%10.3f" % r["transfer_s"] for r in runs)))
    brun = xfer["bytes"]
    line("same with a bytes value: fetch s / peak B x / A x",
         [statistics.median([r[k] for r in brun]) for k in ("transfer_s", "peak_B", "peak_A")],
         "%10.2f")
    how = runs[0]["how"]
    print("  (1 MB = 10^6 B; array made on A in %.2f s; x on B: %s, owndata=%s,"
          % (xfer["make_s"], how["base"], how["owndata"]))
    print("   writeable=%s; RSS sampled every 5 ms, >= %d samples per run)"
          % (how["writeable"], min(r["samples"] for r in runs)))
    print()
    print("%-*s %10s %10s %10s" % (w, "raw TCP loopback, %d MiB to another process"
                                   % args.size_mib, "median", "min", "max"))
    for label, times in [("into a reused buffer (ceiling)", raw["reused"]),
                         ("into a fresh numpy.empty(n) per message", raw["empty"]),
                         ("into a fresh bytearray(n) per message", raw["fresh"])]:
        line(label + " s", stats3(times), "%10.3f")
        line(label + " MB/s", stats3([mb / v for v in times]), "%10.0f")
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256, help="payload size (default 256)")
    p.add_argument("--calls", type=int, default=2000, help="latency calls (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up calls (default 200)")
    p.add_argument("--repeat", type=int, default=3, help="transfer repetitions (default 3)")
    p.add_argument("--serve", choices=["echo", "raw"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve == "echo":
        return serve_echo()
    if args.serve == "raw":
        return serve_raw()

    nbytes = args.size_mib * 2**20
    args.loadavg = os.getloadavg()[0]
    t0 = time.time()
    with contextlib.ExitStack() as stack:  # kills every process on the way out
        print("starting dcenter, 2 dworkers and helper servers ...", flush=True)
        center, center_addr = start_center(stack)
        (a_proc, a_addr), (b_proc, b_addr) = [start_worker(stack, center_addr)
                                              for _ in range(2)]
        echo_proc, echo_addr = start_helper(stack, "echo")
        raw_proc, raw_addr = start_helper(stack, "raw")

        print("latency ...", flush=True)
        lat = {
            "ping": asyncio.run(rpc_latency(center_addr, center.pid, "ping", args.calls,
                                            args.warmup, b"pong")),
            "echo": asyncio.run(rpc_latency(echo_addr, echo_proc.pid, "echo", args.calls,
                                            args.warmup, ECHO_PAYLOAD, data=ECHO_PAYLOAD)),
        }
        raw_lat = raw_pingpong(raw_addr, raw_proc.pid, args.calls, args.warmup)

        print("transfer ...", flush=True)
        xfer = asyncio.run(transfer_bench(center_addr, a_addr, b_addr, a_proc, b_proc,
                                          nbytes, args.repeat))
        print("raw TCP ...", flush=True)
        raw = {"reused": raw_throughput(raw_addr, nbytes, args.repeat, b"S"),
               "empty": raw_throughput(raw_addr, nbytes, args.repeat, b"N"),
               "fresh": raw_throughput(raw_addr, nbytes, args.repeat, b"F")}
    print_report(args, lat, raw_lat, xfer, raw)
    print("total %.1f s" % (time.time() - t0))

if __name__ == "__main__":
    sys.exit(main())
