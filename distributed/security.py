"""Authentication and TLS settings: the pure part, no sockets.

A :class:`Security` holds what a node or a client needs to open and accept
connections: a shared secret (the *auth token*) and TLS files::

    >>> s = Security(token='s3cret')
    >>> s
    Security(token='***')
    >>> s.environ()['DISTRIBUTED_AUTH_TOKEN']
    's3cret'

``Security.from_env()`` fills what is not given from the environment
variables ``DISTRIBUTED_AUTH_TOKEN``, ``DISTRIBUTED_TLS_CERT``,
``DISTRIBUTED_TLS_KEY`` and ``DISTRIBUTED_TLS_CA``.

The handshake
-------------
With a token, every connection starts with a challenge-response in which
each side proves that it knows the token, before any message (and so any
pickle) is read.  The functions below make and check its messages; they are
pure code on bytes, and :mod:`distributed.core` only moves them::

    >>> token = b's3cret'
    >>> nc, ns = new_nonce(), new_nonce()
    >>> hello = hello_message(nc)                          # client -> server
    >>> check_hello(*split_message(hello)) == nc
    True
    >>> challenge = challenge_message(token, nc, ns)       # server -> client
    >>> check_challenge(token, nc, *split_message(challenge)) == ns
    True
    >>> proof = proof_message(token, nc, ns)               # client -> server
    >>> check_proof(token, nc, ns, *split_message(proof))
    >>> check_accepted(*split_message(ACCEPTED))           # server -> client

Every handshake message is an 8-byte header, ``b'DAUTH'``, the version
(``1``), a kind byte and the body's length (one byte), then the body:

=====  =====================  ============================================
kind   body                   sent
=====  =====================  ============================================
``H``  client nonce (32)      client -> server, first
``C``  server nonce (32),     server -> client: HMAC-SHA256(token,
       server proof (32)      ``'distributed-auth-1 server'`` + nc + ns)
``P``  client proof (32)      client -> server: HMAC-SHA256(token,
                              ``'distributed-auth-1 client'`` + nc + ns)
``K``  (empty)                server -> client: accepted
``R``  reason (UTF-8)         either way, instead of the expected message
=====  =====================  ============================================

Both proofs cover both nonces, and the server's nonce is fresh for each
connection, so a recorded proof is worth nothing on another connection.  The
client checks the server's proof before it sends anything else: it never
sends a pickle to a peer that does not know the token.
"""

import hashlib
import hmac
import ipaddress
import os
import secrets
import ssl
import struct

__all__ = [
    "Security",
    "AuthenticationError",
    "TLSError",
    "tls_error",
    "default_security",
    "new_nonce",
    "hello_message",
    "challenge_message",
    "proof_message",
    "refusal_message",
    "ACCEPTED",
    "MAGIC",
    "HEADER_SIZE",
    "split_message",
    "parse_header",
    "check_hello",
    "check_challenge",
    "check_proof",
    "check_accepted",
]

ENV_TOKEN = "DISTRIBUTED_AUTH_TOKEN"
ENV_TLS_CERT = "DISTRIBUTED_TLS_CERT"
ENV_TLS_KEY = "DISTRIBUTED_TLS_KEY"
ENV_TLS_CA = "DISTRIBUTED_TLS_CA"
_ENV_VARS = (ENV_TOKEN, ENV_TLS_CERT, ENV_TLS_KEY, ENV_TLS_CA)


class AuthenticationError(ConnectionError):
    """A connection failed the authentication handshake.

    Its message always starts with ``'authentication failed: '``.
    """

    def __init__(self, message=""):
        if not str(message).startswith("authentication failed"):
            message = "authentication failed: %s" % message
        super().__init__(message)


class TLSError(ConnectionError):
    """A TLS handshake failed; the message names the peer and says why::

        TLS handshake with 127.0.0.1:8787 failed: certificate verify failed: ...
    """


