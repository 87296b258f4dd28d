"""Several hosts on one machine: network namespaces joined by a private bridge.

Each "host" is a Linux network namespace of its own, with one address on a
private subnet (10.213.0.0/24, which exists only inside these namespaces):

    c-<id>   center    10.213.0.1       x-<id>   executor   10.213.0.2
    w1-<id>  worker    10.213.0.11      w2-<id>  worker     10.213.0.12

Each namespace has a veth pair whose other end is a port of a bridge that
lives in one more namespace, ``br-<id>``; nothing is added to, or changed
in, the machine's own namespace, and no packet can leave these namespaces.
Cutting a host off the network is setting its bridge port down: its
packets go nowhere, no connection is closed, no RST ever arrives, just as
when a cable is pulled or a machine hangs.

The center, the workers and the executor are real processes started with
``ip netns exec``; the executor side is a small script (``CLIENT`` below)
that reports what it sees as JSON lines and waits at fixed points for the
test to cut or restore the link.  Everything (processes, namespaces and
with them the veths and the bridge) is removed even when a test fails.

Needs root and ``ip netns``; elsewhere the tests skip and say why.
"""

import json
import os
import shutil
import subprocess
import sys
import signal
import uuid

import pytest

from distributed.process import Process

pytestmark = pytest.mark.processes

PY = sys.executable
NET = "10.213.0"
CENTER_IP = NET + ".1"
CLIENT_IP = NET + ".2"
HOSTS = {"c": CENTER_IP, "x": CLIENT_IP, "w1": NET + ".11", "w2": NET + ".12"}
PORT = 8787  # every host is a namespace of its own: no port is taken
HEARTBEAT_TIMEOUT = 3


