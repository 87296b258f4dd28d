"""The shared machinery of the HTTP services: read-only handlers on a Tornado
app, behind the cluster's auth token when it has one.

Every handler answers GET and HEAD only (anything else is a 405): no route
runs code, changes state or returns a pickle.  With a token (the node's
``security.token``) every route needs it, in one of three ways:

* ``?token=<token>`` on any page: sets a cookie (an HMAC of the token, not
  the token) and redirects to the same page without the token in its URL,
  as Jupyter does;
* the cookie, afterwards (the page's WebSocket too);
* ``Authorization: Bearer <token>`` (for Prometheus and scripts).

Comparisons are in constant time (``hmac.compare_digest``).
"""

import errno
import hashlib
import hmac
import json
import logging
from urllib.parse import urlencode

from tornado import web
from tornado.httpserver import HTTPServer

from ..utils import PortInUse, check_port

logger = logging.getLogger(__name__)

#: the query argument that logs in
TOKEN_ARGUMENT = "token"
_COOKIE_LABEL = b"distributed-dashboard-cookie-1"


def cookie_value(token):
    """What the login cookie holds: an HMAC of ``token`` (never the token).

    >>> len(cookie_value('s3cret')), cookie_value('s3cret') == cookie_value('other')
    (64, False)
    """
    return hmac.new(token.encode(), _COOKIE_LABEL, hashlib.sha256).hexdigest()


def token_matches(given, token):
    """``given`` (str, from a request) is ``token``, compared in constant time.

    >>> token_matches('s3cret', 's3cret'), token_matches('s3cre', 's3cret')
    (True, False)
    """
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


class AuthMixin:
    """``prepare()``: refuse a request without the service's token (see the
    module docstring).  The class using it sets ``self.service``."""

    def prepare(self):
        token = self.service.token if self.service is not None else None
        if token is None:
            return
        given = self.get_query_argument(TOKEN_ARGUMENT, None)
        if given is not None:
            if not token_matches(given, token):
                return self._refuse("wrong token")
            self.set_cookie(self.service.cookie_name, cookie_value(token), httponly=True,
                            samesite="Strict", path="/")
            rest = [(k, v) for k, vs in self.request.query_arguments.items()
                    if k != TOKEN_ARGUMENT for v in vs]
            query = urlencode([(k, v.decode("utf-8", "replace")) for k, v in rest])
            return self.redirect(self.request.path + ("?" + query if query else ""))
        header = self.request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and token_matches(header[len("Bearer "):], token):
            return
        cookie = self.get_cookie(self.service.cookie_name)
        if cookie is not None and hmac.compare_digest(cookie.encode("utf-8", "replace"),
                                                      cookie_value(token).encode()):
            return
        return self._refuse("this cluster has an auth token")

    def _refuse(self, why):
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(
            "403 Forbidden: %s. Open the link that Executor.dashboard_link gives "
            "(it ends in ?token=...), or add ?token=<the cluster's auth token> to this "
            "URL; scripts send the header 'Authorization: Bearer <token>'.\n" % why)


class BaseHandler(AuthMixin, web.RequestHandler):
    """A read-only handler of ``node`` (GET and HEAD only), behind the token."""

    SUPPORTED_METHODS = ("GET", "HEAD")

    def initialize(self, node, service=None):
        self.node = node
        self.service = service

    def head(self, *args):
        return self.get(*args)

    def set_default_headers(self):
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")


class JSONHandler(BaseHandler):
    """Serves ``self.get_json()`` (sets, bytes and tuples made JSON-safe)."""

    def get(self, *args):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(self.get_json(*args), default=_json_default))

    def get_json(self, *args):
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
    """A Tornado HTTP server exposing ``routes`` of handlers for ``node``.

    ``routes``: ``(path, handler)`` or ``(path, handler, extra kwargs)``;
    every handler gets ``node=`` and ``service=`` (this object: ``token``,
    ``cookie_name``).  ``default_port``: if that port is taken, a free one
    is used instead (with a warning), so that a second center on a machine
    still starts.
    """

    routes = []
    default_port = None

    def __init__(self, node, address=None):
        self.node = node
        self.address = address
        self.port = None
        security = getattr(node, "security", None)
        self.token = getattr(security, "token", None)
        app = web.Application([self._route(*r) for r in self.routes])
        self.server = HTTPServer(app)

    def _route(self, path, handler, extra=None):
        return (path, handler, {"node": self.node, "service": self, **(extra or {})})

    @property
    def cookie_name(self):
        # one per port: cookies are shared between the ports of a host
        return "distributed-dashboard-%s" % self.port

    def listen(self, port=0):
        address = self.address or getattr(self.node, "ip", None) or "127.0.0.1"
        bind = "" if address == "0.0.0.0" else address
        check_port(port)
        try:
            self.server.listen(port, bind)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            if not port or port != self.default_port:
                node = "the " + type(self.node).__name__ if self.node is not None else "a node"
                raise PortInUse(node, "http", address, port) from None
            logger.warning("port %d is taken; the dashboard uses a free port instead", port)
            self.server.listen(0, bind)
        for sock in self.server._sockets.values():
            self.port = sock.getsockname()[1]
            break

    def stop(self):
        self.server.stop()
