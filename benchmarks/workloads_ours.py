#!/usr/bin/env python
"""The side-by-side workloads on OUR ``distributed`` (see ``compare.py``).

Run by ``compare.py`` with the main interpreter, one workload per fresh
process::

    python benchmarks/workloads_ours.py --workload map [--repeat 3]

Each starts ``LocalCluster(n_workers=2, threads_per_worker=1)`` and an
``Executor(cluster.center_address)``, runs one warm-up and ``--repeat``
measured repetitions, and prints one JSON object on the last stdout line.
``workloads_dask.py`` does the same on dask.distributed, line for line.
"""

import asyncio
import contextlib
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

SYSTEM = "ours"


# -- the task functions (module level: shipped by value with cloudpickle) -------


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def first(x):
    return float(x[0])


# -- the cluster -------------------------------------------------------------------


@contextlib.contextmanager
def cluster(meta):
    import distributed
    from distributed import Executor, LocalCluster

    meta["version"] = "%s (%s)" % (distributed.__version__,
                                   os.path.dirname(distributed.__file__))
    t0 = time.time()
    c = LocalCluster(n_workers=2, threads_per_worker=1)
    e = None
    try:
        e = Executor(c.center_address)
        addresses = [p.address for p in c.workers]
        pids = [p.pid for p in c.workers]
        # the process we sample must be the worker itself
        by_run = e.run(os.getpid)
        if sorted(by_run.values()) != sorted(pids):
            meta["notes"].append("worker pids from run(os.getpid) %s differ from "
                                 "LocalCluster.workers pids %s" % (by_run, pids))
            pids = [by_run[a] for a in addresses]
        meta["startup_s"] += time.time() - t0
        H.log("cluster up in %.2f s: center %s, workers %s"
              % (time.time() - t0, c.center_address, dict(zip(addresses, pids))))
        yield c, e, addresses, pids
    finally:
        t1 = time.time()
        try:
            if e is not None:
                e.shutdown()
        finally:
            c.close()
        meta["startup_s"] += time.time() - t1


def settle(e):
    return H.settle(e.has_what)


# -- workloads ---------------------------------------------------------------------


