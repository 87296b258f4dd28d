"""Network building blocks: ``Server``, ``rpc``, ``connect``/``read``/``write``.

Every node of a cluster is a :class:`Server` with a dict of handlers; every
remote call is made through :class:`rpc`::

        from distributed.core import Server, rpc

    def add(stream, x=None, y=None):
        return x + y

    server = Server({'add': add})
    server.listen(0)

    @gen.coroutine
    def f():
        r = rpc(ip='127.0.0.1', port=server.port)
        result = yield r.add(x=1, y=2)     # or: await r.add(x=1, y=2)
        assert result == 3

The wire format is :mod:`distributed.protocol`'s; this module only moves its
frames between sockets and that pure code.  So too for the authentication
handshake of :mod:`distributed.security`: :func:`connect` and
:meth:`Server.handle_stream` run it when a token is configured, and with
none no handshake byte is sent.
"""

import asyncio
import errno
import functools
import inspect
import logging
import os
import socket
import ssl
import time
from collections import defaultdict

import numpy
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient
from tornado.tcpserver import TCPServer

from . import protocol
from . import security as _auth
from .logs import LogBuffer
from .protocol import (
    DEFAULT_LIMITS,
    DeserializationError,
    FrameTooLarge,
    HandshakeNotExpected,
    ProtocolError,
    _env_int,
)
from .security import AuthenticationError, Security, TLSError, default_security, tls_error
from .utils import (
    PortInUse,
    check_port,
    format_exception_text,
    log_safe,
    parse_address,
    unparse_address,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Server",
    "rpc",
    "connect",
    "handshake_client",
    "handshake_server",
    "read",
    "write",
    "pingpong",
    "coerce_to_address",
    "coerce_to_rpc",
    "ConnectionPool",
    "RemoteException",
    "error_message",
    "StreamClosedError",
    "CommClosedError",
    "AuthenticationError",
    "TLSError",
    "Security",
]

#: seconds to wait for a TCP connection to open
CONNECT_TIMEOUT = 10
#: seconds a server gives a new connection to authenticate (TLS included)
HANDSHAKE_TIMEOUT = 5
#: connections a server with a token (or TLS) holds at once before they
#: authenticated (or began TLS); past it the oldest is closed (0: no limit).  They do not count towards
#: MAX_CONNECTIONS_PER_PEER: a peer without the token cannot starve others.
MAX_PENDING_CONNECTIONS = _env_int("DISTRIBUTED_MAX_PENDING_CONNECTIONS", 128)
#: seconds a server waits for the rest of a message that has begun to arrive
#: before it closes the connection (each read must make progress in time)
STALL_TIMEOUT = float(os.environ.get("DISTRIBUTED_STALL_TIMEOUT") or 30)
#: seconds a server waits for a refused peer to hang up before closing on it
REFUSAL_LINGER = 1.0
#: (authenticated) connections a server accepts at once from one IP address
#: (0: no limit)
MAX_CONNECTIONS_PER_PEER = _env_int("DISTRIBUTED_MAX_CONNECTIONS_PER_PEER", 512)
#: a server logs at most one line per this many seconds about each kind of
#: refused or closed connection, with the count of those it did not log
#: (0: every one)
REFUSAL_LOG_INTERVAL = float(os.environ.get("DISTRIBUTED_REFUSAL_LOG_INTERVAL") or 5)
#: seconds a server stops accepting when it runs out of file descriptors
#: (doubled while it lasts, up to ACCEPT_BACKOFF_MAX)
ACCEPT_BACKOFF, ACCEPT_BACKOFF_MAX = 0.05, 1.0

#: frames at least this large are written as their own buffer (no join)
_JOIN_LIMIT = 64 * 1024


class CommClosedError(StreamClosedError):
    """The connection closed before the reply arrived.

    Unlike ``StreamClosedError`` (whose first argument is the underlying
    error, and whose message is always ``'Stream is closed'``), the first
    argument is the message.
    """

    def __init__(self, message="Stream is closed", real_error=None):
        super().__init__(real_error)
        self.args = (message,)


class RemoteException(Exception):
    """Stands for a remote exception that could not be sent as itself."""

    def __init__(self, type_name, message, text=""):
        super().__init__(type_name, message, text)
        self.type_name = type_name
        self.message = message
        self.text = text

    def __str__(self):
        return "%s: %s" % (self.type_name, self.message)


# ---------------------------------------------------------------------------
# Streams


#: TCP keepalive: probe an idle connection after this many seconds, every
#: KEEPALIVE_INTERVAL, and give up after KEEPALIVE_COUNT unanswered probes
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 2, 3
#: seconds sent data may stay unacknowledged before the connection is dropped
USER_TIMEOUT = 30


def _set_nodelay(stream):
    """TCP_NODELAY, and keepalive so that a wait on a peer whose host or link
    vanished (no FIN, no RST) ends in seconds rather than hanging.

    The peer's kernel answers the probes even while its process is busy or
    stopped, so only an unreachable peer is cut off.
    """
    try:
        stream.set_nodelay(True)
        sock = stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
                            ("TCP_USER_TIMEOUT", USER_TIMEOUT * 1000)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except Exception:  # closed already, or not a TCP socket
        pass


