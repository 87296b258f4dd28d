"""The shared machinery of the HTTP services: JSON handlers on a Tornado app."""

import json

from tornado import web
from tornado.httpserver import HTTPServer


class JSONHandler(web.RequestHandler):
    """Serves ``self.get_json()`` (sets, bytes and tuples made JSON-safe)."""

    def initialize(self, node):
        self.node = node

    def get(self):
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.get_json(), default=_json_default))

    def get_json(self):
        raise NotImplementedError


def _json_default(o):
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    return str(o)


def json_key(key):
    return key if isinstance(key, str) else str(key)


class HTTPService:
    """A Tornado HTTP server exposing ``routes`` of JSONHandlers for ``node``."""

    routes = []

    def __init__(self, node, address=None):
        self.node = node
        self.address = address
        self.port = None
        app = web.Application([(path, h, {"node": node}) for path, h in self.routes])
        self.server = HTTPServer(app)

    def listen(self, port=0):
        address = self.address or getattr(self.node, "ip", None) or "127.0.0.1"
        bind = "" if address == "0.0.0.0" else address
        self.server.listen(port, bind)
        for sock in self.server._sockets.values():
            self.port = sock.getsockname()[1]
            break

    def stop(self):
        self.server.stop()
