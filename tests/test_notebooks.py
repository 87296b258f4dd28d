"""The notebooks of docs/examples, run in a real Jupyter kernel, outputs
checked; and the local cluster of a kernel killed with SIGKILL exits.

Each notebook runs through ``nbclient`` (which shuts its kernel down, even
when a cell fails) in a fresh ``ipykernel``; the test adds cells that print
the pids of the kernel and of its cluster, and checks that all of them are
gone at the end.
"""

import os
import re
import signal
import sys
import textwrap

import psutil
import pytest

from distributed.utils_test import child_env, gone, poll

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = [pytest.mark.processes, pytest.mark.timeout(300)]

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "docs", "examples")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PIDS_CELL = "import os\nprint('PIDS', os.getpid(), flush=True)"
CLUSTER_PIDS_CELL = ("print('PIDS', e.cluster.center.pid, "
                     "*[p.pid for p in e.cluster.workers], flush=True)")


def code_cell(nb, text):
    """The one code cell of ``nb`` whose source contains ``text``."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    return cell


def printed(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def result(cell):
    """The ``text/plain`` value the cell returned."""
    (out,) = [o for o in cell.outputs if o.output_type == "execute_result"]
    return out.data["text/plain"]


def error(cell):
    """``(name, traceback text without colours)`` of the error the cell raised."""
    (out,) = [o for o in cell.outputs if o.output_type == "error"]
    return out.ename, ANSI.sub("", "\n".join(out.traceback))


def printed_pids(nb):
    return [int(pid) for cell in nb.cells if cell.cell_type == "code"
            for line in printed(cell).splitlines() if line.startswith("PIDS ")
            for pid in line.split()[1:]]


def run_notebook(name, tmp_path):
    """Execute docs/examples/``name`` in a fresh kernel; return the notebook
    with its outputs.  The kernel and the cluster it started are gone when
    this returns (checked), whether the notebook failed or not."""
    nb = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
    nbformat.validate(nb)
    new = nbformat.v4.new_code_cell
    nb.cells.insert(0, new(PIDS_CELL))
    # once the executor exists (the cell after the one that makes it)
    at = nb.cells.index(code_cell(nb, "Executor(n_workers=2")) + 1
    nb.cells.insert(at, new(CLUSTER_PIDS_CELL))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     shutdown_kernel="immediate")
    try:
        client.execute(env=child_env(), cwd=str(tmp_path))
    finally:
        pids = printed_pids(nb)
        try:
            poll(lambda: all(gone(p) for p in pids), timeout=15,
                 msg="the kernel and its cluster exit")
        finally:
            for pid in pids:
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
    assert len(pids) == 4, pids  # the kernel, the center and two workers
    return nb


def assert_cell_line_in_traceback(cell, lineno, line):
    name, text = error(cell)
    assert name == "ZeroDivisionError", text
    # the frame of the task's function is the notebook cell's, with its source
    assert re.search(r"Cell In\[\d+\], line %d, in divide" % lineno, text), text
    assert "----> %d     %s" % (lineno, line) in text, text
    assert "dynamic-code" not in text and "could not get source" not in text, text


def test_getting_started_notebook(tmp_path):
    nb = run_notebook("getting-started.ipynb", tmp_path)
    executor = result(code_cell(nb, "e = Executor("))
    assert executor.startswith("<Executor: center=127.0.0.1:") and "workers=2" in executor
    assert result(code_cell(nb, "future.result()")) == "11"
    assert result(code_cell(nb, "e.gather(futures)")) == repr(list(range(1, 11)))
    assert "499999500000" in result(code_cell(nb, "x.sum().compute()"))
    bar = code_cell(nb, "progress(squares)")
    widgets = [o for o in bar.outputs if o.output_type == "display_data"
               and "application/vnd.jupyter.widget-view+json" in o.data]
    try:
        import ipywidgets  # noqa: F401  (the kernel runs this interpreter)
        assert len(widgets) == 1, bar.outputs
    except ImportError:
        assert not widgets and "100% Completed" in printed(bar), bar.outputs
    assert result(code_cell(nb, "sum(e.gather(squares))")) == "2470"
    assert_cell_line_in_traceback(code_cell(nb, "e.submit(divide, 0)"), 2, "return 1 / x")
    shutdown = code_cell(nb, "e.shutdown()")
    assert not [o for o in shutdown.outputs if o.output_type == "error"], shutdown.outputs


def test_async_notebook_with_top_level_await(tmp_path):
    nb = run_notebook("async.ipynb", tmp_path)
    assert result(code_cell(nb, "await future")) == "2"
    assert result(code_cell(nb, "await e.gather(futures)")) == repr(list(range(1, 11)))
    assert result(code_cell(nb, "await total")) == "4950"
    assert_cell_line_in_traceback(code_cell(nb, "await e.submit(divide, 0)"), 2,
                                  "return 1 / x")
    shutdown = code_cell(nb, "await e.shutdown()")
    assert not [o for o in shutdown.outputs if o.output_type == "error"], shutdown.outputs


KERNEL_CODE = textwrap.dedent("""\
    import os, sys, time
    import psutil
    from distributed import Executor
    from distributed.process import Process
    e = Executor(n_workers=1, timeout=60)
    # more workers of the same cluster, each under a nanny, two of them
    # behind one `dworker --nprocs 2`
    more = Process([sys.executable, '-m', 'distributed.cli.dworker',
                    e.cluster.center_address, '--nprocs', '2', '--ncores', '1'],
                   env=e.cluster.security.child_env())  # the cluster's token
    deadline = time.time() + 60
    while len(e.ncores()) < 3 and time.time() < deadline:
        time.sleep(0.1)
    me = psutil.Process()
    print('WORKERS', len(e.ncores()))
    if len(e.ncores()) < 3:
        print(more.tail())
    print('PIDS', os.getpid(), *[p.pid for p in me.children(recursive=True)], flush=True)
    """)


def test_cluster_of_a_killed_kernel_exits(tmp_path):
    """SIGKILL the kernel that made ``Executor()`` (and started nanny
    workers): its center, workers, nannies all exit within seconds."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", env=child_env(), cwd=str(tmp_path))
    out, pids = [], []

    def output(msg):
        out.append(msg["content"].get("text", ""))
        pids[:] = [int(pid) for line in "".join(out).splitlines()
                   if line.startswith("PIDS ") for pid in line.split()[1:]]

    try:
        reply = kc.execute_interactive(KERNEL_CODE, timeout=120, output_hook=output)
        assert reply["content"]["status"] == "ok", (reply["content"], out)
        assert "WORKERS 3" in "".join(out), out
        kernel, cluster = pids[0], pids[1:]
        # the center, the worker of Executor(), `dworker --nprocs 2`, its two
        # nannies and their two workers
        assert len(cluster) == 7, [psutil.Process(p).cmdline() for p in cluster]
        os.kill(kernel, signal.SIGKILL)
        poll(lambda: all(gone(p) for p in cluster), timeout=10,
             msg="the cluster of a killed kernel exits")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)

