"""What the dashboard shows, as JSON-safe dicts made from a center's tables
and its :class:`~distributed.dashboard.plugin.DashboardPlugin`.  Pure: no
I/O, nothing changed; each function costs O(workers + groups + what it
returns), never O(tasks) unless its docstring says so.

::

    snapshot(center, plugin)        # the status page's update, once a second
    stream_since(plugin, seq)       # finished tasks after ``seq`` (the deltas)
    worker_detail(center, address)  # the page of one worker
"""

import time
from collections import Counter

from ..http.base import json_key

__all__ = ["snapshot", "stream_since", "events_since", "worker_rows", "worker_detail",
           "task_counts"]

#: at most this many finished tasks per update (the browser keeps up)
MAX_STREAM_PER_UPDATE = 2000
#: at most this many events per update
MAX_EVENTS_PER_UPDATE = 200
#: keys and tasks listed on a worker's page
MAX_LISTED = 1000


def worker_rows(center):
    """One dict per live worker: what the workers table and memory bars show."""
    now = time.time()
    s = center.scheduler
    rows = []
    for address, ncores in sorted(center.ncores.items()):
        m = center.metrics.get(address, {})
        ws = s.workers.get(address)
        rss = m.get("memory_rss") or 0
        managed = m.get("memory_bytes") or 0
        rows.append({
            "address": address,
            "name": str(center.names.get(address, address)),
            "threads": ncores,
            "memory": rss,
            "memory_limit": m.get("memory_limit"),
            "managed": managed,
            "unmanaged": max(rss - managed, 0),
            "spilled": m.get("spilled_bytes") or 0,
            "cpu": m.get("cpu"),
            "processing": len(ws.processing) if ws is not None else 0,
            "queued": len(ws.queue) if ws is not None else 0,
            "keys": len(s.has_what.get(address, ())),
            "last_seen": now - center.last_seen.get(address, now),
            "paused": bool(ws.paused) if ws is not None else bool(m.get("paused")),
        })
    return rows


def stream_since(plugin, seq):
    """The finished tasks of ``plugin.stream`` after number ``seq`` (the
    latest :data:`MAX_STREAM_PER_UPDATE`), as lists ``[seq, key, prefix,
    worker, thread, start, stop, transfer_start, transfer_stop]``."""
    return [list(entry) for entry in plugin.stream_since(seq, MAX_STREAM_PER_UPDATE)]


def events_since(center, plugin, seq, since_time):
    """Events after number ``seq``, and the deaths the nannies told the
    center of after ``since_time``: ``[seq, time, kind, subject, text]``."""
    events = _since(plugin.events, seq, MAX_EVENTS_PER_UPDATE)
    for t, address, cause in center.deaths[-MAX_EVENTS_PER_UPDATE:]:
        if t > since_time:
            events.append([None, t, "worker-died", address or "", str(cause)])
    events.sort(key=lambda e: e[1])
    return events


def _since(entries, seq, limit):
    out = []
    for entry in reversed(entries):  # newest first: stops at the first seen
        if entry[0] <= seq or len(out) >= limit:
            break
        out.append(list(entry))
    out.reverse()
    return out


def snapshot(center, plugin):
    """Everything of the status page but the deltas: workers, task groups,
    and task counts by state (from the groups: O(groups))."""
    groups = [{"name": prefix, "waiting": c[0], "processing": c[1], "memory": c[2],
               "erred": c[3], "done": c[4]}
              for prefix, c in plugin.groups.items() if any(c)]
    return {
        "time": time.time(),
        "address": center.address,
        "workers": worker_rows(center),
        "groups": groups,
        "ntasks": len(center.scheduler.tasks),
    }


def task_counts(scheduler):
    """``{state: n}`` of every task the scheduler knows (O(tasks): on request)."""
    return dict(Counter(ts.state for ts in scheduler.tasks.values()))


def worker_detail(center, address):
    """The page of worker ``address``: its row, keys, current tasks; None if
    it is not a live worker."""
    if address not in center.ncores:
        return None
    row = next(r for r in worker_rows(center) if r["address"] == address)
    s = center.scheduler
    ws = s.workers.get(address)
    held = s.has_what.get(address, ())
    keys = []
    for key in held:
        if len(keys) >= MAX_LISTED:
            break
        keys.append({"key": json_key(key), "nbytes": s.nbytes.get(key)})
    processing = [json_key(ts.key) for ts in list(ws.processing)[:MAX_LISTED]] if ws else []
    queued = [json_key(item[-1].key) for item in (ws.queue[:MAX_LISTED] if ws else [])]
    return {"worker": row, "metrics": dict(center.metrics.get(address, {})),
            "keys": keys, "nkeys": len(held), "processing": processing, "queued": queued,
            "services": center.worker_services.get(address, {})}
