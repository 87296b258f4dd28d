#!/usr/bin/env python
"""Side-by-side benchmarks: our ``distributed`` against dask.distributed.

::

    python benchmarks/compare.py                  # everything, ~3-5 minutes
    python benchmarks/compare.py --repeat 5       # more repetitions (default 3;
                                                  # rpc and the 256 MiB ones: >= 5)
    python benchmarks/compare.py --only map tree  # some workloads only

Both packages are called ``distributed``, so dask's never goes into this
environment: on first use this script makes ``benchmarks/.peer-venv``
(``python -m venv``) and installs ``dask[distributed]==2026.8.0``, numpy and
psutil there; later runs reuse it.

Every workload runs in a fresh process of its own, for each system, on a
local cluster of 2 single-threaded worker processes with default settings:

- ours: ``benchmarks/workloads_ours.py`` with this interpreter
  (``LocalCluster(n_workers=2, threads_per_worker=1)`` +
  ``Executor(cluster.center_address)``);
- dask: ``benchmarks/workloads_dask.py`` with the peer venv's interpreter
  (``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` +
  ``Client(cluster)``).

Each does one warm-up and ``--repeat`` (default 3; at least 5 for the cheap,
noisy ones: rpc and the 256 MiB transfers) measured repetitions and prints
its figures as JSON on its last stdout line.  This script adds the
system-independent ceiling (plain loopback TCP: 256 MiB throughput and an
11-byte ping-pong, between two processes), prints a table with the ratios
and the targets, and writes everything to ``benchmarks/results-latest.json``.

Every process started (also the clusters' grandchildren) is killed when it
outlives its workload, on a time-out, on Ctrl-C and on error.  MB means
10**6 bytes.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".peer-venv")
PEER_PY = os.path.join(VENV, "bin", "python")
PEER_PIP = os.path.join(VENV, "bin", "pip")
PEER_DASK = "2026.8.0"
PEER_REQUIREMENTS = ["dask[distributed]==%s" % PEER_DASK, "numpy", "psutil"]
RESULTS = os.path.join(HERE, "results-latest.json")
SCRIPTS = {"ours": os.path.join(HERE, "workloads_ours.py"),
           "dask": os.path.join(HERE, "workloads_dask.py")}
WORKLOADS = ["rpc", "submit", "map", "tree", "transfer", "scatter_gather"]
#: cheap but noisy workloads get at least this many repetitions
FAST_WORKLOADS = {"rpc": 5, "transfer": 5, "scatter_gather": 5}
PAYLOAD = 256 * 2**20
MB = 1e6
BUDGET_S = 60.0  # per workload, without the cluster's start and stop


def log(*args):
    print("[%s]" % time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the peer venv


def peer_version():
    """dask's distributed version in the peer venv, or None."""
    if not os.path.exists(PEER_PY):
        return None
    try:
        out = subprocess.run(
            [PEER_PY, "-c", "import dask, distributed, numpy, psutil; "
             "print(distributed.__version__, distributed.__file__)"],
            capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir(),
            env=_child_env())
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    version, path = out.stdout.split()
    if not path.startswith(VENV):
        raise RuntimeError("the peer venv imports distributed from %s, not from "
                           "itself" % path)
    return version


def ensure_peer_venv():
    version = peer_version()
    if version == PEER_DASK:
        return version
    if not os.path.exists(PEER_PY):
        log("creating the peer venv %s (one time)" % VENV)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    log("installing %s into the peer venv (one time)" % " ".join(PEER_REQUIREMENTS))
    subprocess.run([PEER_PIP, "install", "--quiet"] + PEER_REQUIREMENTS, check=True,
                   env=_child_env())
    version = peer_version()
    if version != PEER_DASK:
        raise RuntimeError("the peer venv has distributed %r, wanted %s"
                           % (version, PEER_DASK))
    return version


def _child_env():
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------------
# child processes, and everything they start