#: OpenSSL reasons -> what they mean here
_TLS_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not signed by the CA this "
                                 "side trusts (--tls-ca)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate "
                                         "(--tls-cert, --tls-key)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this side's certificate: it is "
                              "not signed by the peer's --tls-ca",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection; does it use TLS?",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS",
    "HTTP_REQUEST": "the peer does not speak TLS",
}


def tls_error(error, peer):
    """The :class:`TLSError` to raise for ``error`` (an ``ssl.SSLError``, or an
    error whose ``real_error`` is one) on a connection with ``peer``, else
    ``None`` (TLS is not to blame)."""
    real = getattr(error, "real_error", None) or error
    if isinstance(real, TLSError):
        return real
    if not isinstance(real, ssl.SSLError):
        return None
    reason = getattr(real, "reason", None)
    text = getattr(real, "verify_message", None)
    text = "certificate verify failed: %s" % text if text else (
        str(reason or real).lower().replace("_", " "))
    hint = _TLS_HINTS.get(reason)
    return TLSError("TLS handshake with %s failed: %s%s"
                    % (peer, text, "; %s" % hint if hint else ""))


# ---------------------------------------------------------------------------
# Handshake messages

MAGIC = b"DAUTH"
VERSION = 1
HEADER_SIZE = 8
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_BODY = 255

HELLO, CHALLENGE, PROOF, ACCEPT, REFUSE = b"H", b"C", b"P", b"K", b"R"
_BODY_SIZES = {HELLO: NONCE_SIZE, CHALLENGE: NONCE_SIZE + MAC_SIZE, PROOF: MAC_SIZE,
               ACCEPT: 0}
_NAMES = {HELLO: "hello", CHALLENGE: "challenge", PROOF: "proof", ACCEPT: "acceptance",
          REFUSE: "refusal"}
_HEADER = struct.Struct("<5sBcB")
_SERVER_LABEL = b"distributed-auth-1 server"
_CLIENT_LABEL = b"distributed-auth-1 client"


def _message(kind, body=b""):
    return _HEADER.pack(MAGIC, VERSION, kind, len(body)) + body


def new_nonce():
    """32 random bytes from :mod:`secrets`."""
    return secrets.token_bytes(NONCE_SIZE)


def _key(token):
    return token.encode() if isinstance(token, str) else bytes(token)


def _mac(token, label, client_nonce, server_nonce):
    return hmac.new(_key(token), label + client_nonce + server_nonce,
                    hashlib.sha256).digest()


def hello_message(client_nonce):
    """The client's first message: its nonce."""
    return _message(HELLO, client_nonce)


def challenge_message(token, client_nonce, server_nonce):
    """The server's answer: its nonce and its proof that it knows ``token``."""
    return _message(CHALLENGE, server_nonce
                    + _mac(token, _SERVER_LABEL, client_nonce, server_nonce))


def proof_message(token, client_nonce, server_nonce):
    """The client's proof that it knows ``token``."""
    return _message(PROOF, _mac(token, _CLIENT_LABEL, client_nonce, server_nonce))


#: the server's last message when it accepts the client
ACCEPTED = _message(ACCEPT)


def refusal_message(reason):
    """A refusal carrying ``reason`` (cut to 255 bytes of UTF-8)."""
    body = str(reason).encode("utf-8", "replace")[:MAX_BODY]
    return _message(REFUSE, body.decode("utf-8", "ignore").encode())


