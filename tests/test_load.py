"""Many connections at once: 1,000 clients hold connections to the center
while an Executor computes on the cluster.

Each connection authenticates (when the cluster has a token, as a
``LocalCluster`` always does), sends ``ping`` or ``identity``, gets its
answer and stays open.  While all of them are open the executor computes
``map(inc, range(2000))``; then every held connection is asked once more
(it is still served, not merely open), the center still lists both workers,
and after all are closed the center's open files return to where they were.

The center limits connections per peer IP (``DISTRIBUTED_MAX_CONNECTIONS_PER_PEER``,
512 by default), so the connections come from several loopback addresses
(127.0.0.2, 127.0.0.3, ...), as many clients would.
"""

import asyncio
import errno
import math
import os
import resource
import socket
import sys
import threading
import time

import psutil
import pytest

from distributed import core
from distributed.protocol import Decoder, dumps, frames_to_bytes
from distributed.utils_test import authenticate, inc, popen, wait_for_line

N_CONNECTIONS = 1000
OPENING_AT_ONCE = 100  # the listen backlog is 128


def raise_fd_limit(need):
    """Raise this process's soft RLIMIT_NOFILE to ``need`` if it is lower.

    Done before the cluster starts, so that the center (a child process)
    inherits it too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip("RLIMIT_NOFILE hard limit %d < %d needed" % (hard, need))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def tcp_connections(proc):
    get = getattr(proc, "net_connections", None) or proc.connections
    return [c for c in get(kind="tcp") if c.status == psutil.CONN_ESTABLISHED]


async def read_one(reader, timeout=30):
    d = Decoder()
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            raise EOFError("the center closed the connection")
        out = d.feed(chunk)
        if out:
            assert len(out) == 1 and d.pending == 0
            return out[0]


def source_addresses(n):
    """Loopback addresses to connect from, so that no one of them has more
    connections open than half the center's per-peer limit."""
    limit = getattr(core, "MAX_CONNECTIONS_PER_PEER", 0) or n
    per_ip = max(1, limit // 2)
    return ["127.0.0.%d" % (2 + i) for i in range(math.ceil(n / per_ip))]


@pytest.mark.processes
@pytest.mark.timeout(300)
def test_thousand_connections_to_the_center():
    from distributed.executor import Executor
    from distributed.local import LocalCluster

    raise_fd_limit(3 * N_CONNECTIONS + 1000)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, timeout=60,
                           restart_dead_workers=False)
    e = None
    try:
        e = Executor(cluster.center_address, timeout=30)
        token = getattr(getattr(cluster, "security", None), "token", None)
        host, port = cluster.center_address.rsplit(":", 1)
        workers = sorted(p.address for p in cluster.workers)
        center = psutil.Process(cluster.center.pid)
        soft, _ = center.rlimit(psutil.RLIMIT_NOFILE)
        assert soft == resource.RLIM_INFINITY or soft > N_CONNECTIONS + 100, soft
        assert e.gather(e.map(inc, range(10))) == list(range(1, 11))
        fds_before = center.num_fds()
        sources = source_addresses(N_CONNECTIONS)
        held = []
        timings = {}

        async def open_one(i, gate):
            async with gate:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    host, int(port), local_addr=(sources[i % len(sources)], 0)), 30)
                if token is not None:
                    await asyncio.wait_for(authenticate(reader, writer, token), 30)
                op = "ping" if i % 2 else "identity"
                writer.write(frames_to_bytes(dumps({"op": op})))
                reply = await read_one(reader)
            if op == "ping":
                assert reply == b"pong", reply
            else:
                assert reply["type"] == "Center", reply
                assert sorted(reply.get("workers", workers)) == workers
            held.append((reader, writer))

        async def ask_all_again():
            async def ask(reader, writer):
                writer.write(frames_to_bytes(dumps({"op": "ping"})))
                assert await read_one(reader) == b"pong"

            await asyncio.gather(*[ask(r, w) for r, w in held])

        def compute(results, start=0):
            futures = e.map(inc, range(start, start + 2000))
            results.append(e.sync(e._gather, futures, timeout=120))

        async def main():
            gate = asyncio.Semaphore(OPENING_AT_ONCE)
            # work goes on while the connections open, too
            during = []
            thread = threading.Thread(target=compute, args=(during, 10_000), daemon=True)
            thread.start()
            t = time.time()
            try:
                await asyncio.gather(*[open_one(i, gate) for i in range(N_CONNECTIONS)])
                timings["open"] = time.time() - t
                assert len(held) == N_CONNECTIONS

                # all held: the center has them, and the cluster computes
                conns = tcp_connections(center)
                assert len(conns) >= N_CONNECTIONS, len(conns)
                assert center.num_fds() >= fds_before + N_CONNECTIONS
                t = time.time()
                results = []
                await asyncio.get_running_loop().run_in_executor(None, compute, results)
                timings["compute"] = time.time() - t
                assert results == [list(range(1, 2001))]
                assert sorted(e.ncores()) == workers

                t = time.time()
                await ask_all_again()
                timings["ask again"] = time.time() - t
            finally:
                thread.join(120)
                for _, writer in held:
                    writer.transport.abort()
            assert during == [list(range(10_001, 12_001))]

        asyncio.run(asyncio.wait_for(main(), 240))

        # and once they are closed, the center closes its ends
        deadline = time.time() + 30
        while center.num_fds() > fds_before + 10 and time.time() < deadline:
            time.sleep(0.2)
        fds_after = center.num_fds()
        assert fds_after <= fds_before + 10, (fds_before, fds_after)
        assert cluster.center.poll() is None
        assert not cluster.deaths
        assert sorted(e.ncores()) == workers
        assert e.gather(e.map(inc, range(100, 200))) == list(range(101, 201))
        print("\n%d connections from %d addresses: opened in %.1f s, map(inc, 2000) in "
              "%.1f s while held, all asked again in %.1f s; center fds %d -> %d"
              % (N_CONNECTIONS, len(sources), timings["open"], timings["compute"],
                 timings["ask again"], fds_before, fds_after))
    finally:
        if e is not None:
            try:
                e.shutdown()
            except Exception:
                pass
        cluster.close()