async def connect(ip, port=None, timeout=CONNECT_TIMEOUT, security=None):
    """Open an IOStream to ``ip:port`` (or any address form), or raise.

    ``security`` (default: :func:`~distributed.security.default_security`,
    from the environment) says whether to use TLS and which auth token to
    prove; with a token the handshake (:func:`handshake_client`) runs before
    this returns.  Raises ``OSError`` when nothing listens there,
    :class:`AuthenticationError` when the handshake fails,
    :class:`~distributed.security.TLSError` (naming the peer and the reason)
    when the TLS handshake does and ``TimeoutError`` when it all does not
    finish within ``timeout`` seconds.
    """
    if port is None:
        ip, port = parse_address(coerce_to_address(ip))
    if security is None:
        security = default_security()
    try:
        stream = await asyncio.wait_for(
            TCPClient().connect(ip, port, max_buffer_size=2**62,
                                ssl_options=security.client_context(ip)),
            timeout,
        )
    except asyncio.TimeoutError:
        raise TimeoutError(
            "could not connect to %s within %s s" % (unparse_address(ip, port), timeout)
        ) from None
    except StreamClosedError as e:
        raise tls_error(e, unparse_address(ip, port)) or OSError(
            "could not connect to %s: %s" % (unparse_address(ip, port), e.real_error or e)
        ) from None
    except ssl.SSLError as e:
        raise tls_error(e, unparse_address(ip, port)) from None
    _set_nodelay(stream)
    if security.token is not None:
        try:
            await asyncio.wait_for(
                handshake_client(stream, security.token, unparse_address(ip, port)), timeout)
        except asyncio.TimeoutError:
            stream.close()
            raise TimeoutError("%s did not complete the authentication handshake within "
                               "%s s" % (unparse_address(ip, port), timeout)) from None
        except BaseException:
            stream.close()
            raise
    return stream


# ---------------------------------------------------------------------------
# Authentication (the messages are distributed.security's; here they only move)


async def _read_handshake(stream):
    header = await stream.read_bytes(_auth.HEADER_SIZE)
    kind, length = _auth.parse_header(header)
    body = await stream.read_bytes(length) if length else b""
    return kind, body


def _reason(e):
    """The text of an AuthenticationError without its 'authentication failed: '."""
    return str(e).split(": ", 1)[-1]


async def handshake_client(stream, token, peer="the server"):
    """Prove to the server at the other end of ``stream`` that we know ``token``,
    and check that it does too, before anything else is sent.

    Raises :class:`AuthenticationError` naming ``peer`` when the server
    refuses us, does not know the token, or has none, and
    :class:`CommClosedError` when it hangs up without saying why.
    """
    nonce = _auth.new_nonce()
    try:
        await stream.write(_auth.hello_message(nonce))
        kind, body = await _read_handshake(stream)
        try:
            server_nonce = _auth.check_challenge(token, nonce, kind, body)
        except AuthenticationError as e:
            if kind != _auth.REFUSE:  # say why, so that the server can log it
                try:
                    await stream.write(_auth.refusal_message(
                        "the client rejects the challenge: %s" % _reason(e)))
                except StreamClosedError:
                    pass
            raise
        await stream.write(_auth.proof_message(token, nonce, server_nonce))
        _auth.check_accepted(*await _read_handshake(stream))
    except (StreamClosedError, ssl.SSLError) as e:  # not a refusal: may be retried
        raise tls_error(e, peer) or CommClosedError(
            "%s closed the connection during the authentication handshake" % peer) from e
    except AuthenticationError as e:
        raise AuthenticationError(
            "authentication failed with %s: %s" % (peer, _reason(e))) from None


async def handshake_server(stream, token, name="this node", verified=None):
    """Check that the client at the other end of ``stream`` knows ``token`` and
    prove that we do; reads at most two short handshake messages.

    ``verified`` (no arguments) is called once the client's proof checks out,
    before the reply that accepts it is sent: from then on the client may
    use the connection, so the server must treat it as authenticated.

    A refused client gets the reason (a framed error reply when it sent no
    handshake at all: it has no token and waits for a reply to its
    request), and this raises :class:`AuthenticationError`.
    """
    header = await stream.read_bytes(_auth.HEADER_SIZE)
    if not _auth.is_handshake(header):
        await write(stream, error_message(AuthenticationError(
            "%s requires an auth token and this client has none (set "
            "DISTRIBUTED_AUTH_TOKEN, --auth-token or security=Security(token=...))" % name)))
        raise AuthenticationError("the client sent a request without authenticating "
                                  "(it has no auth token)")
    kind = None
    try:
        kind, length = _auth.parse_header(header)
        nonce = _auth.check_hello(kind, await stream.read_bytes(length) if length else b"")
        server_nonce = _auth.new_nonce()
        await stream.write(_auth.challenge_message(token, nonce, server_nonce))
        kind, body = await _read_handshake(stream)
        _auth.check_proof(token, nonce, server_nonce, kind, body)
        if verified is not None:
            verified()
    except AuthenticationError as e:
        if kind != _auth.REFUSE:  # the client gave up on us: it is not listening
            try:
                await stream.write(_auth.refusal_message(_reason(e)))
            except StreamClosedError:
                pass
        raise
    await stream.write(_auth.ACCEPTED)