def is_handshake(data):
    """Whether ``data`` (the first bytes a peer sent) start a handshake message."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def parse_header(data):
    """``(kind, body length)`` of an 8-byte handshake header; raises on garbage."""
    if len(data) != HEADER_SIZE or not is_handshake(data):
        raise AuthenticationError(
            "the peer sent %r instead of an authentication handshake" % bytes(data[:16]))
    _, version, kind, length = _HEADER.unpack(bytes(data))
    if version != VERSION:
        raise AuthenticationError(
            "the peer speaks handshake version %d, this node version %d" % (version, VERSION))
    expected = _BODY_SIZES.get(kind)
    if kind != REFUSE and expected != length:
        raise AuthenticationError("malformed handshake message (kind %r, %d bytes)"
                                  % (kind, length))
    return kind, length


def split_message(data):
    """``(kind, body)`` of one whole handshake message (for tests and tools)."""
    kind, length = parse_header(data[:HEADER_SIZE])
    body = bytes(data[HEADER_SIZE:])
    if len(body) != length:
        raise AuthenticationError("truncated handshake message")
    return kind, body


def _expect(kind, body, expected, who):
    if kind == REFUSE:
        raise AuthenticationError("refused by the %s: %s"
                                  % (who, body.decode("utf-8", "replace")))
    if kind != expected:
        raise AuthenticationError("expected a %s from the %s, got a %s"
                                  % (_NAMES[expected], who, _NAMES.get(kind, repr(kind))))


def check_hello(kind, body):
    """The client nonce of a hello; raises :class:`AuthenticationError`."""
    _expect(kind, body, HELLO, "client")
    return body


def check_challenge(token, client_nonce, kind, body):
    """The server nonce of a challenge whose proof matches ``token``; else raises."""
    _expect(kind, body, CHALLENGE, "server")
    server_nonce, proof = body[:NONCE_SIZE], body[NONCE_SIZE:]
    if not hmac.compare_digest(proof, _mac(token, _SERVER_LABEL, client_nonce, server_nonce)):
        raise AuthenticationError(
            "the server's proof does not match the client's auth token "
            "(the two tokens differ)")
    return server_nonce


def check_proof(token, client_nonce, server_nonce, kind, body):
    """Return if the client's proof matches ``token`` on this connection; else raise."""
    _expect(kind, body, PROOF, "client")
    if not hmac.compare_digest(body, _mac(token, _CLIENT_LABEL, client_nonce, server_nonce)):
        raise AuthenticationError("the client's proof does not match the server's auth "
                                  "token (the two tokens differ)")


def check_accepted(kind, body):
    """Return if the server accepted us; else raise with its reason."""
    _expect(kind, body, ACCEPT, "server")


# ---------------------------------------------------------------------------
# Settings