class Reaper:
    """Remember every descendant of the children; kill what outlives them."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.seen = {}  # pid -> create_time
        self.lock = threading.Lock()
        self.active = set()

    def scan(self, pid):
        ps = self.psutil
        try:
            root = ps.Process(pid)
            procs = [root] + root.children(recursive=True)
        except ps.Error:
            return
        with self.lock:
            for p in procs:
                try:
                    self.seen.setdefault(p.pid, p.create_time())
                except ps.Error:
                    pass

    def watch(self, popen):
        self.active.add(popen)

        def run():
            while popen.poll() is None:
                self.scan(popen.pid)
                time.sleep(0.2)

        threading.Thread(target=run, daemon=True).start()

    def alive(self):
        ps = self.psutil
        out = []
        with self.lock:
            items = list(self.seen.items())
        for pid, ctime in items:
            try:
                p = ps.Process(pid)
                if p.create_time() == ctime and p.status() != ps.STATUS_ZOMBIE:
                    out.append(p)
            except ps.Error:
                pass
        return out

    def reap(self, grace=3.0):
        """Terminate (then kill) every remembered process still alive."""
        ps = self.psutil
        procs = self.alive()
        descr = []
        for p in procs:
            try:
                descr.append("%d %s" % (p.pid, " ".join(p.cmdline()[:4])))
                p.terminate()
            except ps.Error:
                pass
        _, left = ps.wait_procs(procs, timeout=grace)
        for p in left:
            try:
                p.kill()
            except ps.Error:
                pass
        ps.wait_procs(left, timeout=grace)
        with self.lock:
            self.seen.clear()
        return descr


REAPER = None


def run_child(cmd, timeout, cwd):
    """Run ``cmd``; return (returncode, stdout, stderr, timed_out, leftovers)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True, cwd=cwd,
                         env=_child_env(), start_new_session=True)
    REAPER.watch(p)
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        REAPER.scan(p.pid)
        p.send_signal(signal.SIGTERM)  # lets the script close its cluster
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    except BaseException:
        REAPER.scan(p.pid)
        p.kill()
        p.wait()
        REAPER.reap()
        raise
    finally:
        REAPER.active.discard(p)
    # whatever it started should be gone by now; give it a moment
    deadline = time.time() + 3
    while REAPER.alive() and time.time() < deadline:
        time.sleep(0.1)
    leftovers = REAPER.reap()
    return p.returncode, out, err, timed_out, leftovers


def run_workload(system, name, repeat, timeout, cwd):
    python = sys.executable if system == "ours" else PEER_PY
    cmd = [python, SCRIPTS[system], "--workload", name, "--repeat", str(repeat)]
    t0 = time.time()
    rc, out, err, timed_out, leftovers = run_child(cmd, timeout, cwd)
    wall = time.time() - t0
    result = None
    for line in reversed(out.strip().splitlines()):
        try:
            result = json.loads(line)
            break
        except ValueError:
            continue
    if result is None:
        result = {"ok": False,
                  "error": "timed out after %s s" % timeout if timed_out
                  else "no JSON on stdout (exit code %s)" % rc}
    result["wall_s"] = round(wall, 2)
    result["returncode"] = rc
    if timed_out:
        result["timed_out"] = True
    if leftovers:
        result["leftover_processes"] = leftovers
    # the per-repetition log lines (and tracebacks, when it failed)
    result["stderr_tail"] = err[-6000:]
    if not result.get("ok"):
        result["stdout_tail"] = out[-2000:]
    return result


# ---------------------------------------------------------------------------
# the ceiling: plain sockets between two processes


