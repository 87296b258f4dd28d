#!/usr/bin/env python
"""What the dashboard costs the scheduler: a 10,000-task map, with and without it.

::

    python benchmarks/bench_dashboard.py            # both parts, ~1 min
    python benchmarks/bench_dashboard.py --no-e2e   # the scheduler part only

1. **Scheduler** (in this process, no I/O): a ``Scheduler`` runs a map of
   ``--tasks`` independent tasks on 2 workers (``update_graph``, then one
   ``task_finished`` per task with its startstops and thread, then the
   client releases them), ``--repeat`` times without and with a
   ``DashboardPlugin``; the median CPU times and the overhead.  Also the cost
   of one status update (``snapshot`` plus the task-stream delta) while
   those tasks are in memory: what the center does once a second per page.
2. **End to end**: a ``LocalCluster(n_workers=2)`` without the dashboard
   (``no_dashboard=True``), one with it and no page open, and one with a
   WebSocket client reading every update, as an open status page does;
   ``e.map(inc, range(tasks))`` then ``gather``, ``--repeat`` times each:
   the median CPU time of the center process (what the dashboard costs
   the scheduler, robust to other load on the machine) and wall time.
"""

import argparse
import asyncio
import gc
import os
import statistics
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed.dashboard import DashboardPlugin  # noqa: E402
from distributed.dashboard.state import snapshot, stream_since  # noqa: E402
from distributed.scheduler import Scheduler  # noqa: E402


def run_map(ntasks, plugin):
    s = Scheduler()
    if plugin:
        s.add_plugin(DashboardPlugin(s))
    s.add_worker("w1:1", ncores=1)
    s.add_worker("w2:1", ncores=1)
    s.add_client("c")
    keys = ["inc-%032x" % i for i in range(ntasks)]
    gc.collect()
    t0 = time.process_time()  # CPU time: other processes on the machine count less
    s.update_graph("c", tasks={k: "spec" for k in keys}, dependencies={}, keys=keys)
    s.flush()
    now = time.time()
    for i, k in enumerate(keys):
        ts = s.tasks[k]
        worker = ts.processing_on.address if ts.processing_on else "w1:1"
        s.task_finished(worker, k, nbytes=28, type="int", startstops=(now, now + 0.001),
                        thread=1)
        if i % 100 == 0:
            s.flush()
    s.flush()
    elapsed = time.process_time() - t0
    return elapsed, s


class FakeCenter:
    """What ``snapshot`` reads of a center."""

    def __init__(self, s):
        self.scheduler = s
        self.address = "127.0.0.1:8786"
        self.ncores = {a: 1 for a in s.workers}
        self.metrics = {a: {"memory_rss": 10**8, "memory_bytes": 10**6} for a in s.workers}
        self.names = {}
        self.last_seen = {a: time.time() for a in s.workers}
        self.deaths = []


def scheduler_part(ntasks, repeat):
    print("1. scheduler, a map of %d tasks on 2 workers (median of %d)" % (ntasks, repeat))
    results = {False: [], True: []}
    for _ in range(repeat):
        for plugin in (False, True):  # interleaved: drift hits both alike
            results[plugin].append(run_map(ntasks, plugin)[0])
    without, with_ = statistics.median(results[False]), statistics.median(results[True])
    print("   without the dashboard plugin: %7.1f ms" % (without * 1000))
    print("   with it:                      %7.1f ms   overhead %+.1f %%"
          % (with_ * 1000, 100 * (with_ / without - 1)))
    _, s = run_map(ntasks, True)
    plugin = s.plugins[0]
    center = FakeCenter(s)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        update = snapshot(center, plugin)
        update["stream"] = stream_since(plugin, -1)
        times.append(time.perf_counter() - t0)
    print("   one status update (%d tasks in the stream): %.2f ms"
          % (len(update["stream"]), statistics.median(times) * 1000))
    return without, with_


def inc(x):
    return x + 1


def e2e_part(ntasks, repeat):
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    from distributed import Executor, LocalCluster

    print("2. end to end, e.map(inc, range(%d)) on 2 workers (median of %d)"
          % (ntasks, repeat))
    medians = {}
    labels = {False: "without the dashboard:", "idle": "with it, no page open:",
              True: "with it and a page reading:"}
    for dashboard in (False, "idle", True):
        with LocalCluster(n_workers=2, no_dashboard=not dashboard) as cluster, \
                Executor(cluster.center_address) as e:
            reader, stop, updates = None, threading.Event(), []
            if dashboard is True:
                url = cluster.dashboard_address.replace("http", "ws").replace(
                    "/status", "/ws")

                async def read():
                    ws = await websocket_connect(HTTPRequest(url, headers={
                        "Authorization": "Bearer " + cluster.security.token}))
                    while not stop.is_set():
                        msg = await ws.read_message()
                        if msg is None:
                            break
                        updates.append(len(msg))
                    ws.close()

                reader = threading.Thread(target=asyncio.run, args=(read(),), daemon=True)
                reader.start()
            e.gather(e.map(inc, range(200)))  # warm up
            center = psutil.Process(cluster.center.proc.pid)
            times, cpus = [], []
            for i in range(repeat):
                c0, t0 = sum(center.cpu_times()[:2]), time.perf_counter()
                e.gather(e.map(inc, [j + i * ntasks for j in range(ntasks)]))
                times.append(time.perf_counter() - t0)
                cpus.append(sum(center.cpu_times()[:2]) - c0)
            stop.set()
            medians[dashboard] = statistics.median(cpus)
            wall = statistics.median(times)
            extra = ""
            if dashboard is True:
                extra = "   (%d updates read, %.0f kB each on average)" % (
                    len(updates), sum(updates) / max(len(updates), 1) / 1000)
            if dashboard is not False:
                extra = "   overhead %+.1f %%%s" % (
                    100 * (medians[dashboard] / medians[False] - 1), extra)
            print("   %-30s center CPU %5.2f s (wall %5.2f s)%s"
                  % (labels[dashboard], medians[dashboard], wall, extra))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-e2e", action="store_true", help="only the scheduler part")
    args = p.parse_args()
    print("load average: %.2f %.2f %.2f" % os.getloadavg())
    scheduler_part(args.tasks, args.repeat)
    if not args.no_e2e:
        e2e_part(args.tasks, max(3, args.repeat // 2))


if __name__ == "__main__":
    main()