class Security:
    """An auth token and TLS files; builds the ``ssl.SSLContext`` of each side.

    ::

        Security(token='s3cret')                                  # auth only
        Security(tls_cert='node.pem', tls_key='node.key', tls_ca='ca.pem')
        Security.from_env(token=args.auth_token)                  # CLI, env

    ``token``: the shared secret (``None`` or ``''``: no authentication).
    ``tls_cert`` / ``tls_key``: this node's certificate chain and key (PEM;
    ``tls_key`` may be omitted when the certificate file holds the key); a
    node that listens needs them once any TLS setting is given.  ``tls_ca``:
    verify peers against this CA; servers then also require a client
    certificate signed by it.  ``tls_check_hostname``: compare the server's
    certificate with the host name connected to; ``None`` (default) does so
    for host names but not for IP addresses.
    """

    __slots__ = ("token", "tls_cert", "tls_key", "tls_ca", "tls_check_hostname",
                 "_server_context", "_client_contexts")

    def __init__(self, token=None, tls_cert=None, tls_key=None, tls_ca=None,
                 tls_check_hostname=None):
        if isinstance(token, bytes):
            token = token.decode()
        self.token = token or None
        self.tls_cert = tls_cert or None
        self.tls_key = tls_key or None
        self.tls_ca = tls_ca or None
        self.tls_check_hostname = tls_check_hostname
        if self.tls_key and not self.tls_cert:
            raise ValueError("a TLS key needs its certificate (--tls-cert)")
        if tls_check_hostname and not self.tls_ca:
            raise ValueError("checking host names needs a CA to verify against (--tls-ca)")
        self._server_context = None
        self._client_contexts = {}
        if self.tls:  # bad files fail here, with the file named, not on first use
            self.client_context()
            if self.tls_cert:
                self.server_context()

    @classmethod
    def from_env(cls, token=None, tls_cert=None, tls_key=None, tls_ca=None,
                 environ=None, **kwargs):
        """Arguments given win; the rest come from the ``DISTRIBUTED_*`` variables."""
        env = os.environ if environ is None else environ
        return cls(token=token or env.get(ENV_TOKEN),
                   tls_cert=tls_cert or env.get(ENV_TLS_CERT),
                   tls_key=tls_key or env.get(ENV_TLS_KEY),
                   tls_ca=tls_ca or env.get(ENV_TLS_CA), **kwargs)

    @property
    def tls(self):
        """Whether connections use TLS."""
        return bool(self.tls_cert or self.tls_ca)

    def with_token(self, token):
        """A copy with another token (the same TLS settings)."""
        return Security(token, self.tls_cert, self.tls_key, self.tls_ca,
                        self.tls_check_hostname)

    def server_context(self):
        """The ``SSLContext`` a listening node uses, or ``None`` without TLS."""
        if not self.tls:
            return None
        if not self.tls_cert:
            raise ValueError("a node that accepts TLS connections needs a certificate "
                             "and key (--tls-cert, --tls-key)")
        if self._server_context is None:
            ctx = _context(ssl.Purpose.CLIENT_AUTH, self.tls_ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            _load_chain(ctx, self.tls_cert, self.tls_key)
            if self.tls_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
            self._server_context = ctx
        return self._server_context

    def client_context(self, host=None):
        """The ``SSLContext`` for connecting to ``host``, or ``None`` without TLS."""
        if not self.tls:
            return None
        check = bool(self.tls_ca) and (
            self.tls_check_hostname if self.tls_check_hostname is not None
            else host is not None and not _is_ip(host))
        ctx = self._client_contexts.get(check)
        if ctx is None:
            ctx = _context(ssl.Purpose.SERVER_AUTH, self.tls_ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = check
            if not self.tls_ca:  # encryption only: there is nothing to verify against
                ctx.verify_mode = ssl.CERT_NONE
            if self.tls_cert:
                _load_chain(ctx, self.tls_cert, self.tls_key)
            self._client_contexts[check] = ctx
        return ctx

    def environ(self):
        """``{variable: value or None}``: these settings as environment variables."""
        return {ENV_TOKEN: self.token, ENV_TLS_CERT: self.tls_cert,
                ENV_TLS_KEY: self.tls_key, ENV_TLS_CA: self.tls_ca}

    def child_env(self, base=None):
        """A copy of ``base`` (default ``os.environ``) that hands these settings to
        a child process: the token never appears on a command line."""
        env = dict(os.environ if base is None else base)
        for name, value in self.environ().items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        return env

    def __repr__(self):
        parts = ["token='***'"] if self.token else []
        parts += ["%s=%r" % (name, getattr(self, name))
                  for name in ("tls_cert", "tls_key", "tls_ca") if getattr(self, name)]
        return "Security(%s)" % ", ".join(parts)


def _context(purpose, ca):
    try:
        return ssl.create_default_context(purpose, cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ValueError("cannot load the TLS CA file %s: %s" % (ca, e)) from None


def _load_chain(ctx, cert, key):
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError("cannot load the TLS certificate %s%s: %s"
                         % (cert, " / key %s" % key if key else "", e)) from None


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


_default = [None, None]  # (environment values it was made from, Security)


def default_security():
    """The :class:`Security` of the environment (rebuilt when the variables change)."""
    values = tuple(map(os.environ.get, _ENV_VARS))
    if _default[0] != values or _default[1] is None:
        _default[:] = [values, Security.from_env()]
    return _default[1]
