"""Shared measuring code for ``workloads_ours.py`` and ``workloads_dask.py``.

Imports only the standard library and psutil, so that it runs both in the
main environment (our ``distributed``) and in ``benchmarks/.peer-venv``
(dask's ``distributed``): it must never import ``distributed`` itself.

A workload script is run as ``python workloads_X.py --workload NAME
[--repeat N]``; it prints progress on stderr and exactly one JSON object on
the last line of stdout::

    {"system": "ours", "workload": "map", "ok": true, "elapsed_s": 12.3,
     "figures": {"tasks_per_s": {"median": ..., "min": ..., "max": ...,
                                 "values": [...], "unit": "tasks/s"}},
     "notes": [...]}

or ``{"ok": false, "error": ..., "traceback": ...}`` when it failed.
"""

import argparse
import gc
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
import traceback

import psutil

#: the big payload: 256 MiB of float64
PAYLOAD = 256 * 2**20
N_FLOATS = PAYLOAD // 8  # 2**25
MB = 1e6  # throughput unit: 10**6 bytes per second
ECHO = b"hello world"  # the 11-byte rpc message
assert len(ECHO) == 11

#: a workload (after its cluster started) should take less than this
WORKLOAD_BUDGET_S = 60.0


def log(*args):
    print("[%s]" % time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def percentile(values, q):
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def summarize(values, unit):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": [round(v, 6) for v in values],
        "unit": unit,
    }


def repeat(fn, n, warmup=1, units=None, label=""):
    """Call ``fn(i)`` ``warmup`` times (discarded), then ``n`` times.

    ``fn`` returns a dict ``{figure: value}``; the result is
    ``{figure: summarize(values)}``.
    """
    units = units or {}
    for i in range(warmup):
        t = time.perf_counter()
        r = fn(-1 - i)
        log("%s warm-up: %s (%.2f s)" % (label, _short(r), time.perf_counter() - t))
    per = {}
    for i in range(n):
        t = time.perf_counter()
        r = fn(i)
        log("%s rep %d: %s (%.2f s)" % (label, i + 1, _short(r), time.perf_counter() - t))
        for k, v in r.items():
            per.setdefault(k, []).append(v)
    return {k: summarize(v, units.get(k, "")) for k, v in per.items()}


def _short(r):
    return ", ".join("%s=%.4g" % (k, v) for k, v in r.items())


class RSSSampler:
    """Sample the RSS of some processes every ``interval`` s in a thread.

    ``baseline`` is taken at :meth:`start`; :meth:`stop` returns
    ``{pid: peak - baseline}`` in bytes.
    """

    def __init__(self, pids, interval=0.002):
        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.interval = interval
        self.baseline = {}
        self.peak = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def _rss(self):
        return {pid: p.memory_info().rss for pid, p in self.procs.items()}

    def _run(self):
        while not self._stop.is_set():
            for pid, rss in self._rss().items():
                if rss > self.peak[pid]:
                    self.peak[pid] = rss
            self.samples += 1
            time.sleep(self.interval)

    def start(self):
        self.baseline = self._rss()
        self.peak = dict(self.baseline)
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def stop(self):
        time.sleep(2 * self.interval)
        self._stop.set()
        self._thread.join()
        for pid, rss in self._rss().items():  # one last sample
            self.peak[pid] = max(self.peak[pid], rss)
        return {pid: self.peak[pid] - self.baseline[pid] for pid in self.procs}


async def time_calls(call, n):
    """Await ``call()`` ``n`` times; return the round trips in µs."""
    from time import perf_counter

    out = []
    for _ in range(n):
        t = perf_counter()
        await call()
        out.append((perf_counter() - t) * 1e6)
    return out


def settle(has_what, timeout=10.0):
    """Wait until no worker holds any key (``has_what()`` -> {addr: keys}).

    Returns the seconds waited, or raises with what is left after
    ``timeout``: a leak is a finding, not something to hide.
    """
    gc.collect()
    t0 = time.time()
    while True:
        left = {a: list(ks) for a, ks in has_what().items() if ks}
        if not left:
            return time.time() - t0
        if time.time() - t0 > timeout:
            raise RuntimeError("keys still held %.0f s after their futures were "
                               "released: %s" % (timeout, {a: ks[:5] for a, ks in left.items()}))
        time.sleep(0.02)


def _sigterm(signum, frame):
    raise SystemExit("terminated by signal %d" % signum)


def main(system, workloads, argv=None):
    """Command line of a workload script: run one workload, print its JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, choices=sorted(workloads))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    out = {"system": system, "workload": args.workload, "pid": os.getpid(),
           "python": sys.executable}
    meta = {"notes": [], "startup_s": 0.0}
    t0 = time.time()
    try:
        figures = workloads[args.workload](args.repeat, meta)
        out.update(ok=True, figures=figures)
    except BaseException as e:
        out.update(ok=False, error="%s: %s" % (type(e).__name__, e),
                   traceback=traceback.format_exc())
        log(traceback.format_exc())
    out["elapsed_s"] = round(time.time() - t0, 2)
    # the workload itself, without starting and stopping the cluster
    out["workload_s"] = round(out["elapsed_s"] - meta.get("startup_s", 0.0), 2)
    out["over_budget"] = out["workload_s"] > WORKLOAD_BUDGET_S
    out.update(meta)
    print(json.dumps(out), flush=True)
    sys.stdout.flush()
    return 0 if out["ok"] else 1
