"""Node logs (get_logs) and what tasks print (task-output): the ring buffer,
the stdout proxy, the forwarding to the submitting executor, and the bounds
at every hop (docs/logs.md)."""

import asyncio
import io
import logging
import os
import signal
import sys
import threading
import time

import psutil
import pytest

from distributed import Center, Executor, Worker
from distributed.batched import BatchedSend
from distributed.logs import LOG_LENGTH_ENV, LogBuffer, _tap
from distributed.output import (
    OUTPUT_QUEUE_LIMIT,
    OutputProxy,
    TaskOutput,
    capture,
    format_output,
    install,
    uninstall,
)
from distributed.process import TAIL_LINES, popen
from distributed.scheduler import Scheduler
from distributed.utils_test import (
    PYTHON,
    call,
    environ,
    free_port,
    gen_cluster,
    poll,
    processes,
    start_center,
    start_worker,
)


# -- functions the workers run (imported there from this module) -------------

def shout(n, tag="line"):
    for i in range(n):
        print("%s %d" % (tag, i))
    return n


def write_both():
    sys.stdout.write("to stdout\n")
    sys.stderr.write("to stderr\n")
    return 1


def log_warning(text):
    logging.getLogger("user.task").warning("task says %s", text)
    return text


def print_then_fail():
    print("before the error")
    raise ValueError("boom")


def print_lots(n):
    line = "x" * 60
    for _ in range(n):
        print(line)
    return n


# -- the ring buffer -----------------------------------------------------------

@pytest.mark.pure
def test_log_buffer_keeps_the_last_records_oldest_first():
    logs = LogBuffer(maxlen=3)
    try:
        log = logging.getLogger("distributed.test_logs")
        for i in range(5):
            log.warning("record %d", i)
        records = logs.records()
        assert [r["message"] for r in records] == ["record 2", "record 3", "record 4"]
        assert {r["level"] for r in records} == {"WARNING"}
        assert {r["name"] for r in records} == {"distributed.test_logs"}
        assert all(abs(r["time"] - time.time()) < 60 for r in records)
        assert [r["message"] for r in logs.records(n=2)] == ["record 3", "record 4"]
        assert logs.records(n=0) == []
    finally:
        logs.close()
    log.warning("after close")
    assert len(logs) == 3 and logs.records()[-1]["message"] == "record 4"


@pytest.mark.pure
def test_log_buffer_length_from_the_environment():
    with environ(**{LOG_LENGTH_ENV: "2"}):
        logs = LogBuffer()
    try:
        assert logs.maxlen == 2
        for i in range(4):
            logging.getLogger("distributed.test_logs").error("e%d", i)
        assert [r["message"] for r in logs.records()] == ["e2", "e3"]
    finally:
        logs.close()


@pytest.mark.pure
def test_log_buffer_keeps_tracebacks():
    logs = LogBuffer(maxlen=5)
    try:
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger("distributed.test_logs").exception("it failed")
        message = logs.records()[-1]["message"]
        assert message.startswith("it failed\n") and "ZeroDivisionError" in message
    finally:
        logs.close()


@pytest.mark.pure
def test_the_tap_prints_what_python_would_print_without_it(capsys):
    """A process with no handler of its own still sees warnings on stderr
    (Python's last resort), once, although the tap is a handler."""
    logs = LogBuffer(maxlen=5)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [_tap()]
    try:
        logging.getLogger("distributed.test_logs").warning("visible")
        logging.getLogger("distributed.test_logs").info("not visible")
    finally:
        root.handlers[:] = saved
        logs.close()
    err = capsys.readouterr().err
    assert err.count("visible") == 1 and "not visible" not in err


def test_every_node_answers_get_logs():
    @gen_cluster(ncores=[1])
    async def check(center, worker):
        from distributed.core import rpc

        logging.getLogger("distributed.test_logs").warning("marker %s", worker.address)
        for address in (center.address, worker.address):
            r = rpc(address)
            try:
                records = await r.get_logs(timeout=5)
                last = await r.get_logs(n=1, timeout=5)
            finally:
                r.close_streams()
            # in one process, every node sees all records of the process
            assert any(rec["message"] == "marker %s" % worker.address for rec in records)
            assert len(last) == 1 and last[0] == records[-1]

    check()


