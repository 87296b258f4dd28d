"""``/metrics``: a center's state in the Prometheus text format.

A custom collector reads the center's tables when Prometheus scrapes, into
a registry of its own (not the global one: several centers may share a
process, as in the tests)::

    registry = center_registry(center)
    text = prometheus_client.generate_latest(registry)
"""

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..scheduler import STATES
from .state import task_counts

__all__ = ["CenterCollector", "center_registry"]


class CenterCollector:
    """Workers, threads, tasks by state, memory and task groups of ``center``."""

    def __init__(self, center, plugin=None):
        self.center = center
        self.plugin = plugin

    def collect(self):
        c = self.center
        yield GaugeMetricFamily("distributed_workers", "Workers connected to the center",
                                value=len(c.ncores))
        yield GaugeMetricFamily("distributed_threads", "Threads of all workers",
                                value=sum(n or 0 for n in c.ncores.values()))
        tasks = GaugeMetricFamily("distributed_tasks", "Tasks the scheduler knows, by state",
                                  labels=["state"])
        counts = task_counts(c.scheduler)
        for state in sorted(STATES):
            tasks.add_metric([state], counts.get(state, 0))
        yield tasks
        memory = GaugeMetricFamily("distributed_worker_memory_bytes",
                                   "Memory of each worker: rss (the process), managed "
                                   "(its data in memory), spilled (its data on disk), limit",
                                   labels=["worker", "kind"])
        cpu = GaugeMetricFamily("distributed_worker_cpu_percent",
                                "CPU use of each worker process", labels=["worker"])
        for address in c.ncores:
            m = c.metrics.get(address, {})
            for kind, field in (("rss", "memory_rss"), ("managed", "memory_bytes"),
                                ("spilled", "spilled_bytes"), ("limit", "memory_limit")):
                if m.get(field) is not None:
                    memory.add_metric([address, kind], m[field])
            if m.get("cpu") is not None:
                cpu.add_metric([address], m["cpu"])
        yield memory
        yield cpu
        yield GaugeMetricFamily("distributed_keys_in_memory",
                                "Keys held by workers", value=len(c.who_has))
        yield CounterMetricFamily("distributed_worker_deaths",
                                  "Worker deaths the nannies reported", value=len(c.deaths))
        if self.plugin is not None:
            done = CounterMetricFamily("distributed_tasks_computed",
                                       "Tasks computed, by task group", labels=["group"])
            for prefix, counts in list(self.plugin.groups.items()):
                done.add_metric([prefix], counts[4])
            yield done


def center_registry(center, plugin=None):
    """A fresh registry holding only the collector of ``center``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CenterCollector(center, plugin))
    return registry