def raw_server():
    """``--raw-server``: serve one connection, plain sockets, until 'Q'."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print("RAW", srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reused = bytearray(PAYLOAD)
    while True:
        cmd = _recv_exact(conn, 9)
        op, n = cmd[:1], struct.unpack("<Q", cmd[1:])[0]
        if op == b"P":  # n ping-pongs of 11 bytes
            for _ in range(n):
                conn.sendall(_recv_exact(conn, 11))
        elif op in (b"T", b"F"):  # n bytes into a reused / a fresh buffer
            buf = reused if op == b"T" and n <= len(reused) else bytearray(n)
            view = memoryview(buf)[:n]
            pos = 0
            while pos < n:
                got = conn.recv_into(view[pos:], n - pos)
                if not got:
                    return
                pos += got
            del view, buf
            conn.sendall(b"k")
        else:
            return


def _recv_exact(conn, n):
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = conn.recv_into(view[pos:], n - pos)
        if not got:
            raise EOFError("the peer closed")
        pos += got
    return bytes(buf)


def _summary(values, unit):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 6) for v in values], "unit": unit}


def _pct(values, q):
    s = sorted(values)
    return s[max(0, min(len(s) - 1, -(-q * len(s) // 100) - 1))]


def raw_tcp(repeat, pings=2000):
    import numpy as np

    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-server"],
                         stdout=subprocess.PIPE, text=True, env=_child_env(),
                         start_new_session=True)
    REAPER.watch(p)
    try:
        port = int(p.stdout.readline().split()[1])
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = memoryview(np.random.random(PAYLOAD // 8).view(np.uint8))
        msg = b"hello world"

        def pingpong():
            s.sendall(b"P" + struct.pack("<Q", pings))
            out = []
            for _ in range(pings):
                t = time.perf_counter()
                s.sendall(msg)
                assert _recv_exact(s, 11) == msg
                out.append((time.perf_counter() - t) * 1e6)
            return out

        def transfer(op):
            t = time.perf_counter()
            s.sendall(op + struct.pack("<Q", PAYLOAD))
            s.sendall(payload)
            assert _recv_exact(s, 1) == b"k"
            return PAYLOAD / (time.perf_counter() - t) / MB

        pingpong(), transfer(b"T"), transfer(b"F")  # warm-up
        med, p99, reused, fresh = [], [], [], []
        for _ in range(repeat):
            rtt = pingpong()
            med.append(_pct(rtt, 50))
            p99.append(_pct(rtt, 99))
            reused.append(transfer(b"T"))
            fresh.append(transfer(b"F"))
        s.sendall(b"Q" + struct.pack("<Q", 0))
        s.close()
        return {"ok": True, "figures": {
            "pingpong_median_us": _summary(med, "us"),
            "pingpong_p99_us": _summary(p99, "us"),
            "MB_per_s": _summary(reused, "MB/s"),
            "fresh_buffer_MB_per_s": _summary(fresh, "MB/s")},
            "notes": ["plain sockets, TCP_NODELAY, 127.0.0.1, this interpreter; "
                      "256 MiB float64 bytes sent with one sendall, received with "
                      "recv_into a reused buffer (MB_per_s, the ceiling) or a fresh "
                      "bytearray (fresh_buffer_MB_per_s); %d 11-byte ping-pongs per rep"
                      % pings]}
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------
# the table


def _ran(results, system, workload):
    return workload in results.get(system, {})


def _get(results, system, workload, figure):
    r = results.get(system, {}).get(workload)
    if not r or not r.get("ok"):
        return None
    f = r.get("figures", {}).get(figure)
    return f


# (label, workload, figure, unit, better, target): target is
#   ("ratio>=", x), ("ratio<=", x), ("abs<=", x) on ours, or None (information)
ROWS = [
    ("rpc round trip, 11 B echo, median", "rpc", "echo_median_us", "µs", "lower",
     ("ratio<=", 0.5)),
    ("rpc round trip, 11 B echo, p99", "rpc", "echo_p99_us", "µs", "lower", None),
    ("rpc to center/scheduler, median (ours ping, dask echo)", "rpc",
     "center_median_us", "µs", "lower", None),
    ("one task submit→result (200×), median", "submit", "median_us", "µs", "lower",
     ("ratio<=", 0.1)),
    ("map(inc, 10k) + gather", "map", "tasks_per_s", "tasks/s", "higher",
     ("ratio>=", 4.0)),
    ("tree reduction, 8191 tasks", "tree", "tasks_per_s", "tasks/s", "higher",
     ("ratio>=", 4.0)),
    ("worker→worker 256 MiB (whole 2nd task)", "transfer", "MB_per_s", "MB/s",
     "higher", ("ratio>=", 1.2)),
    ("worker→worker as % of raw TCP", "transfer", "pct_of_raw", "%", "higher",
     ("abs>=", 75.0)),
    ("scatter 256 MiB client→worker", "scatter_gather", "scatter_MB_per_s", "MB/s",
     "higher", ("ratio>=", 2.0)),
    ("gather 256 MiB worker→client", "scatter_gather", "gather_MB_per_s", "MB/s",
     "higher", ("ratio>=", 2.0)),
    ("peak RSS sender during w→w, × payload", "transfer", "rss_sender_x", "×",
     "lower", ("abs<=", 1.2)),
    ("peak RSS receiver during w→w, × payload", "transfer", "rss_receiver_x", "×",
     "lower", ("abs<=", 1.2)),
    ("sender RSS still held after release, × payload", "transfer", "held_sender_x",
     "×", "lower", None),
    ("receiver RSS still held after release, × payload", "transfer",
     "held_receiver_x", "×", "lower", None),
]
INFO_ROWS = [  # dask-only extras
    ("dask scatter with direct=True", "scatter_gather", "scatter_direct_MB_per_s",
     "MB/s"),
    ("dask gather with direct=True", "scatter_gather", "gather_direct_MB_per_s", "MB/s"),
]


def _fmt(x):
    if x is None:
        return "—"
    a = abs(x)
    if a >= 1000:
        return "{:,.0f}".format(x)
    if a >= 100:
        return "%.0f" % x
    if a >= 10:
        return "%.1f" % x
    if a >= 1:
        return "%.2f" % x
    return "%.3f" % x


def _cell(f, ran=True):
    if f is None:
        return "FAILED" if ran else "not run"
    if len(f["values"]) > 1:
        return "%s [%s–%s]" % (_fmt(f["median"]), _fmt(f["min"]), _fmt(f["max"]))
    return _fmt(f["median"])


def add_derived(results):
    """w→w throughput as a percentage of the raw TCP ceiling."""
    raw = results.get("raw", {})
    ceiling = raw.get("figures", {}).get("MB_per_s", {}).get("median") if raw.get("ok") else None
    for system in ("ours", "dask"):
        r = results.get(system, {}).get("transfer")
        if ceiling and r and r.get("ok"):
            f = r["figures"]["MB_per_s"]
            r["figures"]["pct_of_raw"] = {
                k: (100.0 * f[k] / ceiling) for k in ("median", "min", "max")}
            r["figures"]["pct_of_raw"]["values"] = [
                round(100.0 * v / ceiling, 2) for v in f["values"]]
            r["figures"]["pct_of_raw"]["unit"] = "% of raw TCP"


def build_table(results):
    rows = []
    for label, wl, fig, unit, better, target in ROWS:
        o, d = _get(results, "ours", wl, fig), _get(results, "dask", wl, fig)
        # no ratio of two near-zeros (e.g. no extra memory on either side)
        ratio = (o["median"] / d["median"]
                 if o and d and abs(d["median"]) > 1e-3 and abs(o["median"]) > 1e-3
                 else None)
        if target is None:
            tgt, met = "—", "info"
        else:
            kind, x = target
            if kind == "ratio>=":
                tgt = "ours/dask ≥ %g×" % x
                ok = ratio is not None and ratio >= x
            elif kind == "ratio<=":
                tgt = "ours/dask ≤ %g×" % x
                ok = ratio is not None and ratio <= x
            elif kind == "abs>=":
                tgt = "ours ≥ %g%s" % (x, unit)
                ok = o is not None and o["median"] >= x
            else:
                tgt = "ours ≤ %g%s" % (x, unit)
                ok = o is not None and o["median"] <= x
            if o is None or (kind.startswith("ratio") and d is None):
                met = "n/a (failed)" if _ran(results, "ours", wl) else "n/a (not run)"
            else:
                met = "yes" if ok else "**NO**"
        rows.append({
            "workload": "%s [%s]" % (label, unit), "id": "%s.%s" % (wl, fig),
            "ours": _cell(o, _ran(results, "ours", wl)),
            "dask": _cell(d, _ran(results, "dask", wl)),
            "ratio": ("%s (%s is better)" % (_fmt(ratio), better)) if ratio else "—",
            "ratio_value": ratio, "target": tgt, "met": met,
            "ours_median": o and o["median"], "dask_median": d and d["median"]})
    raw = results.get("raw", {})
    if raw.get("ok"):
        rf = raw["figures"]
        rows.append({"workload": "raw loopback TCP 256 MiB, the ceiling [MB/s]",
                     "id": "raw.MB_per_s", "ours": _cell(rf["MB_per_s"]),
                     "dask": "(same: system-independent)", "ratio": "—",
                     "target": "—", "met": "info"})
        rows.append({"workload": "raw TCP into a fresh bytearray [MB/s]",
                     "id": "raw.fresh_buffer_MB_per_s",
                     "ours": _cell(rf["fresh_buffer_MB_per_s"]),
                     "dask": "(same: system-independent)", "ratio": "—",
                     "target": "—", "met": "info"})
        rows.append({"workload": "raw TCP ping-pong 11 B, median / p99 [µs]",
                     "id": "raw.pingpong", "ours": "%s / %s" % (
                         _fmt(rf["pingpong_median_us"]["median"]),
                         _fmt(rf["pingpong_p99_us"]["median"])),
                     "dask": "(same: system-independent)", "ratio": "—",
                     "target": "—", "met": "info"})
    for label, wl, fig, unit in INFO_ROWS:
        d = _get(results, "dask", wl, fig)
        if d:
            rows.append({"workload": "%s [%s]" % (label, unit), "id": "dask.%s" % fig,
                         "ours": "—", "dask": _cell(d), "ratio": "—", "target": "—",
                         "met": "info"})
    return rows


def markdown(rows):
    head = ["workload", "ours", "dask", "ratio ours/dask", "target", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(
            [r["workload"], r["ours"], r["dask"], r["ratio"], r["target"], r["met"]]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def machine():
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import psutil

    return {"nproc": os.cpu_count(), "cpu_model": model or platform.processor(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def git_state():
    """Which code of ours was measured: HEAD and whether distributed/ is dirty."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "distributed"],
                               cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.split("\n")
        return {"head": head, "distributed_changes": [d for d in dirty if d.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3,
                        help="measured repetitions per workload (at least 3)")
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument("--systems", nargs="+", choices=["ours", "dask"],
                        default=["ours", "dask"])
    parser.add_argument("--timeout", type=float, default=150,
                        help="seconds after which one workload process is killed")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    if args.repeat < 3:
        parser.error("--repeat must be at least 3")

    global REAPER
    REAPER = Reaper()

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    cwd = tempfile.mkdtemp(prefix="distributed-compare-")
    t0 = time.time()
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine(), "repeat": args.repeat,
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "git": git_state(), "ours": {}, "dask": {}}
    try:
        if "dask" in args.systems:
            results["dask_version"] = ensure_peer_venv()
        log("raw loopback TCP (the ceiling)")
        try:
            results["raw"] = raw_tcp(args.repeat)
        except Exception as e:
            results["raw"] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        REAPER.reap()
        for wl in args.only:
            for system in args.systems:
                log("%s: %s" % (system, wl))
                n = max(args.repeat, FAST_WORKLOADS.get(wl, 0))
                r = run_workload(system, wl, n, args.timeout, cwd)
                results[system][wl] = r
                if r.get("ok"):
                    log("  %s in %.1f s (workload %.1f s): %s" % (
                        system, r["wall_s"], r.get("workload_s", 0), ", ".join(
                            "%s=%s" % (k, _fmt(v["median"]))
                            for k, v in r["figures"].items())))
                    if r.get("over_budget"):
                        log("  WARNING: over the %d s budget" % BUDGET_S)
                else:
                    log("  %s FAILED: %s\n%s" % (system, r.get("error"),
                                                 r.get("traceback") or r.get("stderr_tail")))
                if r.get("leftover_processes"):
                    log("  leftover processes killed: %s" % r["leftover_processes"])
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        results["interrupted"] = True
    finally:
        leftovers = REAPER.reap()
        if leftovers:
            log("killed leftover processes: %s" % leftovers)
        shutil.rmtree(cwd, ignore_errors=True)
    results["total_s"] = round(time.time() - t0, 1)
    results["machine"]["loadavg_end"] = os.getloadavg()
    add_derived(results)
    rows = build_table(results)
    results["table"] = rows
    results["table_markdown"] = markdown(rows)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False, default=str)
    m = results["machine"]
    print()
    print("ours vs dask.distributed %s, %s; %d cores (%s); 1 warm-up + %d reps "
          "(%s: %s), median [min–max]; %.0f s" % (
              results.get("dask_version", "?"), results["date"], m["nproc"],
              m["cpu_model"], args.repeat, ", ".join(sorted(FAST_WORKLOADS)),
              max([args.repeat] + list(FAST_WORKLOADS.values())), results["total_s"]))
    print()
    print(markdown(rows))
    print()
    for system in ("ours", "dask"):
        notes = []
        for r in results[system].values():
            for n in r.get("notes", []):
                if n not in notes:
                    notes.append(n)
        for n in notes:
            print("- %s: %s" % (system, n))
    g = results.get("git", {})
    if g:
        print("- ours measured at %s%s" % (g.get("head"), " with uncommitted changes in "
              "distributed/: %s" % ", ".join(g["distributed_changes"])
              if g.get("distributed_changes") else ""))
    over = ["%s/%s %.0f s" % (s, w, r.get("workload_s", 0))
            for s in ("ours", "dask") for w, r in results[s].items()
            if r.get("over_budget")]
    if over:
        print("over the %d s per-workload budget: %s" % (BUDGET_S, ", ".join(over)))
    failed = ["%s/%s: %s" % (s, w, r.get("error")) for s in ("ours", "dask")
              for w, r in results[s].items() if not r.get("ok")]
    if failed:
        print("FAILED: " + "; ".join(failed))
    print("load average at start %s, at end %s (other processes on the machine "
          "disturb the figures)" % (tuple(round(x, 2) for x in m["loadavg_start"]),
                                   tuple(round(x, 2) for x in m["loadavg_end"])))
    print("results: %s" % os.path.relpath(args.output))
    return 1 if failed or results.get("interrupted") else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--raw-server"]:
        raw_server()
    else:
        sys.exit(main())
