"""Small helpers shared by every node: addresses, keys, tracebacks, sizes."""

import asyncio
import socket
import traceback as _traceback
import uuid

__all__ = [
    "get_ip",
    "parse_address",
    "unparse_address",
    "is_loopback",
    "funcname",
    "key_split",
    "validate_key",
    "format_exception_text",
    "new_id",
    "log_safe",
]


async def wait_for(awaitable, timeout):
    """``await asyncio.wait_for(awaitable, timeout)``, raising the built-in
    ``TimeoutError`` on every Python (3.10's asyncio raises its own
    ``asyncio.TimeoutError``, which ``except TimeoutError`` misses)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError as e:
        if asyncio.TimeoutError is TimeoutError:  # 3.11+: already the built-in one
            raise
        raise TimeoutError("not done within %s s" % timeout) from e


def get_ip(host="8.8.8.8", port=80):
    """The local IP address of the interface that routes to ``host``.

    Connecting a UDP socket sends no packet; it only asks the kernel for a
    route.  With no route (a machine without a default gateway), the first
    address of an interface that is up and not loopback; 127.0.0.1 last.
    """
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        pass
    import psutil

    stats = psutil.net_if_stats()
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return "127.0.0.1"


#: the TCP port a center listens on unless told otherwise, and where an
#: executor looks for one given only a host (``Executor('127.0.0.1')``)
CENTER_PORT = 8787


def with_default_port(address, port=CENTER_PORT):
    """``'host'`` (or ``'tcp://host'``, ``'[::1]'``) -> ``'host:port'``; an
    address that has a port, or is not a string, is returned unchanged.

    >>> with_default_port('127.0.0.1'), with_default_port('10.0.0.5:9000')
    ('127.0.0.1:8787', '10.0.0.5:9000')
    """
    if not isinstance(address, str):
        return address
    scheme, sep, rest = address.rpartition("://")
    if ":" in rest and not (rest.startswith("[") and rest.endswith("]")):
        return address
    return scheme + sep + unparse_address(rest.strip("[]"), port)


def parse_address(addr):
    """``'ip:port'`` (or ``'tcp://ip:port'``, ``'[::1]:port'``) -> ``(ip, port)``."""
    if not isinstance(addr, str):
        raise TypeError("expected an address string 'ip:port', got %r" % (addr,))
    s = addr
    if "://" in s:
        s = s.split("://", 1)[1]
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise ValueError("address %r is not of the form 'ip:port'" % (addr,))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port)
    except ValueError:
        raise ValueError("address %r has a non-numeric port" % (addr,)) from None
    if not 0 <= port < 65536:
        raise ValueError("address %r has a port out of range" % (addr,))
    return host, port


def unparse_address(ip, port):
    """``(ip, port)`` -> ``'ip:port'`` (IPv6 hosts get brackets)."""
    if ":" in ip:
        return "[%s]:%d" % (ip, port)
    return "%s:%d" % (ip, port)


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


def funcname(func):
    """A readable name for a callable, seeing through partials and curries."""
    while hasattr(func, "func"):
        func = func.func
    try:
        return func.__name__
    except AttributeError:
        return type(func).__name__


def key_split(key):
    """The human prefix of a key: ``'inc-1a2b3c'`` -> ``'inc'``; ``('x', 1)`` -> ``'x'``."""
    if type(key) is tuple and key:
        key = key[0]
    if type(key) is bytes:
        key = key.decode("utf-8", "replace")
    if type(key) is not str:
        return "Other"
    words = key.split("-")
    out = [words[0]]
    for w in words[1:]:
        if len(w) >= 8 and all(c in "0123456789abcdef" for c in w):
            break
        out.append(w)
    return "-".join(out)


def validate_key(key):
    """Raise ``ValueError`` unless ``key`` can name a task.

    A key is a str, bytes, int, a float other than NaN, or a tuple of keys:
    values equal to themselves after a round trip through pickle, which
    every table keyed by task (here, on the center, on the workers) needs.
    NaN is not equal to itself: its results could never be found again.
    """
    t = type(key)
    if t in _KEY_TYPES:
        return
    if t is tuple:
        for part in key:
            if type(part) not in _KEY_TYPES:
                _validate_key_part(part, key)
        return
    _validate_key_part(key, key)


_KEY_TYPES = frozenset({str, bytes, int, bool})


def _validate_key_part(part, key):
    t = type(part)
    if t is str or t is bytes or t is int or t is bool:
        return
    if t is float and part == part:
        return
    if t is tuple:
        for p in part:
            _validate_key_part(p, key)
        return
    why = "NaN is not equal to itself" if t is float else "a %s" % t.__name__
    raise ValueError(
        "invalid key %r (%s): a key is a str, bytes, int, a float other than "
        "NaN, or a tuple of those" % (key, why))


def format_exception_text(exc, tb=None):
    tb = tb if tb is not None else exc.__traceback__
    return "".join(_traceback.format_exception(type(exc), exc, tb))


#: characters of peer-supplied text that :func:`log_safe` keeps
LOG_SAFE_LIMIT = 200


def log_safe(value, limit=LOG_SAFE_LIMIT):
    """``value`` (text or anything a peer sent) made fit for one log line.

    Newlines and other control characters come out escaped as ``repr``
    would (so a peer cannot forge a log record), and the text is cut to
    ``limit`` characters.  Never raises, even for a hostile object::

        >>> log_safe('no\\nFAKE RECORD')
        'no\\\\nFAKE RECORD'
        >>> log_safe('x' * 300).endswith('x... (100 more)')
        True
    """
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        text = "<%s whose str() raised>" % type(value).__name__
    escaped = repr(text[: limit + 1])[1:-1]  # repr's escapes, without its quotes
    if len(escaped) > limit or len(text) > limit:
        return "%s... (%d more)" % (escaped[:limit], max(0, len(text) - limit))
    return escaped


def new_id():
    return uuid.uuid4().hex



class PortInUse(OSError):
    """A listener could not take its port: says which port of which listener.

    ``listener`` is ``'tcp'`` (a node's TCP port: ``--port``) or ``'http'``
    (its HTTP/dashboard port: ``--http-port``); ``errno`` is ``EADDRINUSE``.

    >>> str(PortInUse('the Center', 'tcp', '127.0.0.1', 8787))
    'the TCP port 8787 of the Center (127.0.0.1:8787) is already in use'
    """

    def __init__(self, node, listener, host, port):
        import errno

        what = "TCP" if listener == "tcp" else "HTTP (dashboard)"
        super().__init__(errno.EADDRINUSE, "the %s port %d of %s (%s) is already in use"
                         % (what, port, node, unparse_address(host or "0.0.0.0", port)))
        self.listener = listener
        self.port = port

    def __str__(self):
        return self.strerror


def check_port(port):
    """``ValueError`` unless ``port`` is a TCP port number (0-65535; 0: a free one)."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError("port %r is out of range: use 0-65535 (0: a free one)" % (port,))
    return port
