"""The dashboard: its plugin (pure), its HTTP routes (in-process cluster, no
browser) and the page in a real headless Chromium (real processes)."""

import asyncio
import html
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from urllib.parse import urlparse

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.websocket import websocket_connect

from distributed import Executor
from distributed.center import Center
from distributed.cli.utils import CENTER_STARTED, DASHBOARD_STARTED
from distributed.dashboard import DashboardPlugin
from distributed.http import HTTPCenter
from distributed.scheduler import Scheduler
from distributed.security import Security
from distributed.utils_test import (
    child_env,
    inc,
    local_cluster,
    poll,
    popen,
    slowadd,
    slowinc,
    throws,
    wait_for,
)
from distributed.worker import Worker

TOKEN = "dashboard-test-token"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- the plugin, pure ------------------------------------------------------------


@pytest.mark.pure
def test_plugin_counts_groups_and_stream():
    s = Scheduler()
    plugin = DashboardPlugin(s, stream_length=3)
    s.add_plugin(plugin)
    s.add_worker("w1:1", ncores=1)
    s.add_client("c")
    keys = ["inc-%08x" % i for i in range(5)]
    s.update_graph("c", tasks={k: "spec" for k in keys}, dependencies={}, keys=keys)
    c = plugin.counts()["inc"]
    assert c["waiting"] + c["processing"] == 5 and c["memory"] == 0
    for i, k in enumerate(keys):
        s.task_finished("w1:1", k, nbytes=1, startstops=(i, i + 0.5), thread=1)
    assert plugin.counts()["inc"] == {"waiting": 0, "processing": 0, "memory": 5,
                                      "erred": 0, "done": 5}
    assert [e[1] for e in plugin.stream] == keys[2:]  # bounded: the latest 3
    s.remove_worker("w1:1", cause="it was killed")
    kinds = [(e[2], e[3], e[4]) for e in plugin.events]
    assert kinds == [("worker-added", "w1:1", ""), ("worker-removed", "w1:1", "it was killed")]


@pytest.mark.pure
def test_plugin_records_errors_with_their_text():
    s = Scheduler()
    plugin = DashboardPlugin(s)
    s.add_plugin(plugin)
    s.add_worker("w1:1", ncores=1)
    s.add_client("c")
    s.update_graph("c", tasks={"x": "spec", "y": "spec"}, dependencies={"y": ["x"]},
                   keys=["y"])
    s.task_erred("w1:1", "x", exception=b"...", traceback=None,
                 text="Traceback ...\nZeroDivisionError: division by zero\n")
    counts = plugin.counts()
    assert counts["x"]["erred"] == 1 and counts["y"]["erred"] == 1
    erred = [e for e in plugin.events if e[2] == "task-erred"]
    assert len(erred) == 1  # the task that raised, not its dependent
    assert erred[0][3] == "x" and "ZeroDivisionError" in erred[0][4]


@pytest.mark.pure
def test_plugin_restart_and_bounds():
    s = Scheduler()
    plugin = DashboardPlugin(s, events_length=2)
    s.add_plugin(plugin)
    for i in range(3):
        s.add_worker("w%d:1" % i, ncores=1)
    assert [e[3] for e in plugin.events] == ["w1:1", "w2:1"]  # the latest 2
    s.add_client("c")
    s.update_graph("c", tasks={"x": "spec"}, dependencies={}, keys=["x"])
    s.restart()
    assert plugin.groups == {} and plugin.events[-1][2] == "restart"


# -- the HTTP routes, on an in-process cluster ---------------------------------


@asynccontextmanager
async def dashboard_cluster(n_workers=2, token=None):
    """A center with its dashboard on a free port and ``n_workers`` workers."""
    security = Security(token=token)
    c = Center("127.0.0.1", services={"http": HTTPCenter}, service_ports={"http": 0},
               security=security, validate=True)
    c.listen(0)
    workers = [Worker(c.ip, c.port, ip="127.0.0.1", ncores=1, security=security,
                      heartbeat_interval=0.2)
               for _ in range(n_workers)]
    try:
        await asyncio.gather(*[w._start(0) for w in workers])
        await wait_for(lambda: len(c.metrics) == n_workers)
        yield c, workers
    finally:
        await asyncio.gather(*[w._close(timeout=1) for w in workers],
                             return_exceptions=True)
        c.close()
    assert not c.invariant_errors