# ---------------------------------------------------------------------------
# Connections that do not authenticate cannot lock anyone out


def flood(address, n_by_source):
    """Open idle raw TCP connections to ``address``: ``{source ip: count}``,
    without waiting for each (a server that does not accept fills its backlog
    and the rest wait in the kernel).

    Returns the sockets (the caller closes them) and how many failed to start.
    """
    host, port = address.rsplit(":", 1)
    socks, failed = [], 0
    for source, n in n_by_source.items():
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.bind((source, 0))
                code = s.connect_ex((host, int(port)))
            except OSError:
                code = -1
            if code in (0, errno.EINPROGRESS):
                socks.append(s)
            else:
                s.close()
                failed += 1
    time.sleep(1)  # the kernel completes them; the server accepts what it will
    return socks, failed


def can_bind(source):
    with socket.socket() as s:
        try:
            s.bind((source, 0))
            return True
        except OSError:
            return False


def cluster_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTED_")}
    env.update(extra)
    return env


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_unauthenticated_flood_does_not_lock_out_the_cluster():
    """720 idle connections without the token, 520 of them from 127.0.0.1
    (where the cluster's own clients and workers come from): an Executor
    with the token still connects and computes within seconds, the center
    does not spin and its log stays short."""
    from distributed import Executor
    from distributed.security import Security

    raise_fd_limit(4000)
    token = "flood-test-token"
    env = cluster_env(DISTRIBUTED_AUTH_TOKEN=token)
    sources = {"127.0.0.1": 520}
    for extra in ("127.0.0.2", "127.0.0.3"):
        if can_bind(extra):
            sources[extra] = 100
    with popen([sys.executable, "-m", "distributed.cli.dcenter", "--port", "0"],
               env=env) as center:
        address = wait_for_line(center, "Start center at").split()[-1]
        with popen([sys.executable, "-m", "distributed.cli.dworker", address,
                    "--no-nanny", "--ncores", "1"], env=env) as worker:
            wait_for_line(worker, "Registered with center", timeout=30)
            socks, failed = flood(address, sources)
            try:
                assert failed < 50, failed
                t0 = time.time()
                with Executor(address, security=Security(token=token), timeout=10) as e:
                    assert e.submit(inc, 1).result(timeout=10) == 2
                    assert len(e.ncores()) == 1
                elapsed = time.time() - t0
                assert elapsed < 8, elapsed
                cpu = psutil.Process(center.pid).cpu_percent(interval=2)
                assert cpu < 20, cpu
            finally:
                for s in socks:
                    s.close()
        lines = center.unread_lines(1.0)
    # a handful of rate-limited lines, not one per connection
    assert len(lines) < 30, "".join(lines)
    assert any("have not authenticated yet" in line for line in lines), lines


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_center_out_of_file_descriptors_backs_off():
    """A center (without a token: nothing else bounds its connections) at a
    hard limit of 256 open files, sent 600 connections: it does not spin
    logging accept errors, and serves again once they are closed."""
    from distributed.core import rpc
    from distributed.security import Security

    raise_fd_limit(4000)

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with popen([sys.executable, "-m", "distributed.cli.dcenter", "--port", "0"],
               env=cluster_env(), preexec_fn=low_limit) as center:
        address = wait_for_line(center, "Start center at").split()[-1]
        socks, failed = flood(address, {"127.0.0.1": 600})
        try:
            cpu = psutil.Process(center.pid).cpu_percent(interval=3)
            assert cpu < 20, cpu
        finally:
            for s in socks:
                s.close()

        async def ping():
            with rpc(address, security=Security()) as r:
                return await r.ping(timeout=10)

        deadline = time.time() + 20
        while True:
            try:
                assert asyncio.run(ping()) == b"pong"
                break
            except (OSError, TimeoutError):
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        lines = center.unread_lines(1.0)
    assert len(lines) < 30, "".join(lines[:50])
    assert any("cannot accept connections" in line for line in lines), lines