def serve_echo():
    """``--serve-echo``: a bare ``core.Server`` with an echo handler, until killed."""
    from distributed.core import Server

    async def main():
        server = Server({"echo": lambda stream, data=None: data})
        server.listen(0, "127.0.0.1")
        print("ECHO", server.address, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_echo_server():
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-echo"],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    if not line or line[0] != "ECHO":
        p.kill()
        raise RuntimeError("the echo server did not start: %r" % line)
    return p, line[1]


def w_rpc(repeat, meta, calls=2000):
    from distributed.core import rpc

    echo_proc, echo_addr = start_echo_server()
    try:
        with cluster(meta) as (c, e, workers, pids):
            echo = rpc(echo_addr)
            center = rpc(c.center_address, security=c.security)

            loop = asyncio.new_event_loop()  # one loop for all calls: streams are reused

            def rep(i):
                async def run():
                    a = await H.time_calls(lambda: echo.echo(data=H.ECHO), calls)
                    b = await H.time_calls(lambda: center.ping(), calls)
                    return a, b

                a, b = loop.run_until_complete(run())
                return {"echo_median_us": H.percentile(a, 50),
                        "echo_p99_us": H.percentile(a, 99),
                        "center_median_us": H.percentile(b, 50),
                        "center_p99_us": H.percentile(b, 99)}

            reply = loop.run_until_complete(echo.echo(data=H.ECHO))
            assert reply == H.ECHO, reply
            meta["notes"].append(
                "echo: rpc(addr).echo(data=b'hello world') to a bare "
                "distributed.core.Server({'echo': ...}) in another process; "
                "center: rpc(center).ping() (reply b'pong'); %d calls per rep" % calls)
            try:
                return H.repeat(rep, repeat, label="rpc", units=dict.fromkeys(
                    ["echo_median_us", "echo_p99_us", "center_median_us",
                     "center_p99_us"], "us"))
            finally:
                echo.close_streams()
                center.close_streams()
                loop.close()
    finally:
        echo_proc.kill()
        echo_proc.wait()


def w_submit(repeat, meta, n=200):
    with cluster(meta) as (c, e, workers, pids):
        def rep(i):
            base = (i + 10) * 1000
            times = []
            for j in range(n):
                t = time.perf_counter()
                f = e.submit(inc, base + j)
                r = f.result()
                times.append((time.perf_counter() - t) * 1e6)
                assert r == base + j + 1
                del f
            settle(e)
            return {"median_us": H.percentile(times, 50)}

        return H.repeat(rep, repeat, label="submit", units={"median_us": "us"})


def w_map(repeat, meta, n=10_000):
    with cluster(meta) as (c, e, workers, pids):
        def rep(i):
            m = n if i >= 0 else n // 10  # a smaller warm-up: keeps the budget
            base = (i + 10) * 100_000
            t = time.perf_counter()
            futures = e.map(inc, range(base, base + m))
            results = e.gather(futures)
            dt = time.perf_counter() - t
            assert results[0] == base + 1 and results[-1] == base + m and len(results) == m
            del futures, results
            settle(e)
            return {"tasks_per_s": m / dt}

        meta["notes"].append("warm-up: %d tasks, then map(inc, range(%d)) + gather "
                             "per rep" % (n // 10, n))

        return H.repeat(rep, repeat, label="map", units={"tasks_per_s": "tasks/s"})


def w_tree(repeat, meta, leaves=4096):
    with cluster(meta) as (c, e, workers, pids):
        ntasks = 2 * leaves - 1

        def rep(i):
            m = leaves if i >= 0 else leaves // 8  # a smaller warm-up: keeps the budget
            base = (i + 10) * 100_000
            t = time.perf_counter()
            level = e.map(inc, range(base, base + m))
            while len(level) > 1:
                level = [e.submit(add, level[k], level[k + 1])
                         for k in range(0, len(level), 2)]
            total = level[0].result()
            dt = time.perf_counter() - t
            assert total == sum(range(base + 1, base + m + 1)), total
            del level
            settle(e)
            return {"tasks_per_s": (2 * m - 1) / dt}

        meta["notes"].append("%d tasks: map(inc, range(%d)) then pairwise "
                             "submit(add, a, b); warm-up with %d leaves"
                             % (ntasks, leaves, leaves // 8))
        return H.repeat(rep, repeat, label="tree", units={"tasks_per_s": "tasks/s"})


def w_transfer(repeat, meta):
    from distributed import wait

    with cluster(meta) as (c, e, workers, pids):
        A, B = workers
        pid_of = dict(zip(workers, pids))

        procs = H.RSSSampler([pid_of[A], pid_of[B]])

        def rep(i):
            before = procs._rss()  # memory still held after the release is a finding
            x = e.submit(np.random.random, H.N_FLOATS, workers=[A], pure=False)
            wait([x])
            assert e.who_has([x])[x.key] == [A]
            sampler = H.RSSSampler([pid_of[A], pid_of[B]]).start()
            t = time.perf_counter()
            y = e.submit(first, x, workers=[B], pure=False)
            y.result()
            dt = time.perf_counter() - t
            extra = sampler.stop()
            if i == -1:
                who = e.who_has([x, y])
                assert who[y.key] == [B], who
                assert B in who[x.key], who  # B fetched x from A
            del x, y
            settle(e)
            time.sleep(0.2)
            after = procs._rss()
            return {"MB_per_s": H.PAYLOAD / dt / H.MB,
                    "held_sender_x": (after[pid_of[A]] - before[pid_of[A]]) / H.PAYLOAD,
                    "held_receiver_x": (after[pid_of[B]] - before[pid_of[B]]) / H.PAYLOAD,
                    "seconds": dt,
                    "rss_sender_x": extra[pid_of[A]] / H.PAYLOAD,
                    "rss_receiver_x": extra[pid_of[B]] / H.PAYLOAD}

        meta["notes"].append(
            "x = submit(np.random.random, 2**25, workers=[A]); timed: "
            "submit(first, x, workers=[B]).result(); RSS of both worker "
            "processes sampled every 2 ms, peak minus the value just before; "
            "held_*: RSS 0.2 s after the futures were released and the workers "
            "hold no key, minus the RSS before x was made")
        return H.repeat(rep, repeat, label="transfer", units={
            "MB_per_s": "MB/s", "seconds": "s", "rss_sender_x": "x payload",
            "rss_receiver_x": "x payload", "held_sender_x": "x payload",
            "held_receiver_x": "x payload"})


def w_scatter_gather(repeat, meta):
    with cluster(meta) as (c, e, workers, pids):
        A = workers[0]
        data = np.random.random(H.N_FLOATS)

        def rep(i):
            data[0] = i  # a new value, so a new key
            t = time.perf_counter()
            f = e.scatter(data, workers=[A])
            t1 = time.perf_counter()
            back = e.gather(f)
            t2 = time.perf_counter()
            assert back.shape == data.shape and back[0] == i and back[-1] == data[-1]
            del f, back
            settle(e)
            return {"scatter_MB_per_s": H.PAYLOAD / (t1 - t) / H.MB,
                    "gather_MB_per_s": H.PAYLOAD / (t2 - t1) / H.MB}

        meta["notes"].append("scatter(array, workers=[A]) then gather(future), "
                             "default settings")
        return H.repeat(rep, repeat, label="scatter/gather", units={
            "scatter_MB_per_s": "MB/s", "gather_MB_per_s": "MB/s"})


WORKLOADS = {
    "rpc": w_rpc,
    "submit": w_submit,
    "map": w_map,
    "tree": w_tree,
    "transfer": w_transfer,
    "scatter_gather": w_scatter_gather,
}


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-echo"]:
        serve_echo()
    else:
        sys.exit(H.main(SYSTEM, WORKLOADS))