def url(c, path):
    return "http://127.0.0.1:%d%s" % (c.service_ports["http"], path)


async def fetch(c, path, **kwargs):
    kwargs.setdefault("raise_error", False)
    kwargs.setdefault("follow_redirects", False)
    return await AsyncHTTPClient().fetch(url(c, path), **kwargs)


def test_json_health_metrics_and_pages():
    async def main():
        async with dashboard_cluster() as (c, workers):
            async with Executor(c.address, start=False) as e:
                futures = e.map(inc, range(20))
                await e._gather(futures)
                assert (await fetch(c, "/health")).body == b"ok"
                counts = json.loads((await fetch(c, "/json/counts.json")).body)
                assert counts == {"memory": 20}
                status = json.loads((await fetch(c, "/json/status.json")).body)
                assert sorted(w["address"] for w in status["workers"]) == sorted(
                    w.address for w in workers)
                assert all(w["memory"] > 0 and w["threads"] == 1 for w in status["workers"])
                assert [(g["name"], g["memory"], g["done"]) for g in status["groups"]] == [
                    ("inc", 20, 20)]
                assert len(status["stream"]) == 20
                assert {t[3] for t in status["stream"]} <= {w.address for w in workers}
                assert all(t[5] <= t[6] for t in status["stream"])  # start <= stop
                metrics = (await fetch(c, "/metrics")).body.decode()
                assert "distributed_workers 2.0" in metrics
                assert 'distributed_tasks{state="memory"} 20.0' in metrics
                assert "distributed_worker_memory_bytes{" in metrics
                assert 'distributed_tasks_computed_total{group="inc"} 20.0' in metrics
                page = await fetch(c, "/")
                assert page.code == 302 and page.headers["Location"] == "/status"
                page = await fetch(c, "/status")
                assert page.code == 200 and b"/static/dashboard.js" in page.body
                assert "default-src 'self'" in page.headers["Content-Security-Policy"]
                assert (await fetch(c, "/static/dashboard.js")).code == 200
                assert (await fetch(c, "/static/../center.py")).code in (403, 404)
                worker = workers[0]
                detail = json.loads((await fetch(c, "/json/worker/" + worker.address)).body)
                assert detail["worker"]["address"] == worker.address
                assert detail["nkeys"] == len(c.has_what[worker.address])
                # the worker's log ring (in-process: every record of this process)
                assert all(set(r) == {"time", "level", "name", "message"}
                           for r in detail["logs"]) and len(detail["logs"]) <= 100
                del worker.handlers["get_logs"]  # a worker without it: no logs, no error
                detail = json.loads((await fetch(c, "/json/worker/" + worker.address)).body)
                assert detail["logs"] == []
                record = {"time": 1.0, "level": "INFO", "name": "w", "message": "hi"}
                worker.handlers["get_logs"] = lambda stream=None, n=None: [record] * n
                detail = json.loads((await fetch(c, "/json/worker/" + worker.address)).body)
                assert detail["logs"] == [record] * 100  # the tail, asked with n=
                assert (await fetch(c, "/json/worker/127.0.0.1:1")).code == 404
                assert e.dashboard_link == url(c, "/status")
                # a task whose input is on the other worker: its transfer is marked
                a, b = workers
                x = e.submit(inc, 1000, workers=[a.address])
                y = e.submit(inc, x, workers=[b.address])
                assert await y == 1002
                status = json.loads((await fetch(c, "/json/status.json")).body)
                fetched = [t for t in status["stream"] if t[1] == y.key]
                assert fetched and fetched[0][3] == b.address
                t0, t1, start = fetched[0][7], fetched[0][8], fetched[0][5]
                assert t0 is not None and t0 <= t1 <= start, status["stream"][-3:]
                # deaths a nanny reported are events too
                c.worker_died(address="127.0.0.1:9", cause="killed by signal 9 (SIGKILL)")
                status = json.loads((await fetch(c, "/json/status.json")).body)
                died = [ev for ev in status["events"] if ev[2] == "worker-died"]
                assert [(ev[3], ev[4]) for ev in died] == [
                    ("127.0.0.1:9", "killed by signal 9 (SIGKILL)")]
                info = await e._cluster_info()
                assert (info["workers"], info["threads"]) == (2, 2)
                assert info["memory"] > 0

        assert not c.scheduler.plugins  # the closed service stopped watching

    asyncio.run(asyncio.wait_for(main(), 30))