async def _drain(stream, limit=2**20):
    """Discard what a refused peer still sends (unread bytes would turn our close
    into a reset that can destroy the reply), until it closes or for
    ``REFUSAL_LINGER`` seconds."""
    async def drain():
        seen = 0
        while seen < limit:
            seen += len(await stream.read_bytes(65536, partial=True))

    try:
        await asyncio.wait_for(drain(), REFUSAL_LINGER)
    except (StreamClosedError, asyncio.TimeoutError):
        pass


def _receive_buffer(nbytes):
    """A writeable buffer for a frame that commits memory as data arrives.

    ``bytearray(n)`` zero-fills all ``n`` bytes at once, so a peer that merely
    announced a big frame would cost that much memory; ``numpy.empty`` does not.
    """
    try:
        return numpy.empty(nbytes, dtype="u1")
    except MemoryError:
        raise FrameTooLarge("cannot allocate %d bytes for a frame" % nbytes) from None


#: how much a read asks of the stream at once (whatever has arrived, up to this)
_READ_CHUNK = 65536


class MessageStalled(ProtocolError):
    """A message began to arrive and then made no progress for too long."""


async def _progress(read, stall):
    """``await read``, or raise :class:`MessageStalled` after ``stall`` seconds."""
    if stall is None:
        return await read
    try:
        return await asyncio.wait_for(read, stall)
    except asyncio.TimeoutError:
        raise MessageStalled("the rest of a message did not arrive within %s s "
                             "(DISTRIBUTED_STALL_TIMEOUT)" % stall) from None


async def _fill(stream, buf, n, stall=None):
    """Append what the stream has to ``buf`` until it holds ``n`` bytes."""
    while len(buf) < n:
        buf += await _progress(stream.read_bytes(_READ_CHUNK, partial=True), stall)


async def _read_into(stream, view, stall=None):
    """Fill ``view`` from the stream; with ``stall``, each read must make progress."""
    if stall is None:
        await stream.read_into(view)
        return
    got = 0
    while got < len(view):
        got += await _progress(stream.read_into(view[got:], partial=True), stall)


async def read(stream, limits=DEFAULT_LIMITS, stall=None):
    """Read one message from ``stream``.

    Small frames come in with whatever else has arrived (one read for a
    whole small message; bytes of the next message wait on the stream for
    the next call).  Large frames are read straight into their own buffers
    (``read_into``), which the loaded objects then use without a copy.
    Raises :class:`~distributed.protocol.ProtocolError` on invalid input and
    ``StreamClosedError`` when the stream closes first.  The wait for a
    message to begin is unbounded; once it has, with ``stall`` (seconds), a
    read that brings nothing new within that time raises
    :class:`MessageStalled`.
    """
    buf = stream.__dict__.pop("_distributed_pending", None) or bytearray()
    if not buf:  # the message begins: no time limit
        buf += await stream.read_bytes(_READ_CHUNK, partial=True)
    await _fill(stream, buf, 8, stall)
    n = protocol.parse_count(buf, limits)
    pos = 8 * (n + 1)
    await _fill(stream, buf, pos, stall)
    lengths = protocol.parse_lengths(bytes(buf[8:pos]), n, limits)
    frames = []
    for length in lengths:
        if length < _JOIN_LIMIT:
            await _fill(stream, buf, pos + length, stall)
            frames.append(bytes(buf[pos : pos + length]))
            pos += length
            continue
        frame = _receive_buffer(length)
        have = min(len(buf) - pos, length)
        if have:
            frame[:have] = numpy.frombuffer(buf, "u1", have, pos)
        if have < length:
            await _read_into(stream, memoryview(frame)[have:], stall)
        buf = buf[pos + have :]
        pos = 0
        frames.append(frame)
    if pos < len(buf):
        stream._distributed_pending = buf[pos:]
    return protocol.loads(frames)


async def write(stream, msg):
    """Write one message to ``stream``; big buffers go out without a copy."""
    frames = protocol.dumps(msg)
    prelude = protocol.frame_prelude(frames)
    small = [prelude]
    future = None
    for frame in frames:
        size = frame.nbytes if type(frame) is memoryview else len(frame)
        if size < _JOIN_LIMIT:
            small.append(frame)
        else:
            if small:
                stream.write(b"".join(small))
                small = []
            future = stream.write(frame)
    if small:
        future = stream.write(b"".join(small) if len(small) > 1 else small[0])
    await future


# ---------------------------------------------------------------------------
# Errors as replies


def error_message(e, tb=None):
    """The reply a server sends when a handler raised ``e``.

    The exception travels as itself when it pickles and unpickles, otherwise
    as a :class:`RemoteException` naming its type and message.  Nothing here
    trusts ``e``: its ``__str__``, ``__repr__`` or pickling may raise.
    """
    tb = tb if tb is not None else getattr(e, "__traceback__", None)
    text = safe_exception_text(e, tb)
    try:
        protocol.deserialize(*protocol.serialize(e))  # it must also unpickle there
        exc = e
    except Exception:
        exc = RemoteException(_type_name(e), safe_str(e), text)
    try:
        protocol.serialize(tb)
    except Exception:
        tb = None
    return {
        "status": "uncaught-error",
        "exception": exc,
        "traceback": tb,
        "text": text,
    }


