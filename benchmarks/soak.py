#!/usr/bin/env python
"""Soak benchmark: a million tiny tasks, and nothing may grow.

Run from the repository root::

    python benchmarks/soak.py                    # 1,000,000 tasks, a few minutes
    python benchmarks/soak.py --tasks 100000     # a short run, well under a minute
    python benchmarks/soak.py --help             # --batch --warmup --rss-mib ...

A ``LocalCluster(n_workers=2, threads_per_worker=1)`` (a center and two
worker processes) computes ``e.map(inc, range(i, i + batch))`` followed by a
``gather`` of the results, batch after batch, each with new keys; the futures
of a batch are dropped before the next one starts, so the cluster must
forget them.  After every batch the script samples, by PID with psutil, the
RSS and the number of open file descriptors of the center, of both workers
and of this (the client) process, and prints a row: batch, tasks per second,
RSS of each process (MiB) and their fds.

At the end it checks that, from the end of the warm-up (``--warmup``
batches, default 10) to the end of the run,

* the RSS of every process grew by no more than ``--rss-mib`` (default
  50 MiB) or ``--rss-pct`` (default 10 %) of its post-warm-up RSS,
  whichever is larger, and
* the open fds of every process did not grow by more than ``--fd-slack``
  (default 2) over the highest count seen during the warm-up,

prints PASS or FAIL with the reasons, and exits 1 on FAIL.  Every process
it starts is stopped on exit, including on error and Ctrl-C.
"""

import argparse
import os
import sys
import time

import psutil

from distributed.executor import Executor
from distributed.local import LocalCluster
from distributed.utils_test import inc

MiB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=1_000_000,
                   help="total number of tasks (default 1,000,000)")
    p.add_argument("--batch", type=int, default=10_000,
                   help="tasks per map/gather batch (default 10,000)")
    p.add_argument("--warmup", type=int, default=10,
                   help="batches before the baseline is taken (default 10; at most "
                        "half of the batches)")
    p.add_argument("--rss-mib", type=float, default=50,
                   help="allowed RSS growth per process after warm-up, MiB (default 50)")
    p.add_argument("--rss-pct", type=float, default=10,
                   help="allowed RSS growth per process after warm-up, %% (default 10); "
                        "the larger of the two allowances applies")
    p.add_argument("--fd-slack", type=int, default=2,
                   help="allowed growth of open fds over the warm-up maximum (default 2)")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds allowed for one batch (default 300)")
    return p.parse_args(argv)


def sample(procs):
    """``[(rss bytes, open fds)]`` of each process."""
    out = []
    for p in procs:
        with p.oneshot():
            out.append((p.memory_info().rss, p.num_fds()))
    return out


def main(argv=None):
    args = parse_args(argv)
    nbatches = max(1, args.tasks // args.batch)
    warmup = max(1, min(args.warmup, nbatches // 2))
    print("soak: %d tasks in %d batches of %d on LocalCluster(n_workers=2, "
          "threads_per_worker=1); baseline after batch %d"
          % (nbatches * args.batch, nbatches, args.batch, warmup), flush=True)
    print("python %s, psutil %s, pid %d, %d CPUs, load average %.2f"
          % (sys.version.split()[0], psutil.__version__, os.getpid(), os.cpu_count(),
             os.getloadavg()[0]), flush=True)

    with LocalCluster(n_workers=2, threads_per_worker=1, timeout=60,
                      restart_dead_workers=False) as cluster, \
            Executor(cluster.center_address, timeout=30) as e:
        names = ["center", "worker-A", "worker-B", "client"]
        pids = [cluster.center.pid] + [p.pid for p in cluster.workers] + [os.getpid()]
        procs = [psutil.Process(pid) for pid in pids]
        print("pids: %s" % ", ".join("%s %d" % nv for nv in zip(names, pids)))
        short = ["center", "wA", "wB", "client"]
        print("%6s %9s %10s  " % ("batch", "tasks", "tasks/s")
              + " ".join("%10s" % (n + " MiB") for n in short) + "  "
              + " ".join("%9s" % ("fd " + n) for n in short))
        rows = []  # (batch, seconds, samples)
        start = time.time()
        for b in range(1, nbatches + 1):
            lo = (b - 1) * args.batch
            t = time.perf_counter()
            futures = e.map(inc, range(lo, lo + args.batch))
            results = e.sync(e._gather, futures, timeout=args.timeout)
            elapsed = time.perf_counter() - t
            if results[0] != lo + 1 or results[-1] != lo + args.batch \
                    or len(results) != args.batch:
                print("FAIL: wrong results in batch %d" % b)
                return 1
            del futures, results
            s = sample(procs)
            rows.append((b, elapsed, s))
            print("%6d %9d %10.0f  " % (b, b * args.batch, args.batch / elapsed)
                  + " ".join("%10.1f" % (rss / MiB) for rss, _ in s) + "  "
                  + " ".join("%9d" % fds for _, fds in s), flush=True)
            if any(p.poll() is not None for p in [cluster.center] + cluster.workers):
                print("FAIL: a cluster process died during batch %d" % b)
                return 1
        total = time.time() - start
        ncores = e.ncores()

    # -- the verdict -----------------------------------------------------------
    base = rows[warmup - 1][2]
    end = rows[-1][2]
    warm_fds = [max(r[2][i][1] for r in rows[:warmup]) for i in range(len(names))]
    rates = [args.batch / r[1] for r in rows[warmup:]] or [args.batch / rows[-1][1]]
    rates.sort()
    print()
    print("%d tasks in %.1f s: %.0f tasks/s overall; after warm-up median %.0f, "
          "min %.0f, max %.0f tasks/s per batch"
          % (nbatches * args.batch, total, nbatches * args.batch / total,
             rates[len(rates) // 2], rates[0], rates[-1]))
    failures = []
    if len(ncores) != 2:
        failures.append("the center lists %d workers at the end, not 2" % len(ncores))
    print("%-9s %12s %12s %10s %9s   %s" % ("process", "RSS@warmup", "RSS@end", "growth",
                                          "allowed", "fds warm-up max -> end"))
    for i, name in enumerate(names):
        rss0, rss1 = base[i][0], end[i][0]
        allowed = max(args.rss_mib * MiB, rss0 * args.rss_pct / 100)
        growth = rss1 - rss0
        peak = max(r[2][i][0] for r in rows[warmup - 1:])
        ok_rss = growth <= allowed
        ok_fds = end[i][1] <= warm_fds[i] + args.fd_slack
        print("%-9s %9.1f MiB %9.1f MiB %+7.1f MiB %6.1f MiB   %d -> %d   (peak RSS after "
              "warm-up %.1f MiB)%s"
              % (name, rss0 / MiB, rss1 / MiB, growth / MiB, allowed / MiB, warm_fds[i],
                 end[i][1], peak / MiB, "" if ok_rss and ok_fds else "   <-- FAIL"))
        if not ok_rss:
            failures.append("%s RSS grew by %.1f MiB after warm-up (allowed %.1f MiB)"
                            % (name, growth / MiB, allowed / MiB))
        if not ok_fds:
            failures.append("%s open fds grew from %d to %d"
                            % (name, warm_fds[i], end[i][1]))
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS: RSS of every process within max(%g MiB, %g%%) of its post-warm-up value, "
          "fds flat" % (args.rss_mib, args.rss_pct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