def test_routes_are_read_only():
    async def main():
        async with dashboard_cluster(n_workers=1) as (c, workers):
            for path in ["/status", "/json/counts.json", "/metrics", "/health",
                         "/info.json", "/json/worker/" + workers[0].address]:
                assert (await fetch(c, path, method="HEAD")).code == 200, path
                for method in ["POST", "PUT", "DELETE", "PATCH"]:
                    body = None if method == "DELETE" else b"x"
                    r = await fetch(c, path, method=method, body=body,
                                    allow_nonstandard_methods=True)
                    assert r.code == 405, (path, method, r.code)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_token_is_required_everywhere():
    async def main():
        async with dashboard_cluster(n_workers=1, token=TOKEN) as (c, workers):
            for path in ["/status", "/json/counts.json", "/metrics", "/health", "/info.json",
                         "/static/dashboard.js", "/json/worker/" + workers[0].address]:
                r = await fetch(c, path)
                assert r.code == 403, (path, r.code)
                assert b"token" in r.body
                r = await fetch(c, path + "?token=wrong")
                assert r.code == 403
                r = await fetch(c, path, headers={"Authorization": "Bearer " + TOKEN})
                assert r.code == 200, (path, r.code)
                r = await fetch(c, path, headers={"Authorization": "Bearer nope"})
                assert r.code == 403
            async with Executor(c.address, security=Security(token=TOKEN),
                                start=False) as e:
                assert e.dashboard_link == url(c, "/status?token=" + TOKEN)
            # the login: a cookie (not the token) and the page without the token
            r = await fetch(c, "/status?token=" + TOKEN)
            assert r.code == 302 and r.headers["Location"] == "/status"
            cookie = r.headers["Set-Cookie"]
            assert TOKEN not in cookie and "HttpOnly" in cookie
            r = await fetch(c, "/json/counts.json",
                            headers={"Cookie": cookie.split(";")[0]})
            assert r.code == 200
            # the WebSocket wants the cookie too
            ws_url = url(c, "/ws").replace("http", "ws")
            with pytest.raises(HTTPClientError) as info:
                await websocket_connect(ws_url)
            assert info.value.code == 403
            ws = await websocket_connect(_request(ws_url, cookie.split(";")[0]))
            update = json.loads(await asyncio.wait_for(ws.read_message(), 5))
            assert update["workers"][0]["address"] == workers[0].address
            ws.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def _request(ws_url, cookie):
    from tornado.httpclient import HTTPRequest

    return HTTPRequest(ws_url, headers={"Cookie": cookie}, connect_timeout=5,
                       request_timeout=5)


def test_websocket_pushes_updates():
    async def main():
        async with dashboard_cluster() as (c, workers):
            ws = await websocket_connect(url(c, "/ws").replace("http", "ws"))
            first = json.loads(await asyncio.wait_for(ws.read_message(), 5))
            assert len(first["workers"]) == 2 and first["stream"] == []
            async with Executor(c.address, start=False) as e:
                futures = e.map(inc, range(10))
                await e._gather(futures)
                seen, deadline = 0, time.time() + 10
                while seen < 10 and time.time() < deadline:
                    update = json.loads(await asyncio.wait_for(ws.read_message(), 5))
                    seen += len(update["stream"])  # only what is new each time
                assert seen == 10
            ws.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- the page in a real browser (headless Chromium through Playwright) ----------

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: without these, Chromium hangs on a closed network trying to reach Google
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium at %s (apt-get install chromium, or set $CHROMIUM)"
                    % CHROMIUM)
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20000)
    yield page
    context.close()