def _type_name(e):
    try:
        return type(e).__name__
    except Exception:
        return "Exception"


def safe_str(e):
    """``str(e)``, else ``repr(e)``, else ``'<Type: str() failed>'``: never raises."""
    for f in (str, repr):
        try:
            s = f(e)
            if type(s) is str:
                return s
        except Exception:
            pass
    return "<%s: str() failed>" % _type_name(e)


def safe_exception_text(e, tb=None):
    """The formatted traceback of ``e``; never raises (a hostile exception
    gives at least its type name and what :func:`safe_str` finds)."""
    try:
        return format_exception_text(e, tb)
    except Exception:
        return "%s: %s\n" % (_type_name(e), safe_str(e))


def is_error_message(msg):
    return type(msg) is dict and msg.get("status") == "uncaught-error" and "exception" in msg


def raise_error_message(msg):
    exc = msg["exception"]
    tb = msg.get("traceback")
    if not isinstance(exc, BaseException):
        exc = RemoteException("Error", repr(exc), msg.get("text", ""))
    raise exc.with_traceback(tb)


# ---------------------------------------------------------------------------
# Server


# replies that are certainly not awaitable (skips inspect.isawaitable)
_PLAIN_REPLIES = {bytes, str, int, float, bool, type(None), dict, list, tuple}


def pingpong(stream):
    """The ``ping`` handler."""
    return b"pong"


