"""``progress(futures)``: a progress bar in a terminal, a widget in Jupyter.

::

    futures = e.map(slowinc, range(100))
    progress(futures)            # blocks, drawing [######    ] | 60% Completed | 1.2s

In Jupyter (with ipywidgets installed) it returns at once and shows a
widget that fills as the futures finish.

It takes persisted dask collections too (their futures: one per partition),
and a future of ``e.compute(collection)`` counts the tasks of its graph (the
center says which are still to run), not just the one future::

    progress(e.persist(x))
    progress(e.compute(x.sum()))     # [####      ] | 40% Completed: 40 of 100 tasks
"""

import sys
import threading
import time

from .executor import _collect_futures

#: seconds between two questions to the center about one graph's tasks
GRAPH_POLL_INTERVAL = 0.5
#: states of a task still to run (see distributed.scheduler; a released one
#: of a graph being computed ran, and its dependents have its data now)
_TO_RUN = frozenset({"waiting", "no-worker", "queued", "processing"})

__all__ = ["progress", "TextProgressBar"]


def _in_notebook():
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress(*futures, notebook=None, width=40, interval=0.1, file=None):
    """Show the progress of ``futures`` (lists and dicts of them, and dask
    collections, accepted)."""
    flat = _collect_futures(list(futures))
    if notebook is None:
        notebook = _in_notebook()
    if notebook:
        try:
            return WidgetProgressBar(flat, interval=interval)
        except ImportError:
            pass
    bar = TextProgressBar(flat, width=width, interval=interval, file=file)
    bar.run()
    return None


class _Progress:
    def __init__(self, futures, interval=0.1):
        self.futures = futures
        self.interval = interval
        self.start = time.time()
        self._graph_counts = {}  # future key -> (time asked, tasks done)

    def counts(self):
        """``(done, erred, total)``: futures, or the tasks of the graph of a
        future of ``compute``."""
        done = errors = total = 0
        for f in self.futures:
            keys = getattr(f._state, "graph_keys", None)
            if keys and len(keys) > 1:
                d = len(keys) if f.done() else self._graph_done_cached(f, keys)
                done, total = done + d, total + len(keys)
            else:
                done, total = done + f.done(), total + 1
            errors += f.status == "error"
        return done, errors, total

    def _graph_done_cached(self, future, keys):
        asked, done = self._graph_counts.get(future.key, (0, 0))
        if time.time() - asked >= GRAPH_POLL_INTERVAL:
            done = self._graph_done(future, keys)
            self._graph_counts[future.key] = (time.time(), done)
        return done

    @staticmethod
    def _graph_done(future, keys):
        """How many tasks of ``future``'s graph are done, as the center says
        (none until the center knows the graph's final key)."""
        executor = future.executor
        try:
            states = executor.sync(executor.center.task_states, keys=keys,
                                   timeout=executor.timeout)
        except Exception:  # an executor on the caller's loop, a lost center
            return 0
        if states.get(future.key) is None:
            return 0  # the graph has not reached the center yet
        left = sum(1 for k in keys if states.get(k) in _TO_RUN)
        return min(len(keys) - left, len(keys) - 1)


class TextProgressBar(_Progress):
    """Redraws one line on ``file`` (default stdout) until all futures are done."""

    def __init__(self, futures, width=40, interval=0.1, file=None):
        super().__init__(futures, interval)
        self.width = width
        self.file = file or sys.stdout

    def format(self):
        done, errors, total = self.counts()
        frac = done / total if total else 1.0
        bar = "#" * int(self.width * frac)
        text = "\r[%-*s] | %3d%% Completed | %4.1fs" % (
            self.width, bar, int(100 * frac), time.time() - self.start)
        if errors:
            text += " | %d erred" % errors
        return text

    def run(self):
        while True:
            done, _, total = self.counts()
            self.file.write(self.format())
            self.file.flush()
            if done >= total:
                self.file.write("\n")
                self.file.flush()
                return
            time.sleep(self.interval)


class WidgetProgressBar(_Progress):
    """An ipywidgets bar updated from a background thread."""

    def __init__(self, futures, interval=0.1):
        super().__init__(futures, interval)
        import ipywidgets
        from IPython.display import display

        self.bar = ipywidgets.IntProgress(min=0, max=max(1, len(futures)), value=0)
        self.label = ipywidgets.HTML()
        self.box = ipywidgets.VBox([self.label, self.bar])
        display(self.box)
        threading.Thread(target=self._update, daemon=True).start()

    def _update(self):
        while True:
            done, errors, total = self.counts()
            self.bar.value = done
            self.bar.bar_style = "danger" if errors else ("success" if done >= total else "")
            self.label.value = "%d / %d completed in %.1fs%s" % (
                done, total, time.time() - self.start,
                " (%d erred)" % errors if errors else "")
            if done >= total:
                return
            time.sleep(self.interval)