def listed_workers(page):
    return sorted(page.eval_on_selector_all(
        "#workers tbody tr[data-address]", "rows => rows.map(r => r.dataset.address)"))


def group_counts(page, name):
    return page.evaluate(
        """name => { const g = document.querySelector(`#groups .group[data-name="${name}"]`);
                     return g ? [+g.dataset.memory, +g.dataset.total] : null; }""", name)


def screenshot(page, tmp_path, name, copy=True):
    """Save a screenshot as a test artifact; ``$DASHBOARD_SCREENSHOT``: copy it
    there too (how docs/dashboard.png is made)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if copy and os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copy(path, os.environ["DASHBOARD_SCREENSHOT"])
    return path


@pytest.mark.processes
def test_browser_shows_workers_and_progress(page, tmp_path):
    with local_cluster(n_workers=2) as cluster, Executor(cluster.center_address) as e:
        link = e.dashboard_link
        assert "?token=" in link  # a LocalCluster always has a token
        page.goto(link)
        assert urlparse(page.url).query == ""  # the token left the address bar
        page.wait_for_selector("#connection.on")
        poll(lambda: listed_workers(page) == sorted(cluster.worker_addresses), timeout=10,
             msg="the workers table lists the live workers")
        bad = e.submit(throws, 1)
        futures = e.map(slowinc, range(300), delay=0.02)
        pairs = e.map(slowadd, futures[::2], futures[1::2])  # some fetch from the other
        seen, shot = set(), None
        deadline = time.time() + 60
        while time.time() < deadline:
            counts = group_counts(page, "slowinc")
            if counts:
                seen.add(counts[0])
                if shot is None and 150 <= counts[0] < 300:  # mid-way: bars under way
                    shot = screenshot(page, tmp_path, "dashboard.png")
                if counts == [300, 300] and group_counts(page, "slowadd") == [150, 150]:
                    break
            time.sleep(0.2)
        assert group_counts(page, "slowinc") == [300, 300]
        assert group_counts(page, "slowadd") == [150, 150]
        assert len([n for n in seen if 0 < n < 300]) >= 2, seen  # it moved on the way
        assert e.gather(pairs)[:2] == [1 + 2, 3 + 4]
        error = page.wait_for_selector('#events li[data-kind="task-erred"]')
        assert "RuntimeError: hello!" in error.text_content()  # the traceback's text
        assert bad.status == "error"
        tasks = int(page.get_attribute("#stream", "data-tasks"))
        assert tasks >= 450
        assert int(page.get_attribute("#stream", "data-rows")) == 2  # two threads
        summary = page.text_content("#summary")
        assert summary.startswith("2 workers, 2 threads")
        assert shot is not None and shot.stat().st_size > 10000
        # a worker's page
        address = cluster.worker_addresses[0]
        page.click('#workers a[href="/worker/%s"]' % address.replace(":", "%3A"))
        page.wait_for_selector("#worker tbody tr")
        assert page.text_content("#address") == address
        poll(lambda: page.text_content("#nkeys").split()[0].isdigit(), timeout=10)
        screenshot(page, tmp_path, "worker.png", copy=False)


@pytest.mark.processes
def test_browser_keeps_up_with_a_10000_task_map(page):
    with local_cluster(n_workers=2) as cluster, Executor(cluster.center_address) as e:
        page.goto(e.dashboard_link)
        poll(lambda: len(listed_workers(page)) == 2, timeout=10, msg="two workers listed")
        futures = e.map(inc, range(10000))
        poll(lambda: group_counts(page, "inc") == [10000, 10000], timeout=60,
             msg="the page shows the 10,000 tasks in memory")
        stats = page.evaluate("Dashboard.stats")
        # a message handled and the task stream drawn well within a second each
        assert stats["updates"] >= 2 and stats["slowest"] < 500, stats
        # bounded: at most 2,000 new tasks an update, 5,000 kept
        assert 2000 <= int(page.get_attribute("#stream", "data-tasks")) <= 5000
        assert page.evaluate("1 + 1") == 2  # still answering
        del futures


@pytest.mark.processes
def test_browser_shows_a_killed_worker_leave(page, tmp_path):
    with local_cluster(n_workers=2, restart_dead_workers=False) as cluster, \
            Executor(cluster.center_address) as e:
        page.goto(e.dashboard_link)
        poll(lambda: len(listed_workers(page)) == 2, timeout=10, msg="two workers listed")
        victim = cluster.workers[0]
        os.kill(victim.proc.pid, signal.SIGKILL)
        poll(lambda: listed_workers(page) == [cluster.workers[1].address], timeout=20,
             msg="the killed worker disappears")
        event = page.wait_for_selector(
            '#events li[data-kind="worker-removed"][data-subject="%s"]' % victim.address)
        assert "connection closed" in event.text_content()
        screenshot(page, tmp_path, "killed.png")


@pytest.mark.processes
def test_browser_needs_the_token(page):
    with local_cluster(n_workers=1) as cluster, Executor(cluster.center_address) as e:
        bare = e.dashboard_link.split("?")[0]
        response = page.goto(bare)
        assert response.status == 403
        assert "token" in page.text_content("body")
        assert page.query_selector("#workers") is None
        page.goto(bare + "?token=not-" + cluster.security.token)
        assert page.query_selector("#workers") is None
        page.goto(e.dashboard_link)
        poll(lambda: listed_workers(page) == cluster.worker_addresses, timeout=10,
             msg="the worker listed once logged in")
        page.goto(bare)  # the cookie keeps the browser logged in
        page.wait_for_selector("#workers tbody tr[data-address]")


# -- on by default: dcenter, LocalCluster, the executor's reprs -----------------


def dcenter(*args):
    return popen([sys.executable, "-m", "distributed.cli.dcenter", "--port", "0"]
                 + list(args), env=child_env())


def get(url, token=None):
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(request, timeout=10) as f:
        return f.status, f.read()


@pytest.mark.processes
def test_dcenter_serves_the_dashboard_by_default():
    with dcenter() as a, dcenter() as b:
        urls = []
        for p in (a, b):
            p.wait_for_line(CENTER_STARTED)
            urls.append(p.wait_for_line(DASHBOARD_STARTED).split()[-1])
        # the second center found the default port taken and took a free one
        assert urls[0] != urls[1]
        for url in urls:
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/status", url)
            assert get(url.replace("/status", "/health")) == (200, b"ok")
            status, body = get(url.replace("/status", "/"))  # redirected
            assert status == 200 and b"dashboard.js" in body


@pytest.mark.processes
def test_no_dashboard():
    with dcenter("--no-dashboard") as p:
        p.wait_for_line(CENTER_STARTED)
        assert not [line for line in p.unread_lines(1) if DASHBOARD_STARTED in line]
    with local_cluster(n_workers=1, no_dashboard=True) as cluster, \
            Executor(cluster.center_address) as e:
        assert cluster.dashboard_link is None and e.dashboard_link is None
        assert "dashboard" not in e._repr_html_()


@pytest.mark.processes
def test_executor_reprs_show_workers_and_link():
    with local_cluster(n_workers=2) as cluster, Executor(cluster.center_address) as e:
        text = repr(e)
        assert "workers=2 threads=2 memory=" in text
        page = e._repr_html_()
        assert "<th style='text-align:left'>workers</th><td style='text-align:left'>2" in page
        link = e.dashboard_link
        assert link.startswith(cluster.dashboard_address + "?token=")
        assert "href='%s'" % html.escape(link, quote=True) in page
        status, body = get(cluster.dashboard_address.replace("/status", "/json/counts.json"),
                           token=cluster.security.token)
        assert status == 200 and json.loads(body) == {}
        with pytest.raises(urllib.error.HTTPError) as info:
            get(cluster.dashboard_address.replace("/status", "/json/counts.json"))
        assert info.value.code == 403
    assert "workers=" not in repr(e)  # closed: no question asked