class Server(TCPServer):
    """A TCP server that dispatches each request to a handler by its ``op``.

    ::

        s = Server({'add': lambda stream, x, y: x + y})
        s.listen(0)          # any free port
        s.address            # '127.0.0.1:45123'

    A handler is ``f(stream, **msg)``; it returns the reply or an awaitable
    of it.  An unknown op or a handler that raises gets an error reply, which
    :class:`rpc` re-raises on the caller with the remote traceback.  A
    request may carry ``close=True`` (reply, then close the stream) and
    ``reply=False`` (no reply).  A malformed message closes that one stream.

    ``security`` (a :class:`~distributed.security.Security`; default from
    the environment) turns on TLS and the authentication handshake: with a
    token, a client that does not prove it knows the token is refused before
    anything it sent is read as a message.

    Limits, so that no peer can lock others out (see ``docs/security.md``):

    - with a token, a connection has ``HANDSHAKE_TIMEOUT`` seconds to
      authenticate, and at most ``max_pending_connections`` (default 128,
      ``DISTRIBUTED_MAX_PENDING_CONNECTIONS``) wait to; a new one closes the
      oldest waiting one.  Authenticated connections never count there;
    - at most ``max_connections_per_peer`` authenticated connections (all
      connections, without a token) from one IP address are open at once
      (default 512, ``DISTRIBUTED_MAX_CONNECTIONS_PER_PEER``; 0: no limit);
      further ones are closed;
    - a message that has begun to arrive must make progress every
      ``stall_timeout`` seconds (default 30, ``DISTRIBUTED_STALL_TIMEOUT``);
    - out of file descriptors, the server stops accepting for a moment
      (and closes its oldest unauthenticated connection) instead of spinning.

    Each kind of refusal is logged at most once per ``REFUSAL_LOG_INTERVAL``
    seconds, with the count of those left out.
    """

    default_ip = "127.0.0.1"

    def __init__(self, handlers, ip=None, limits=None, security=None,
                 max_connections_per_peer=None, max_pending_connections=None,
                 stall_timeout=None, log_length=None, **kwargs):
        self.handlers = {"identity": self.identity, "ping": pingpong,
                         "get_logs": self.get_logs}
        self.handlers.update(handlers)
        self.ip = ip
        self.port = None
        self.limits = limits or DEFAULT_LIMITS
        self.security = security if security is not None else default_security()
        self.max_connections_per_peer = (
            MAX_CONNECTIONS_PER_PEER if max_connections_per_peer is None
            else max_connections_per_peer)
        self._peer_connections = {}  # peer ip -> open (authenticated) connections
        self.max_pending_connections = (
            MAX_PENDING_CONNECTIONS if max_pending_connections is None
            else max_pending_connections)
        self._pending = {}  # stream -> peer address, oldest first: not authenticated yet
        self.stall_timeout = (STALL_TIMEOUT if stall_timeout is None
                              else stall_timeout) or None  # 0: no limit
        self._log_refusal = RateLimitedLog(logger, REFUSAL_LOG_INTERVAL)
        #: the last ``log_length`` log records of this process (see distributed.logs)
        self.logs = LogBuffer(log_length)
        self.streams = set()
        #: called (no arguments) once the node has closed, e.g. to end its process
        self.on_close = None
        self.id = type(self).__name__ + "-" + format(id(self), "x")
        kwargs.setdefault("max_buffer_size", 2**62)
        kwargs.setdefault("ssl_options", self.security.server_context())
        super().__init__(**kwargs)

    @property
    def address(self):
        if self.port is None:
            raise ValueError("%s is not listening yet" % type(self).__name__)
        return unparse_address(self.ip or self.default_ip, self.port)

    def identity(self, stream=None):
        return {"type": type(self).__name__, "id": self.id}

    def get_logs(self, stream=None, n=None):
        """The recent log records of this node's process, oldest first (the last
        ``n``): ``[{'time', 'level', 'name', 'message'}]``."""
        return self.logs.records(n)

    def listen(self, port=0, address=None):
        """Listen on ``port`` (0: a free one) of ``address`` (default ``ip``)."""
        if address is None:
            address = self.ip or self.default_ip
        bind = "" if address in ("0.0.0.0", "") else address
        check_port(port)  # the system would wrap 99999 around to 34463
        try:
            super().listen(port, bind)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise PortInUse("the " + type(self).__name__, "tcp", address, port) from None
        for sock in self._sockets.values():
            self.port = sock.getsockname()[1]
            break
        if self.ip is None or self.ip in ("0.0.0.0", ""):
            from .utils import get_ip

            self.ip = get_ip() if address in ("0.0.0.0", "") else address

    def add_sockets(self, sockets):
        """Accept on ``sockets`` (as TCPServer does, but see :meth:`_accept_handler`)."""
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_handler(sock)

    def _accept_handler(self, sock):
        """Register accepting on ``sock``; return the function that stops it.

        Unlike tornado's, an accept that fails for want of file descriptors
        (or memory) does not leave the handler in place to fail again at
        once, spinning: accepting pauses, with a growing delay, and the
        oldest unauthenticated connection is closed to make room.
        """
        loop = IOLoop.current()
        state = {"removed": False, "paused": None, "delay": ACCEPT_BACKOFF}

        def accept(fd, events):
            for _ in range(128):  # then let other work run (as tornado does)
                if state["removed"] or state["paused"] is not None:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as e:
                    pause(e)
                    return
                state["delay"] = ACCEPT_BACKOFF
                self._handle_connection(connection, address)

        def pause(e):
            loop.remove_handler(sock)
            delay = state["delay"]
            state["delay"] = min(2 * delay, ACCEPT_BACKOFF_MAX)
            state["paused"] = loop.call_later(delay, resume)
            freed = self._close_oldest_pending() if e.errno in (
                errno.EMFILE, errno.ENFILE) else None
            self._log_refusal(
                logging.ERROR, "accept",
                "%s at %s cannot accept connections: %s; pausing %.2f s%s (raise "
                "the open files limit, ulimit -n)", type(self).__name__, self.address,
                e, delay, ", closed an unauthenticated connection from %s"
                % _format_peer(freed) if freed else "")

        def resume():
            state["paused"] = None
            if not state["removed"]:
                loop.add_handler(sock, accept, IOLoop.READ)

        def remove():
            if state["paused"] is not None:
                loop.remove_timeout(state["paused"])
            elif not state["removed"]:
                loop.remove_handler(sock)
            state["removed"] = True

        loop.add_handler(sock, accept, IOLoop.READ)
        return remove

    def _close_oldest_pending(self):
        """Close the connection that has waited longest to authenticate; its address."""
        if not self._pending:
            return None
        stream = next(iter(self._pending))
        address = self._pending.pop(stream)
        stream.close()
        return address

    async def handle_stream(self, stream, address):
        peer = address[0] if address else None
        counted = False
        try:
            _set_nodelay(stream)
            self.streams.add(stream)
            if self.security.token is not None:
                if not await self._authenticate_pending(stream, address):
                    return
            count = self._peer_connections[peer] = self._peer_connections.get(peer, 0) + 1
            counted = True
            if count > self.max_connections_per_peer > 0:
                self._log_refusal(
                    logging.WARNING, "per-peer",
                    "closing connection from %s: %d connections from %s are open, the "
                    "limit is %d (DISTRIBUTED_MAX_CONNECTIONS_PER_PEER)",
                    _format_peer(address), count - 1, peer, self.max_connections_per_peer)
                return
            await self._serve(stream, address)
        finally:
            if counted:
                count = self._peer_connections.pop(peer) - 1
                if count:
                    self._peer_connections[peer] = count
            self.streams.discard(stream)
            stream.close()
            self.stream_closed(stream)

    def _admit_pending(self, conn, address):
        """Count ``conn`` (anything with ``close()``) among the connections that
        have not authenticated yet, closing the oldest if there are too many."""
        if len(self._pending) >= self.max_pending_connections > 0:
            oldest = self._close_oldest_pending()
            self._log_refusal(
                logging.WARNING, "pending",
                "closed connection from %s: %d connections have not authenticated "
                "yet, the limit is %d (DISTRIBUTED_MAX_PENDING_CONNECTIONS)",
                _format_peer(oldest), self.max_pending_connections,
                self.max_pending_connections)
        self._pending[conn] = address

    async def _authenticate_pending(self, stream, address):
        """:meth:`_authenticate`, counted among the connections that wait to
        until the client's proof checks out (not until our reply has gone: a
        burst of new connections in between would close an accepted client)."""
        self._admit_pending(stream, address)
        try:
            return await self._authenticate(
                stream, address, verified=lambda: self._pending.pop(stream, None))
        finally:
            self._pending.pop(stream, None)

    def _handle_connection(self, connection, address):
        if self.ssl_options is None:
            return super()._handle_connection(connection, address)
        asyncio.ensure_future(self._start_tls(connection, address))

    async def _start_tls(self, connection, address):
        """Start TLS once the peer's first bytes show that it speaks TLS.

        A peer that sent a plain message (no TLS) gets a plain reply saying
        that this node requires TLS, instead of a closed connection.
        """
        waiting = _FirstBytes(connection)
        self._admit_pending(waiting, address)
        try:
            first = await asyncio.wait_for(waiting.ready, HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            first = None
        finally:
            self._pending.pop(waiting, None)
            waiting.stop()
        if first is None:  # closed by then, evicted or silent
            connection.close()
        elif first[:1] == b"\x16":  # a TLS handshake record: the ClientHello
            super()._handle_connection(connection, address)
        else:
            await self._refuse_plain(connection, address, first)

    async def _refuse_plain(self, connection, address, first):
        reason = ("%s at %s requires TLS and this client connected without it (set "
                  "--tls-ca, or --tls-cert and --tls-key, or DISTRIBUTED_TLS_*)"
                  % (type(self).__name__, self.address))
        self._log_refusal(logging.WARNING, "plain", "closing connection from %s: it "
                          "did not open TLS", _format_peer(address))
        stream = IOStream(connection)
        try:
            if _auth.is_handshake(first):  # a client with a token, waiting for a challenge
                await stream.write(_auth.refusal_message(reason))
            else:  # a request, waiting for its reply
                await write(stream, error_message(TLSError(reason)))
            await _drain(stream)
        except StreamClosedError:
            pass
        finally:
            stream.close()

    async def _authenticate(self, stream, address, verified=None):
        """The server side of the handshake; False (logged, peer told) on failure."""
        try:
            await asyncio.wait_for(
                handshake_server(stream, self.security.token,
                                 "%s at %s" % (type(self).__name__, self.address),
                                 verified=verified),
                HANDSHAKE_TIMEOUT)
            return True
        except AuthenticationError as e:
            self._log_refusal(logging.WARNING, "refused", "refused connection from %s: %s",
                              _format_peer(address), log_safe(e))
        except asyncio.TimeoutError:
            self._log_refusal(
                logging.WARNING, "timeout", "closing connection from %s: it did not "
                "authenticate within %s s", _format_peer(address), HANDSHAKE_TIMEOUT)
            return False
        except (StreamClosedError, OSError) as e:
            self._log_refusal(logging.INFO, "closed", "connection from %s closed during "
                              "authentication: %s", _format_peer(address), log_safe(e))
            return False
        await _drain(stream)
        return False

    async def _serve(self, stream, address):
        while not stream.closed():
            try:
                msg = await read(stream, self.limits, self.stall_timeout)
            except StreamClosedError:
                return
            except DeserializationError as e:
                # well framed: answer with the error and keep the connection
                self._log_refusal(logging.WARNING, "bad request", "bad request from %s: %s",
                                  _format_peer(address), log_safe(e))
                if e.header.get("reply", True) is not False:
                    await write(stream, error_message(e))
                continue
            except HandshakeNotExpected as e:
                self._log_refusal(logging.WARNING, "refused", "refused connection from "
                                  "%s: %s", _format_peer(address), log_safe(e))
                try:
                    await stream.write(_auth.refusal_message(
                        "%s has no auth token" % type(self).__name__))
                    await _drain(stream)
                except StreamClosedError:
                    pass
                return
            except ProtocolError as e:
                self._log_refusal(logging.ERROR, type(e).__name__, "closing connection "
                                  "from %s: %s", _format_peer(address), log_safe(e))
                return
            if type(msg) is not dict or "op" not in msg:
                result = error_message(
                    ValueError("a request must be a dict with an 'op' key, got %r" % type(msg))
                )
                close, reply = False, True
            else:
                op = msg.pop("op")
                close = msg.pop("close", False)
                reply = msg.pop("reply", True)
                result = self._dispatch(stream, op, msg)
                if type(result) not in _PLAIN_REPLIES and inspect.isawaitable(result):
                    try:
                        result = await result
                    except Exception as e:
                        logger.debug("handler %s raised", log_safe(repr(op)), exc_info=True)
                        result = error_message(e)
            if reply:
                try:
                    await write(stream, result)
                except StreamClosedError:
                    return
                except Exception as e:  # the reply itself would not serialize
                    logger.error("could not send the reply to %s: %s", log_safe(repr(op)),
                                 log_safe(e))
                    await write(stream, error_message(e))
            if close:
                return

    def _dispatch(self, stream, op, msg):
        """The handler's reply (maybe an awaitable of it), or an error reply."""
        try:
            handler = self.handlers.get(op)
        except TypeError:  # an unhashable op is unknown too
            handler = None
        if handler is None:
            return error_message(
                KeyError("unknown operation %r; this %s knows %s"
                         % (op, type(self).__name__, sorted(map(str, self.handlers))))
            )
        try:
            return handler(stream, **msg)
        except Exception as e:
            logger.debug("handler %s raised", log_safe(repr(op)), exc_info=True)
            return error_message(e)

    def stream_closed(self, stream):
        """Called when a client's stream closes; subclasses override."""

    def stop(self):
        super().stop()
        self.logs.close()
        for conn in list(self._pending) + list(self.streams):
            conn.close()
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            callback()


# ---------------------------------------------------------------------------
# Client side


def coerce_to_address(o):
    """Any accepted address form -> ``'ip:port'``.

    ``'ip:port'``, ``(ip, port)``, ``[ip, port]``, an :class:`rpc` or anything
    with ``.ip`` and ``.port`` (a Server, a Worker).
    """
    if isinstance(o, str):
        ip, port = parse_address(o)
        return unparse_address(ip, port)
    if isinstance(o, (tuple, list)) and len(o) == 2:
        ip, port = o
        if isinstance(ip, bytes):
            ip = ip.decode()
        return unparse_address(ip, int(port))
    if hasattr(o, "ip") and hasattr(o, "port") and o.port is not None:
        return unparse_address(o.ip, o.port)
    raise TypeError(
        "expected an address 'ip:port', (ip, port) or rpc(ip=, port=); got %r" % (o,)
    )


def coerce_to_name(o):
    """A worker's name in the center's tables: any accepted address form ->
    ``'ip:port'`` (as :func:`coerce_to_address`); any other string is an
    opaque name, kept as it is (the center is first a metadata store).

    >>> coerce_to_name(('127.0.0.1', 8788)), coerce_to_name('tcp://127.0.0.1:8788')
    ('127.0.0.1:8788', '127.0.0.1:8788')
    >>> coerce_to_name('alice')
    'alice'
    """
    if isinstance(o, str):
        try:
            return coerce_to_address(o)
        except ValueError:
            return o
    return coerce_to_address(o)


def coerce_to_rpc(o, **kwargs):
    """Any accepted address form (or an rpc) -> an :class:`rpc`."""
    if isinstance(o, rpc):
        return o
    return rpc(coerce_to_address(o), **kwargs)


class ConnectionPool:
    """Open streams to peers, kept for reuse.

    ::

        pool = ConnectionPool()
        stream = await pool.connect('127.0.0.1:8787')
        ...                                # one request/reply at a time
        pool.reuse('127.0.0.1:8787', stream)
        pool.close()

    At most ``limit`` streams are open at once over all peers; past that,
    idle streams are closed to make room.
    """

    def __init__(self, limit=512, timeout=CONNECT_TIMEOUT, security=None):
        self.limit = limit
        self.timeout = timeout
        #: the :class:`~distributed.security.Security` of every connection it opens
        self.security = security if security is not None else default_security()
        self.available = defaultdict(list)
        self.occupied = defaultdict(set)

    @property
    def open(self):
        return sum(map(len, self.available.values())) + sum(map(len, self.occupied.values()))

    def take(self, addr):
        """An idle open stream to ``addr``, now, or ``None``."""
        idle = self.available.get(addr)
        while idle:
            stream = idle.pop()
            if not stream.closed():
                self.occupied[addr].add(stream)
                return stream
        return None

    async def connect(self, addr):
        stream = self.take(addr)
        if stream is not None:
            return stream
        if self.open >= self.limit:
            self._collect()
        stream = await connect(addr, timeout=self.timeout, security=self.security)
        self.occupied[addr].add(stream)
        return stream

    def reuse(self, addr, stream):
        self.occupied[addr].discard(stream)
        if not stream.closed():
            self.available[addr].append(stream)

    def remove(self, addr, stream):
        self.occupied[addr].discard(stream)
        stream.close()

    def _collect(self):
        for streams in self.available.values():
            while streams:
                streams.pop().close()

    def close(self, addr=None):
        addrs = [addr] if addr is not None else list(set(self.available) | set(self.occupied))
        for a in addrs:
            for stream in self.available.pop(a, []):
                stream.close()
            for stream in self.occupied.pop(a, set()):
                stream.close()


_NO_TIMEOUT = object()


class rpc:
    """A remote node: attribute access gives a remote call.

    ::

        alice = rpc(ip='127.0.0.1', port=8788)     # or rpc('127.0.0.1:8788')
        data = yield alice.get_data(keys=['x'])    # or: await ...
        data = yield alice.get_data(keys=['x'], timeout=5)

    Concurrent calls each get their own stream; streams are reused between
    calls, listed (the open ones) in ``streams`` and closed with
    :meth:`close_streams`.  ``timeout`` (seconds, per
    call or for the whole rpc) bounds the wait for a reply and raises
    ``TimeoutError``.  ``rpc(stream)`` wraps an already-open IOStream.
    Connections use ``security`` (TLS, auth token), or the ``pool``'s.
    """

    def __init__(self, addr=None, ip=None, port=None, timeout=None, pool=None,
                 limits=None, security=None):
        self._stream = None
        self._streams = []  # the streams it used; closed ones are dropped
        if isinstance(addr, IOStream):
            self._stream = addr
            self._streams.append(addr)
            self._lock = asyncio.Lock()
            peer = _peer_of(addr)
            self.ip, self.port = peer if peer else (None, None)
        else:
            if addr is None:
                if ip is None or port is None:
                    raise TypeError("rpc needs an address: rpc('ip:port') or rpc(ip=, port=)")
                addr = (ip, port)
            self.ip, self.port = parse_address(coerce_to_address(addr))
        self.address = (
            unparse_address(self.ip, self.port) if self.port is not None else None
        )
        self.timeout = timeout
        self.limits = limits or DEFAULT_LIMITS
        self.pool = pool if pool is not None else ConnectionPool(security=security)

    def __getattr__(self, op):
        if op.startswith("_"):
            raise AttributeError(op)
        return functools.partial(self.call, op)

    async def call(self, op, timeout=_NO_TIMEOUT, **kwargs):
        """Send ``{'op': op, **kwargs}`` and return the reply."""
        if timeout is _NO_TIMEOUT:
            timeout = self.timeout
        kwargs["op"] = op
        if timeout is None:
            return await self._call(kwargs)
        try:
            return await asyncio.wait_for(self._call(kwargs), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                "%r to %s got no reply within %s s" % (op, self.address, timeout)
            ) from None

    async def _call(self, msg):
        if self._stream is not None:
            stream = self._stream
            async with self._lock:
                try:
                    reply = await self._exchange(self._stream, msg)
                except BaseException:
                    # a half-read reply would poison the next call (tornado
                    # allows one read at a time): this stream is done
                    self._stream.close()
                    raise
        else:
            stream = self.pool.take(self.address) or await self.pool.connect(self.address)
            if stream not in self._streams:
                self._streams = [s for s in self._streams if not s.closed()] + [stream]
            try:
                reply = await self._exchange(stream, msg)
            except BaseException:
                # a half-read reply would poison the next call on this stream
                self.pool.remove(self.address, stream)
                raise
            if msg.get("close"):
                self.pool.remove(self.address, stream)
            else:
                self.pool.reuse(self.address, stream)
        if is_error_message(reply):
            if isinstance(reply["exception"], AuthenticationError):
                stream.close()  # the server refused this connection and closes it
            raise_error_message(reply)
        return reply

    async def _exchange(self, stream, msg):
        try:
            await write(stream, msg)
            if msg.get("reply", True) is False:
                return None
            return await read(stream, self.limits)
        except (StreamClosedError, ssl.SSLError) as e:
            # with TLS 1.3 the server's verdict on our certificate comes now
            # (raised as it is when tornado reads inline, else wrapped)
            raise tls_error(e, self.address) or CommClosedError(
                "connection to %s closed before the reply to %r arrived"
                % (self.address, msg.get("op"))
            ) from e

    @property
    def streams(self):
        """The open streams this rpc uses (a list; a call in flight has one)."""
        self._streams = [s for s in self._streams if not s.closed()]
        return list(self._streams)

    def close_streams(self):
        """Close the streams this rpc opened (all of ``streams``)."""
        for stream in self._streams:
            stream.close()
        self._streams = []
        if self._stream is not None:
            self._stream.close()
        elif self.address is not None:
            self.pool.close(self.address)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close_streams()

    def __repr__(self):
        return "<rpc to %s>" % (self.address,)


class _FirstBytes:
    """Waits (``ready``) for the first bytes of an accepted socket, unread:
    its result is what a peek sees, ``b''`` at end of stream, ``None`` once
    ``close()``d."""

    def __init__(self, connection):
        self.connection = connection
        self.loop = asyncio.get_running_loop()
        self.ready = self.loop.create_future()
        self.fd = connection.fileno()
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self):
        try:
            data = self.connection.recv(8, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._resolve(data)

    def _resolve(self, value):
        self.stop()
        if not self.ready.done():
            self.ready.set_result(value)

    def stop(self):
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            self.fd = None

    def close(self):
        self._resolve(None)
        self.connection.close()


class RateLimitedLog:
    """Log at most one record of each kind per ``interval`` seconds; the next
    one logged says how many were left out meanwhile::

        log = RateLimitedLog(logger, 5)
        log(logging.WARNING, "refused", "refused connection from %s", peer)
    """

    def __init__(self, logger, interval):
        self.logger = logger
        self.interval = interval
        self._kinds = {}  # kind -> [time logged, records left out since]

    def __call__(self, level, kind, msg, *args):
        now = time.monotonic()
        state = self._kinds.get(kind)
        if state is not None and now - state[0] < self.interval:
            state[1] += 1
            return
        if state is not None and state[1]:
            msg += " (and %d more like it in the last %.0f s)" % (state[1], now - state[0])
        self._kinds[kind] = [now, 0]
        self.logger.log(level, msg, *args)


def _format_peer(address):
    try:
        return unparse_address(address[0], address[1])
    except Exception:
        return str(address)


def _peer_of(stream):
    try:
        name = stream.socket.getpeername()
        return name[0], name[1]
    except (OSError, AttributeError):
        return None

