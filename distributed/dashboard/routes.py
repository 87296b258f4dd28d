"""The dashboard's HTTP routes, served by a center's ``HTTPCenter``.

==========================  ==================================================
``/``                       redirects to ``/status``
``/status``                 the status page (``static/status.html``)
``/worker/<address>``       the page of one worker (``static/worker.html``)
``/static/<file>``          the page's script and style, from this package
``/ws``                     the status page's WebSocket: an update a second
``/json/status.json``       what the WebSocket sends, once
``/json/counts.json``       ``{state: n}`` of every task
``/json/worker/<address>``  one worker: keys, tasks, memory, log tail
``/health``                 ``ok``
``/metrics``                Prometheus text format
==========================  ==================================================

All read-only, all behind the token (see :mod:`distributed.http.base`).
"""

import json
import logging
import os
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web, websocket
from tornado.ioloop import PeriodicCallback

from ..core import rpc
from ..http.base import AuthMixin, BaseHandler, JSONHandler, _json_default
from .state import events_since, snapshot, stream_since, task_counts, worker_detail

logger = logging.getLogger(__name__)

STATIC = os.path.join(os.path.dirname(__file__), "static")
#: seconds between two updates of the status page
UPDATE_INTERVAL = 1.0
#: log records a worker's page shows, and how long to wait for them
LOG_TAIL = 100
LOG_TIMEOUT = 2


class Redirect(BaseHandler):
    def get(self):
        self.redirect("/status")


class Page(BaseHandler):
    """One HTML file of ``static/``; the script does the rest."""

    def initialize(self, node, service=None, filename=None):
        super().initialize(node, service)
        self.filename = filename

    def get(self, *args):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        # the page may load only what this server serves
        self.set_header("Content-Security-Policy",
                        "default-src 'self'; img-src 'self' data:; "
                        "connect-src 'self' ws: wss:; frame-ancestors 'none'")
        with open(os.path.join(STATIC, self.filename), "rb") as f:
            self.write(f.read())


class Static(AuthMixin, web.StaticFileHandler):
    SUPPORTED_METHODS = ("GET", "HEAD")

    def initialize(self, node, service=None):
        self.node = node
        self.service = service
        super().initialize(path=STATIC)


class Health(BaseHandler):
    def get(self):
        self.set_header("Content-Type", "text/plain")
        self.write("ok")


class Metrics(BaseHandler):
    def get(self):
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.write(generate_latest(self.service.registry))


class Counts(JSONHandler):
    def get_json(self):
        return task_counts(self.node.scheduler)


class Status(JSONHandler):
    def get_json(self):
        update = snapshot(self.node, self.service.plugin)
        update["stream"] = stream_since(self.service.plugin, -1)
        update["events"] = events_since(self.node, self.service.plugin, -1, 0)
        return update


class WorkerJSON(BaseHandler):
    """One worker's page data; its log tail comes from its ``get_logs``
    handler, if it has one and answers in time (else no logs: not an error)."""

    async def get(self, address):
        address = unquote(address)
        detail = worker_detail(self.node, address)
        if detail is None:  # only live workers: no request goes anywhere else
            raise web.HTTPError(404, "no worker %s" % address)
        detail["logs"] = await self._logs(address)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(detail, default=_json_default))

    async def _logs(self, address):
        try:
            logs = await rpc(address, pool=self.node.pool).get_logs(n=LOG_TAIL,
                                                                    timeout=LOG_TIMEOUT)
        except Exception as e:  # no such handler (yet), gone, slow: show none
            logger.debug("no logs from %s: %s", address, e)
            return []
        return logs if isinstance(logs, list) else []


class StatusSocket(AuthMixin, websocket.WebSocketHandler):
    """Pushes an update a second to the status page: the snapshot (workers,
    groups) and what was added to the task stream and event log since the
    last one.  One update at most is in flight: a slow browser gets fewer."""

    def initialize(self, node, service=None):
        self.node = node
        self.service = service
        self.stream_seq = -1
        self.event_seq = -1
        self.event_time = 0
        self.sending = None

    def open(self):
        self.service.sockets.add(self)
        self.service.start_updates()
        self.push(snapshot(self.node, self.service.plugin))

    def on_message(self, message):
        pass  # nothing the page says changes anything

    def on_close(self):
        self.service.sockets.discard(self)

    def push(self, update):
        if self.sending is not None and not self.sending.done():
            return
        plugin = self.service.plugin
        update = dict(update)
        update["stream"] = stream_since(plugin, self.stream_seq)
        update["events"] = events_since(self.node, plugin, self.event_seq, self.event_time)
        if update["stream"]:
            self.stream_seq = update["stream"][-1][0]
        numbered = [e[0] for e in update["events"] if e[0] is not None]
        if numbered:
            self.event_seq = max(numbered)
        if update["events"]:
            self.event_time = max(self.event_time, max(e[1] for e in update["events"]))
        try:
            self.sending = self.write_message(json.dumps(update, default=_json_default))
        except websocket.WebSocketClosedError:
            self.service.sockets.discard(self)


def dashboard_routes():
    """The routes above, for an ``HTTPService``'s ``routes``."""
    return [
        (r"/", Redirect),
        (r"/status", Page, {"filename": "status.html"}),
        (r"/worker/([^/]+)", Page, {"filename": "worker.html"}),
        (r"/static/(.*)", Static),
        (r"/ws", StatusSocket),
        (r"/json/status.json", Status),
        (r"/json/counts.json", Counts),
        (r"/json/worker/([^/]+)", WorkerJSON),
        (r"/health", Health),
        (r"/metrics", Metrics),
    ]


class Updates:
    """The once-a-second timer of an ``HTTPCenter``'s status sockets: one
    snapshot per tick for all of them, and no timer when none is open."""

    def __init__(self, service, interval=UPDATE_INTERVAL):
        self.service = service
        self.timer = PeriodicCallback(self.tick, interval * 1000)

    def start(self):
        if not self.timer.is_running():
            self.timer.start()

    def stop(self):
        self.timer.stop()

    def tick(self):
        sockets = list(self.service.sockets)
        if not sockets:
            self.timer.stop()
            return
        update = snapshot(self.service.node, self.service.plugin)
        for socket in sockets:
            try:
                socket.push(update)
            except Exception:
                logger.exception("dashboard update failed")