# -- capturing a task's output -------------------------------------------------------

@pytest.mark.pure
def test_task_output_is_bounded_and_says_what_it_dropped():
    out = TaskOutput(limit=100)
    for i in range(10000):
        out.write("stdout", "line %d\n" % i)
    chunks = out.take()
    kept = "".join(t for s, t in chunks if s == "stdout")
    assert len(kept) <= 100 and kept.startswith("line 0\n")
    assert chunks[-1] == ("stderr", "[... %d lines dropped]\n" % (10000 - kept.count("\n")))
    # the next window starts empty, and says nothing about the last one's drops
    out.write("stdout", "again\n")
    assert out.take() == [("stdout", "again\n")]


@pytest.mark.pure
def test_task_output_holds_an_unfinished_line_until_its_end_or_the_task_end():
    out = TaskOutput(limit=1000)
    out.write("stdout", "a\nb")
    assert out.take() == [("stdout", "a\n")]
    out.write("stdout", "c")
    assert out.take() == []
    out.write("stdout", "d\ne")
    assert out.take() == [("stdout", "bcd\n")]
    assert out.take(final=True) == [("stdout", "e")]
    out.write("stderr", "x\n")
    out.write("stdout", "y\n")
    assert out.take() == [("stderr", "x\n"), ("stdout", "y\n")]