def _ip(*args, timeout=10):
    """Run ``ip ARGS``; raise ``RuntimeError`` with its stderr on failure."""
    r = subprocess.run(["ip"] + list(args), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError("ip %s: %s" % (" ".join(args), (r.stderr or r.stdout).strip()))
    return r.stdout


class Net:
    """The namespaces, veths and bridge of one test, and its processes."""

    def __init__(self):
        self.id = uuid.uuid4().hex[:8]
        self.namespaces = []  # created so far, deleted by destroy()
        self.processes = []

    def ns(self, host):
        return "%s-%s" % (host, self.id)

    def _add_ns(self, name):
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def build(self):
        br = self.ns("br")
        self._add_ns(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for host, address in HOSTS.items():
            ns = self.ns(host)
            self._add_ns(ns)
            # both ends are created right in their namespaces: none ever
            # appears in the machine's own namespace
            _ip("-n", br, "link", "add", "p-" + host, "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            _ip("-n", br, "link", "set", "p-" + host, "master", "br0")
            _ip("-n", br, "link", "set", "p-" + host, "up")
            _ip("-n", ns, "addr", "add", address + "/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def cut(self, host):
        """Pull ``host``'s cable: its bridge port goes down."""
        _ip("-n", self.ns("br"), "link", "set", "p-" + host, "down")

    def restore(self, host):
        _ip("-n", self.ns("br"), "link", "set", "p-" + host, "up")

    def start(self, host, args, wait_for=None, timeout=20, env=None):
        """Run ``args`` in ``host``'s namespace (``ip netns exec`` execs it:
        the Process is the command itself, in a process group of its own)."""
        p = Process(["ip", "netns", "exec", self.ns(host)] + list(args), env=env)
        self.processes.append(p)
        if wait_for is not None:
            p.wait_for_line(wait_for, timeout=timeout)
        return p

    def destroy(self):
        for p in reversed(self.processes):
            p.stop(timeout=3)
        for name in reversed(self.namespaces):
            # anything still running in a namespace of ours was started by us
            try:
                pids = _ip("netns", "pids", name).split()
            except Exception:
                pids = []
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            try:
                _ip("netns", "del", name)
            except Exception as e:  # keep deleting the others
                print("could not delete namespace %s: %s" % (name, e), file=sys.stderr)
        self.namespaces = []


def _capability():
    """Why network namespaces cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "not running as root"
    probe = "probe-%s" % uuid.uuid4().hex[:8]
    try:
        _ip("netns", "add", probe)
    except Exception as e:
        return str(e)
    try:
        _ip("netns", "del", probe)
    except Exception:
        pass
    return None


@pytest.fixture
def net():
    reason = _capability()
    if reason:
        pytest.skip("network namespaces not available: %s" % reason)
    n = Net()
    try:
        try:
            n.build()
        except RuntimeError as e:
            pytest.skip("network namespaces not available: %s" % e)
        yield n
    finally:
        n.destroy()


# -- the executor side: scripts run in x-<id> -----------------------------------------

PREAMBLE = '''
import json, os, sys, time
from distributed import Executor, wait
from distributed.utils_test import inc, slowinc

center, control, w1, w2 = sys.argv[1:5]

def say(event, **info):
    print(json.dumps(dict(info, event=event)), flush=True)

def wait_for_test(name, timeout=60):
    """The test creates control/<name> once it has done its part."""
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(control, name)):
        if time.time() > deadline:
            raise TimeoutError("the test did not do %r" % name)
        time.sleep(0.02)

def poll(predicate, timeout):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True

def block(i):
    """4 kB: more than travels with the task-finished message, so the
    value stays on the worker that computed it."""
    return bytes([i]) * 4096

def total_length(*blocks):
    return sum(map(len, blocks))

def holders(futures):
    who_has = e.who_has(futures)
    return {f.key: sorted(who_has.get(f.key, ())) for f in futures}

e = Executor(center, timeout=10)
say("connected", workers=sorted(e.ncores()))
'''

CUT_CLIENT = PREAMBLE + '''
# data on both workers: computed blocks, and scattered ones
blocks = e.map(block, range(40))
wait(blocks, timeout=20)
assert e.gather(blocks) == [block(i) for i in range(40)]
scattered = e.scatter([bytes([100 + i]) * 4096 for i in range(20)])
say("placed", blocks=holders(blocks), scattered=holders(scattered))

# work in flight on both workers when the link goes
slow = e.map(slowinc, range(100), delay=0.05)
poll(lambda: sum(f.done() for f in slow) >= 10, 20)
say("cut-me", done=sum(f.done() for f in slow))
wait_for_test("cut")
t0 = time.time()
removed = poll(lambda: w2 not in e.ncores(), 20)
say("w2-removed", removed=removed, after=time.time() - t0, workers=sorted(e.ncores()))
# the center's lost-data messages travel on another stream than the reply
# to ncores(): let them arrive before asking for values (a request already
# on its way to w2 would wait 300 s, see test_request_to_cut_peer_...)
time.sleep(0.5)

wait(slow, timeout=30)
say("slow", results=[f.result(timeout=20) for f in slow], after=time.time() - t0)

wait(blocks, timeout=30)
values = [f.result(timeout=20) for f in blocks]
say("blocks", correct=values == [block(i) for i in range(40)],
    holders=holders(blocks), after=time.time() - t0)

lost, kept = [], []
for i, f in enumerate(scattered):
    exc = f.exception(timeout=10) if f.status != "finished" else None
    if exc is not None:
        lost.append([f.key, type(exc).__name__])
    else:
        kept.append([f.key, f.result(timeout=10) == bytes([100 + i]) * 4096])
say("scattered", lost=lost, kept=kept)

total = e.submit(sum, e.map(inc, range(50), pure=False))
say("fresh", value=total.result(timeout=20), holders=holders([total]))

wait_for_test("restore")
t0 = time.time()
back = poll(lambda: w2 in e.ncores(), 30)
say("w2-back", back=back, after=time.time() - t0, workers=sorted(e.ncores()))
if back:
    f = e.submit(inc, 1, workers=[w2], pure=False)
    say("w2-works", value=f.result(timeout=10), holders=holders([f]))
e.shutdown()
say("done")
'''

WINDOW_CLIENT = PREAMBLE + '''
what, budget = sys.argv[5], float(sys.argv[6])
blocks = e.map(block, range(20))
wait(blocks, timeout=20)
on = holders(blocks)
on_w2 = [f for f in blocks if on[f.key] == [w2]]
# open the streams that a cluster in use has: the executor fetched from w2,
# and w1 fetched from w2
assert e.gather(blocks) == [block(i) for i in range(20)]
assert e.submit(total_length, on_w2[0], workers=[w1], pure=False).result(10) == 4096
say("cut-me", on_w2=len(on_w2))
wait_for_test("cut")
t0 = time.time()
# asked right after the cut, before the center has noticed
try:
    if what == "executor-gather":
        value = e.sync(e._gather, on_w2, timeout=budget)
        ok = value == [block(blocks.index(f)) for f in on_w2]
    else:
        f = e.submit(total_length, *on_w2[1:], workers=[w1], pure=False)
        ok = f.result(timeout=budget) == 4096 * (len(on_w2) - 1)
    say("result", ok=ok, after=time.time() - t0)
except TimeoutError:
    say("result", ok=False, timed_out=True, after=time.time() - t0,
        w2_removed=w2 not in e.ncores())
os._exit(0)  # not e.shutdown(): a request may still be waiting on w2
'''


def expect(proc, event, timeout=30):
    """The next JSON line of a client script reporting ``event``."""
    line = proc.wait_for_line(r'"event": "%s"' % event, timeout=timeout)
    return json.loads(line)


def go(control, name):
    open(os.path.join(control, name), "w").close()


def start_cluster(net, nanny=False):
    """A center and two workers (ncores 2, port 9000) in their namespaces.

    w1 is told its address (``--host``); w2 finds it itself: the address of
    the interface that routes to the center."""
    net.start("c", [PY, "-m", "distributed.cli.dcenter", "--host", CENTER_IP,
                    "--port", str(PORT), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)],
              wait_for="Start center at %s:%d" % (CENTER_IP, PORT))
    addresses = {}
    for host in ("w1", "w2"):
        args = [PY, "-m", "distributed.cli.dworker", "%s:%d" % (CENTER_IP, PORT),
                "--port", "9000", "--ncores", "2"]
        if host == "w1":
            args += ["--host", HOSTS[host]]
        if not nanny:
            args.append("--no-nanny")
        p = net.start(host, args)
        addresses[host] = "%s:9000" % HOSTS[host]
        assert p.wait_for_line("Start worker at") == "Start worker at: " + addresses[host]
        p.wait_for_line("Registered with center at: %s:%d" % (CENTER_IP, PORT))
    return addresses["w1"], addresses["w2"]


def start_client(net, tmp_path, script, *args):
    control = str(tmp_path)
    path = tmp_path / "client.py"
    path.write_text(script)
    client = net.start("x", [PY, str(path), "%s:%d" % (CENTER_IP, PORT), control]
                       + [str(a) for a in args])
    return client, control


@pytest.mark.parametrize("nanny", [False, True], ids=["no-nanny", "nanny"])
def test_cut_worker_link(net, tmp_path, nanny):
    """w2's cable is pulled while a map runs: the center drops it after the
    heartbeat timeout, its work and computed data are redone on w1, its
    scattered data is reported lost; once the cable is back w2 registers
    again and takes work."""
    w1, w2 = start_cluster(net, nanny=nanny)
    client, control = start_client(net, tmp_path, CUT_CLIENT, w1, w2)

    assert expect(client, "connected")["workers"] == [w1, w2]
    placed = expect(client, "placed")
    for kind in ("blocks", "scattered"):
        used = {a for holders in placed[kind].values() for a in holders}
        assert used == {w1, w2}, (kind, placed[kind])

    expect(client, "cut-me")
    net.cut("w2")
    go(control, "cut")

    removed = expect(client, "w2-removed", timeout=30)
    assert removed["removed"], removed
    assert removed["workers"] == [w1]
    assert removed["after"] < HEARTBEAT_TIMEOUT + 4, removed

    slow = expect(client, "slow", timeout=40)
    assert slow["results"] == list(range(1, 101))

    blocks = expect(client, "blocks", timeout=40)
    assert blocks["correct"]
    assert {a for hs in blocks["holders"].values() for a in hs} == {w1}

    scattered = expect(client, "scattered", timeout=30)
    on_w2 = sorted(k for k, hs in placed["scattered"].items() if hs == [w2])
    assert sorted(k for k, _ in scattered["lost"]) == on_w2
    assert {name for _, name in scattered["lost"]} == {"LostData"}
    assert scattered["kept"] and all(ok for _, ok in scattered["kept"])

    fresh = expect(client, "fresh", timeout=30)
    assert fresh["value"] == sum(range(1, 51))
    assert list(fresh["holders"].values()) == [[w1]]

    net.restore("w2")
    go(control, "restore")
    back = expect(client, "w2-back", timeout=40)
    assert back["back"], back
    assert back["workers"] == [w1, w2]
    works = expect(client, "w2-works", timeout=20)
    assert works["value"] == 2
    assert list(works["holders"].values()) == [[w2]]
    expect(client, "done", timeout=20)
    assert client.proc.wait(10) == 0


@pytest.mark.parametrize("what", ["executor-gather", "worker-fetch"])
def test_request_to_cut_peer_gives_up_when_center_drops_it(net, tmp_path, what):
    """Values on w2 asked for (by the executor, or by w1 for a task's input)
    right after w2's cable is pulled, over the streams that earlier transfers
    left open: once the center drops w2 (heartbeat timeout) the request
    should be abandoned and the values recomputed on w1, not wait 300 s."""
    budget = HEARTBEAT_TIMEOUT + 5
    w1, w2 = start_cluster(net)
    client, control = start_client(net, tmp_path, WINDOW_CLIENT, w1, w2, what, budget)
    assert expect(client, "cut-me")["on_w2"] >= 2
    net.cut("w2")
    go(control, "cut")
    result = expect(client, "result", timeout=budget + 10)
    assert result["ok"], result


def test_center_on_all_interfaces_advertises_cluster_address(net):
    """Docs (setup.md, Binding): with --host 0.0.0.0 the center advertises
    this machine's routable address.  Here the only one is 10.213.0.1 (the
    namespaces have no default route, as on an isolated cluster network)."""
    center = net.start("c", [PY, "-m", "distributed.cli.dcenter", "--host", "0.0.0.0",
                             "--port", str(PORT), "--http-port", "8790"])
    line = center.wait_for_line("Start center at")
    http = center.wait_for_line("Dashboard at")
    # reachable from another host either way: it listens on every interface
    worker = net.start("w1", [PY, "-m", "distributed.cli.dworker",
                              "%s:%d" % (CENTER_IP, PORT), "--no-nanny"])
    worker.wait_for_line("Registered with center at: %s:%d" % (CENTER_IP, PORT))
    status = subprocess.run(
        ["ip", "netns", "exec", net.ns("x"), PY, "-c",
         "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=5)",
         "http://%s:8790/info.json" % CENTER_IP], capture_output=True, text=True,
        timeout=30)
    assert (line, http, status.returncode) == (
        "Start center at %s:%d" % (CENTER_IP, PORT),
        "Dashboard at http://%s:8790/status" % CENTER_IP, 0), status.stderr[-500:]