@pytest.mark.pure
def test_the_proxy_sends_each_task_threads_writes_to_its_own_output():
    original = io.StringIO()
    proxy = OutputProxy("stdout", original)
    outputs = [TaskOutput() for _ in range(4)]
    barrier = threading.Barrier(4)

    def task(i):
        with capture(outputs[i]):
            barrier.wait()
            for j in range(100):
                proxy.write("task %d line %d\n" % (i, j))

    threads = [threading.Thread(target=task, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    proxy.write("not a task\n")
    for t in threads:
        t.join()
    for i, out in enumerate(outputs):
        assert out.take(final=True) == [
            ("stdout", "".join("task %d line %d\n" % (i, j) for j in range(100)))]
    # the original gets everything (the worker's own console, its death report)
    assert original.getvalue().count("\n") == 401 and "not a task\n" in original.getvalue()
    assert proxy.getvalue() == original.getvalue()  # the rest is the original's


@pytest.mark.pure
def test_install_is_counted_and_puts_the_streams_back():
    before = sys.stdout, sys.stderr
    install()
    install()
    assert isinstance(sys.stdout, OutputProxy) and isinstance(sys.stderr, OutputProxy)
    uninstall()
    assert isinstance(sys.stdout, OutputProxy)
    out = TaskOutput()
    with capture(out):
        print("captured")
        logging.getLogger("nobody").handlers  # no effect; print above is what counts
    assert out.take(final=True) == [("stdout", "captured\n")]
    uninstall()
    assert (sys.stdout, sys.stderr) == before


@pytest.mark.pure
def test_format_output_prefixes_every_line():
    assert format_output("w1", "a\nb\n") == "[w1] a\n[w1] b\n"
    assert format_output("w1", "no end") == "[w1] no end\n"


@pytest.mark.pure
def test_batched_send_drops_offered_messages_behind_a_full_buffer():
    bs = BatchedSend(None, loop=object())
    bs._busy = True  # a write is under way: nothing leaves the buffer
    results = [bs.offer({"op": "task-output", "i": i}, max_waiting=10) for i in range(50)]
    assert results == [True] * 10 + [False] * 40
    assert len(bs.buffer) == 10


@pytest.mark.pure
def test_output_goes_to_the_clients_of_the_key_and_of_its_dependents():
    s = Scheduler()
    s.add_client("a")
    s.add_client("b")
    s.update_graph("a", tasks={"x": b"", "y": b""}, dependencies={"y": ["x"]}, keys=["y"])
    s.update_graph("b", tasks={"z": b""}, keys=["z"])
    assert s.clients_of("x") == {"a"}
    assert s.clients_of("y") == {"a"}
    assert s.clients_of("z") == {"b"}
    assert s.clients_of("unknown") == set()


def _stuck_comm():
    """A BatchedSend whose write never ends: a client (or center) that reads slowly."""
    comm = BatchedSend(None, loop=object())
    comm._busy = True
    return comm


def test_the_center_drops_output_for_a_client_that_does_not_read():
    async def check():
        center = Center("127.0.0.1")
        try:
            s = center.scheduler
            for client in ("slow", "quiet", "bystander"):
                s.add_client(client)
                center.client_comms[client] = _stuck_comm()
            center.quiet_clients.add("quiet")
            s.update_graph("slow", tasks={"x": b""}, keys=["x"])
            s.update_graph("quiet", tasks={"x": b""}, keys=["x"])
            for i in range(10000):
                center.task_output("127.0.0.1:1", key="x", stream="stdout", text="%d\n" % i)
            slow = center.client_comms["slow"].buffer
            assert len(slow) == OUTPUT_QUEUE_LIMIT
            assert slow[0] == {"op": "task-output", "key": "x", "worker": "127.0.0.1:1",
                               "stream": "stdout", "text": "0\n"}
            assert center.client_comms["quiet"].buffer == []
            assert center.client_comms["bystander"].buffer == []
            with pytest.raises(TypeError):
                center.task_output("127.0.0.1:1", key="x", stream="stdin", text="")
        finally:
            center.close()

    asyncio.run(check())


def test_the_worker_drops_output_rather_than_queue_it_behind_a_slow_center():
    async def check():
        worker = Worker("127.0.0.1:1", ip="127.0.0.1")
        try:
            worker.batched = _stuck_comm()
            out = worker._outputs["x"] = TaskOutput()
            for i in range(1000):
                out.write("stdout", "line %d\n" % i)
                worker._flush_output()
            assert len(worker.batched.buffer) == OUTPUT_QUEUE_LIMIT
            assert worker.batched.buffer[0]["text"] == "line 0\n"
        finally:
            worker.batched = None
            await worker._close(report=False)

    asyncio.run(check())


def test_in_process_cluster_forwards_output_to_the_submitting_executor(capsys):
    @gen_cluster(ncores=[1])
    async def check(center, worker):
        async with Executor(center.address, start=False) as e, \
                Executor(center.address, start=False) as other:
            assert await e.submit(shout, 3, "inproc") == 3
            assert await e.submit(write_both) == 1
            await asyncio.sleep(0.3)  # anything for `other` would have come by now
            assert other.status == "running"  # connected all along, printed nothing

    check()
    out, err = capsys.readouterr()
    forwarded = [line for line in out.splitlines() if line.startswith("[127.0.0.1:")]
    # once each: the other executor printed nothing
    assert [line.split("] ", 1)[1] for line in forwarded if "inproc" in line] == [
        "inproc 0", "inproc 1", "inproc 2"]
    assert "] to stdout\n" in out and "] to stderr\n" in err


# -- real processes --------------------------------------------------------------------

def _lines(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.processes
def test_print_output_reaches_the_submitting_executor_in_order(e, capsys):
    worker = sorted(e.ncores())[0]
    assert e.submit(shout, 2000, "ordered", workers=[worker], pure=False).result() == 2000
    out = capsys.readouterr().out
    ordered = [line for line in out.splitlines() if " ordered " in line]
    assert ordered == ["[%s] ordered %d" % (worker, i) for i in range(2000)]


@pytest.mark.processes
def test_output_arrives_before_the_result_and_not_at_the_other_executor(cluster, capfd):
    results = {}
    with Executor(cluster.center_address) as e1, Executor(cluster.center_address) as e2:
        def printed_when_done(name, executor, tag):
            future = executor.submit(shout, 3, tag, pure=False)
            future.result()
            results[name] = capfd.readouterr().out

        printed_when_done("mine", e1, "for-e1")
        printed_when_done("theirs", e2, "for-e2")
    # "output then result": the lines are there when result() returns; each
    # executor printed them once (both print to this process's stdout)
    assert len(_lines(results["mine"], "[")) == 3 and "for-e1 2" in results["mine"]
    assert len(_lines(results["theirs"], "[")) == 3 and "for-e2 2" in results["theirs"]


@pytest.mark.processes
def test_forward_output_false_silences_it(cluster, capfd):
    with Executor(cluster.center_address, forward_output=False) as e:
        assert e.submit(shout, 3, "silenced", pure=False).result() == 3
        time.sleep(0.5)
    assert "silenced" not in capfd.readouterr().out


@pytest.mark.processes
def test_logging_records_and_errors_of_a_task_are_forwarded(e, capfd):
    assert e.submit(log_warning, "hello-log", pure=False).result() == "hello-log"
    err = capfd.readouterr().err
    line = [line for line in err.splitlines() if "task says hello-log" in line]
    assert line and line[0].startswith("[127.0.0.1:") and "WARNING" in line[0]
    with pytest.raises(ValueError):
        e.submit(print_then_fail, pure=False).result()
    assert "before the error" in capfd.readouterr().out


@pytest.mark.processes
def test_get_worker_and_center_logs_from_real_processes():
    port = free_port()
    with processes() as start:
        start_center(start, port, "--log-length", "50")
        w = start_worker(start, port, "--no-nanny", "--name", "alice")
        with Executor("127.0.0.1:%d" % port, timeout=5) as e:
            assert e.submit(log_warning, "into-the-ring", pure=False).result()
            address = list(e.ncores())[0]
            logs = e.get_worker_logs()
            assert list(logs) == [address]
            messages = [r["message"] for r in logs[address]]
            assert any("registered with center" in m for m in messages)  # INFO kept
            assert "task says into-the-ring" in messages
            assert len(e.get_worker_logs(n=1)[address]) == 1
            center_logs = e.get_center_logs()
            assert any(r["level"] == "INFO" and r["name"] == "distributed.center"
                       and "registered worker %s" % address in r["message"]
                       for r in center_logs)
            assert e.get_center_logs(n=2) == center_logs[-2:]
            # the console showed WARNING and up only (no -v)
            assert "registered with center" not in w.output.text()

            # a worker that does not answer: an error record, in time
            w.send_signal(signal.SIGSTOP)
            try:
                t0 = time.time()
                e.timeout = 1
                logs = e.get_worker_logs(workers=[address])
                assert time.time() - t0 < 10
                assert logs[address][0]["level"] == "ERROR"
                assert "could not get the logs of %s" % address in logs[address][0]["message"]
            finally:
                w.send_signal(signal.SIGCONT)


@pytest.mark.processes
def test_the_nanny_keeps_its_own_logs():
    port = free_port()
    with processes() as start:
        start_center(start, port)
        w = start_worker(start, port)
        lines = [line for line in w.output if line.startswith("Start nanny at")]
        nanny = lines[0].split()[-1]
        with Executor("127.0.0.1:%d" % port, timeout=5) as e:
            (address, pid), = e.run(os.getpid).items()
            os.kill(pid, signal.SIGKILL)
            w.wait_for_line("Restarted worker at", timeout=30)
        messages = [r["message"] for r in call(nanny, "get_logs")]
        assert any(address in m and "died" in m for m in messages), messages


@pytest.mark.processes
def test_log_length_limits_the_ring_of_a_real_center():
    port = free_port()
    with processes() as start:
        start_center(start, port, "--log-length", "3")
        for _ in range(3):
            start_worker(start, port, "--no-nanny")
        with Executor("127.0.0.1:%d" % port, timeout=5) as e:
            poll(lambda: len(e.ncores()) == 3)
            assert len(e.get_center_logs()) == 3


def _rss(pid):
    return psutil.Process(pid).memory_info().rss


class _CountingSink:
    """Stands in for sys.stdout/sys.stderr: counts what it is given, keeps nothing."""

    def __init__(self):
        self.lines = 0
        self.dropped_notices = 0

    def write(self, text):
        self.lines += text.count("\n")
        self.dropped_notices += text.count("lines dropped]")
        return len(text)

    def flush(self):
        pass


@pytest.mark.processes
def test_a_million_printed_lines_leave_every_memory_flat(monkeypatch):
    port = free_port()
    with processes() as start:
        center = start_center(start, port)
        worker = start_worker(start, port, "--no-nanny")
        sink = _CountingSink()
        monkeypatch.setattr(sys, "stdout", sink)
        monkeypatch.setattr(sys, "stderr", sink)
        with Executor("127.0.0.1:%d" % port, timeout=5) as e:
            e.submit(print_lots, 20000, pure=False).result()  # warm up every buffer
            time.sleep(0.5)
            before = {"center": _rss(center.pid), "worker": _rss(worker.pid),
                      "client": _rss(os.getpid())}
            t0 = time.time()
            assert e.submit(print_lots, 1000000, pure=False).result(timeout=60) == 1000000
            took = time.time() - t0
            time.sleep(0.5)
            after = {"center": _rss(center.pid), "worker": _rss(worker.pid),
                     "client": _rss(os.getpid())}
        monkeypatch.undo()
    growth = {k: (after[k] - before[k]) / 2**20 for k in before}
    print("RSS growth (MiB) for 1,000,000 lines in %.1f s: %s; lines printed: %d"
          % (took, growth, sink.lines))
    # the lines alone are 61 MB; kept anywhere they would show
    assert all(g < 20 for g in growth.values()), growth
    assert 0 < sink.lines < 1000000 and sink.dropped_notices > 0


@pytest.mark.processes
def test_a_child_that_prints_a_million_lines_costs_its_watcher_a_bounded_tail():
    code = "import sys\nfor i in range(1000000): print('line', i)\nprint('done', flush=True)"
    with popen([PYTHON, "-c", code]) as p:
        p.wait_for_line("done", timeout=60)
        p.drained.wait(10)
        assert len(p.output) <= TAIL_LINES
        assert p.output.dropped > 900000
        assert p.output.text().rstrip().endswith("done")


@pytest.mark.processes
@pytest.mark.timeout(180)
def test_in_jupyter_a_task_prints_under_the_cell_that_ran_it():
    """A real kernel (skipped without ipykernel and jupyter_client): the
    executor's loop thread was started by the first cell, yet each task's
    lines appear under the cell that submitted it."""
    pytest.importorskip("ipykernel")
    manager = pytest.importorskip("jupyter_client.manager")
    from queue import Empty

    km, kc = manager.start_new_kernel(kernel_name="python3")
    streams = []  # (cell msg_id, stream name, text)

    def run(code):
        msg_id = kc.execute(code)
        while kc.get_shell_msg(timeout=90)["parent_header"].get("msg_id") != msg_id:
            pass
        while True:  # what it printed, until the kernel is idle again
            try:
                m = kc.get_iopub_msg(timeout=2)
            except Empty:
                return msg_id
            if m["msg_type"] == "stream":
                streams.append((m["parent_header"].get("msg_id"), m["content"]["name"],
                                m["content"]["text"]))

    try:
        run("import sys; sys.path.insert(0, %r)\nfrom distributed import Executor\n"
            "e = Executor(n_workers=1)" % os.path.dirname(os.path.dirname(__file__)))
        cells = [run("def f(tag):\n    print(tag)\n    return 1\n"
                     "e.submit(f, 'printed-in-cell-%d', pure=False).result()" % i)
                 for i in (2, 3)]
        run("e.shutdown()")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    for cell, i in zip(cells, (2, 3)):
        lines = [text for parent, name, text in streams
                 if parent == cell and name == "stdout" and "printed-in-cell-%d" % i in text]
        assert len(lines) == 1 and lines[0].startswith("[127.0.0.1:"), streams
