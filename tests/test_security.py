"""Authentication (shared token), TLS and connection limits.

The handshake's pure functions are driven with byte strings; servers and
clusters run on free loopback ports; certificates come from a throw-away CA
made here with ``cryptography``.
"""

import asyncio
import datetime
import ipaddress
import logging
import os
import pickle
import ssl
import struct
import sys
import time

import psutil
import pytest
from tornado.iostream import StreamClosedError

from distributed import Center, Executor, Worker, security as sec
from distributed.cli.utils import warn_if_exposed
from distributed.core import (
    AuthenticationError,
    CommClosedError,
    Server,
    connect,
    read,
    rpc,
)
from distributed.protocol import (
    FrameTooLarge,
    HandshakeNotExpected,
    ProtocolError,
    dumps,
    frames_to_bytes,
    parse_count,
)
from distributed.security import Security
from distributed.utils_test import (call, child_env, end_cluster, hold_gil, inc, popen, run,
                                    wait_for, wait_for_line)

TOKEN = "correct horse battery staple"


def handshake(token_client, token_server):
    """Both sides of a handshake on bytes; the accepted message or the error."""
    nc, ns = sec.new_nonce(), sec.new_nonce()
    hello = sec.hello_message(nc)
    got_nc = sec.check_hello(*sec.split_message(hello))
    challenge = sec.challenge_message(token_server, got_nc, ns)
    got_ns = sec.check_challenge(token_client, nc, *sec.split_message(challenge))
    proof = sec.proof_message(token_client, nc, got_ns)
    sec.check_proof(token_server, got_nc, ns, *sec.split_message(proof))
    sec.check_accepted(*sec.split_message(sec.ACCEPTED))
    return proof


# ---------------------------------------------------------------------------
# The pure handshake


def test_handshake_right_token():
    proof = handshake(TOKEN, TOKEN)
    assert len(proof) == sec.HEADER_SIZE + 32
    assert TOKEN.encode() not in proof
    handshake(b"bytes token", "bytes token")  # str and bytes are the same secret


def test_handshake_wrong_token_caught_by_the_client_first():
    with pytest.raises(AuthenticationError, match="authentication failed: the server's "
                       "proof does not match"):
        handshake("mine", "theirs")


def test_handshake_wrong_proof_caught_by_the_server():
    nc, ns = sec.new_nonce(), sec.new_nonce()
    proof = sec.proof_message("not the token", nc, ns)
    with pytest.raises(AuthenticationError, match="client's proof does not match"):
        sec.check_proof(TOKEN, nc, ns, *sec.split_message(proof))
    # a client that answers with the server's own proof is no better
    fake = sec.challenge_message(TOKEN, nc, ns)[sec.HEADER_SIZE + 32:]
    with pytest.raises(AuthenticationError):
        sec.check_proof(TOKEN, nc, ns, sec.PROOF, fake)


def test_handshake_replayed_response_refused():
    nc, ns1 = sec.new_nonce(), sec.new_nonce()
    recorded = sec.proof_message(TOKEN, nc, ns1)
    sec.check_proof(TOKEN, nc, ns1, *sec.split_message(recorded))
    # the same hello again: the server picks a fresh nonce, the old proof fails
    ns2 = sec.new_nonce()
    with pytest.raises(AuthenticationError, match="proof does not match"):
        sec.check_proof(TOKEN, nc, ns2, *sec.split_message(recorded))
    # a recorded challenge does not fool a client with a fresh nonce either
    challenge = sec.challenge_message(TOKEN, nc, ns1)
    with pytest.raises(AuthenticationError, match="proof does not match"):
        sec.check_challenge(TOKEN, sec.new_nonce(), *sec.split_message(challenge))


@pytest.mark.parametrize("data", [
    b"",
    b"DAUTH",
    b"\x01\x00\x00\x00\x00\x00\x00\x00",           # a message prelude
    b"XAUTH\x01H\x20" + b"\x00" * 32,               # bad magic
    b"DAUTH\x02H\x20" + b"\x00" * 32,               # unknown version
    b"DAUTH\x01H\x10" + b"\x00" * 16,               # wrong body length
    b"DAUTH\x01Z\x00",                              # unknown kind
    b"DAUTH\x01H\x20" + b"\x00" * 10,               # truncated
    os.urandom(40),
])
def test_handshake_garbage(data):
    with pytest.raises(AuthenticationError, match="^authentication failed: "):
        sec.check_hello(*sec.split_message(data))


def test_handshake_out_of_order_and_refusals():
    nc, ns = sec.new_nonce(), sec.new_nonce()
    with pytest.raises(AuthenticationError, match="expected a challenge from the server, "
                       "got a hello"):
        sec.check_challenge(TOKEN, nc, *sec.split_message(sec.hello_message(ns)))
    refusal = sec.refusal_message("go away")
    with pytest.raises(AuthenticationError, match="refused by the server: go away"):
        sec.check_challenge(TOKEN, nc, *sec.split_message(refusal))
    with pytest.raises(AuthenticationError, match="refused by the server: go away"):
        sec.check_accepted(*sec.split_message(refusal))
    long = sec.refusal_message("é" * 1000)
    kind, body = sec.split_message(long)
    assert kind == sec.REFUSE and len(body) <= 255
    body.decode("utf-8")  # cut on a character boundary


def test_no_token_node_names_a_handshake():
    hello = sec.hello_message(sec.new_nonce())
    with pytest.raises(HandshakeNotExpected, match="no auth token"):
        parse_count(hello)
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    with pytest.raises(ProtocolError, match="TLS"):
        parse_count(client_hello)
    with pytest.raises(FrameTooLarge):
        parse_count(struct.pack("<Q", 2**40))


def test_authentication_error():
    e = AuthenticationError("nope")
    assert str(e) == "authentication failed: nope"
    assert isinstance(e, ConnectionError)
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_security_settings(monkeypatch):
    s = Security(token=TOKEN)
    assert TOKEN not in repr(s) and "***" in repr(s)
    assert not s.tls and s.client_context() is None and s.server_context() is None
    assert Security(token="").token is None
    monkeypatch.setenv("DISTRIBUTED_AUTH_TOKEN", "from-env")
    assert Security.from_env().token == "from-env"
    assert Security.from_env(token="given").token == "given"
    assert sec.default_security().token == "from-env"
    monkeypatch.delenv("DISTRIBUTED_AUTH_TOKEN")
    assert sec.default_security().token is None
    env = Security(token="t").child_env({"DISTRIBUTED_TLS_CA": "stale", "PATH": "/bin"})
    assert env == {"DISTRIBUTED_AUTH_TOKEN": "t", "PATH": "/bin"}
    with pytest.raises(ValueError, match="certificate"):
        Security(tls_key="key.pem")
    with pytest.raises(ValueError, match="cannot load"):
        Security(tls_cert="/nonexistent/cert.pem")


# ---------------------------------------------------------------------------
# A server with a token


calls = []


def record(stream, x=None):
    calls.append(x)
    return x


def _remember(x):
    calls.append(("unpickled", x))
    return x


class Payload:
    """Unpickling this records a call: it shows whether a pickle was loaded."""

    def __reduce__(self):
        return (_remember, ("payload",))


@pytest.fixture
def recorded():
    calls.clear()
    yield calls
    calls.clear()


async def token_server(token=TOKEN, **kwargs):
    s = Server({"record": record}, security=Security(token=token), **kwargs)
    s.listen(0)
    return s


def test_rpc_with_the_token(recorded):
    async def f():
        s = await token_server()
        try:
            with rpc(s.address, security=Security(token=TOKEN)) as r:
                assert await r.record(x=1) == 1
                assert await r.record(x=2) == 2  # the stream is reused
                assert r.pool.open == 1
        finally:
            s.stop()

    run(f())
    assert recorded == [1, 2]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_server_refuses_client_without_the_token(recorded, caplog, token):
    async def f():
        s = await token_server()
        try:
            with rpc(s.address, security=Security(token=token)) as r:
                for _ in range(2):  # and again, on a fresh connection
                    with pytest.raises(AuthenticationError) as info:
                        await r.record(x=Payload(), timeout=5)
                    assert "authentication failed" in str(info.value)
                    assert s.address in str(info.value)
            await wait_for(lambda: not s.streams)
        finally:
            s.stop()

    with caplog.at_level(logging.WARNING, logger="distributed.core"):
        run(f())
    assert recorded == []  # the handler did not run, nothing was unpickled
    assert "refused connection from 127.0.0.1" in caplog.text
    assert ("no auth token" if token is None else "tokens differ") in caplog.text


def test_server_refuses_raw_pickle_before_reading_it(recorded, monkeypatch):
    """Bytes of a whole request with a pickle arrive at once: none is loaded."""
    from distributed import core

    monkeypatch.setattr(core, "REFUSAL_LINGER", 0.1)

    async def f():
        s = await token_server()
        try:
            stream = await connect(s.address, security=Security())
            msg = {"op": "record", "x": Payload()}
            await stream.write(frames_to_bytes(dumps(msg)))
            reply = await asyncio.wait_for(read(stream), 5)
            assert isinstance(reply["exception"], AuthenticationError)
            await asyncio.wait_for(stream.read_bytes(1), 5)
        finally:
            s.stop()

    with pytest.raises(StreamClosedError):
        run(f())
    assert recorded == []


def test_server_closes_garbage_and_silence(recorded, monkeypatch):
    from distributed import core

    monkeypatch.setattr(core, "HANDSHAKE_TIMEOUT", 0.3)
    monkeypatch.setattr(core, "REFUSAL_LINGER", 0.1)

    async def f():
        s = await token_server()
        try:
            for data in [b"DAUTH\x01H\x20" + os.urandom(32) + b"more than asked",
                         b"DAUTH\x07H\x20" + os.urandom(32), b""]:
                stream = await connect(s.address, security=Security())
                await stream.write(data)
                with pytest.raises(StreamClosedError):
                    while True:  # whatever the server says, then it closes
                        await asyncio.wait_for(stream.read_bytes(1), 5)
        finally:
            s.stop()

    run(f())
    assert recorded == []


def test_client_with_token_refused_by_server_without(recorded, caplog):
    async def f():
        s = Server({"record": record}, security=Security())
        s.listen(0)
        try:
            with pytest.raises(AuthenticationError, match="authentication failed with "
                               "127.0.0.1:.*has no auth token"):
                await connect(s.address, security=Security(token=TOKEN), timeout=5)
        finally:
            s.stop()

    with caplog.at_level(logging.WARNING, logger="distributed.core"):
        run(f())
    assert recorded == []
    assert "opened with an authentication handshake" in caplog.text


def test_connections_per_peer_limited(caplog):
    async def f():
        s = Server({}, security=Security(), max_connections_per_peer=2)
        s.listen(0)
        try:
            a, b, c = rpc(s.address), rpc(s.address), rpc(s.address)
            assert await a.ping() == b"pong"
            assert await b.ping() == b"pong"
            with pytest.raises((CommClosedError, OSError)):
                await c.ping(timeout=5)
            a.close_streams()
            await wait_for(lambda: s._peer_connections.get("127.0.0.1") == 1)
            assert await c.ping() == b"pong"  # room again
            for r in (a, b, c):
                r.close_streams()
            await wait_for(lambda: not s._peer_connections)
        finally:
            s.stop()

    with caplog.at_level(logging.WARNING, logger="distributed.core"):
        run(f())
    assert "2 connections from 127.0.0.1 are open, the limit is 2" in caplog.text


def test_unauthenticated_connections_have_their_own_budget(caplog, monkeypatch):
    """Connections that have not authenticated are few, short-lived and do not
    count towards the per-peer limit: they cannot lock a client out."""
    from distributed import core

    monkeypatch.setattr(core, "HANDSHAKE_TIMEOUT", 1.0)

    async def f():
        s = await token_server(max_pending_connections=4, max_connections_per_peer=2)
        try:
            idle = [await connect(s.address, security=Security()) for _ in range(10)]
            await wait_for(lambda: len(s._pending) == 4)
            # the oldest were closed to make room
            for stream in idle[:6]:
                with pytest.raises(StreamClosedError):
                    await asyncio.wait_for(stream.read_bytes(1), 5)
            # a client with the token gets in at once (and so does a second)
            a, b = (rpc(s.address, security=Security(token=TOKEN)) for _ in range(2))
            assert await a.record(x=1, timeout=5) == 1
            assert await b.record(x=2, timeout=5) == 2
            assert s._peer_connections == {"127.0.0.1": 2}
            # those that never authenticate are closed after HANDSHAKE_TIMEOUT
            await wait_for(lambda: not s._pending, timeout=5)
            for stream in idle[6:]:
                with pytest.raises(StreamClosedError):
                    await asyncio.wait_for(stream.read_bytes(1), 5)
            assert await a.record(x=3, timeout=5) == 3  # authenticated ones stay
            a.close_streams()
            b.close_streams()
        finally:
            s.stop()

    with caplog.at_level(logging.WARNING, logger="distributed.core"):
        run(f())
    evictions = [r for r in caplog.records if "have not authenticated yet" in r.message]
    assert len(evictions) == 1, caplog.text  # six closed, one line: rate-limited
    assert "did not authenticate within 1.0 s" in caplog.text


def test_accepted_client_survives_a_burst_of_new_connections(recorded, monkeypatch):
    """A burst of unauthenticated connections that arrives after the server
    has accepted a client's proof (its reply may already be on the way) does
    not close that client: it stopped counting as pending when its proof
    checked out.  (The flood test on real processes lost an Executor this
    way on a slow machine.)"""

    class Idle:
        def close(self):
            pass

    authenticate = Server._authenticate

    async def then_a_burst(self, stream, address, **kwargs):
        ok = await authenticate(self, stream, address, **kwargs)
        for i in range(self.max_pending_connections):
            self._admit_pending(Idle(), ("127.0.0.9", i))
        return ok

    monkeypatch.setattr(Server, "_authenticate", then_a_burst)

    async def f():
        s = await token_server(max_pending_connections=4)
        try:
            with rpc(s.address, security=Security(token=TOKEN)) as r:
                assert await r.record(x=1, timeout=5) == 1
                assert len(s._pending) == 4  # the burst is waiting, the client is not
        finally:
            s.stop()

    run(f())


def test_executor_retries_a_center_that_closes_before_answering():
    """A center that closes the Executor's first connection before answering
    it (as one shedding a flood of connections does) is connected to again
    within the Executor's timeout, instead of failing at once."""
    from distributed.utils_test import gen_cluster

    @gen_cluster(ncores=(1,))
    async def f(c, w):
        closed = []

        async def proxy(reader, writer):
            if not closed:  # the first: read the request, close without answering
                await reader.read(1)
                closed.append(True)
                writer.close()
                return
            host, port = c.address.rsplit(":", 1)
            r2, w2 = await asyncio.open_connection(host, int(port))

            async def pipe(src, dst):
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except OSError:
                    pass
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with Executor("127.0.0.1:%d" % port, start=False, timeout=5) as e:
                assert closed == [True]
                assert await e.submit(inc, 1) == 2
        finally:
            server.close()

    f()


@pytest.mark.parametrize("size", [100, 1_000_000])
def test_stalled_message_closes_the_connection(caplog, size):
    """A message that stops half-way is cut off after ``stall_timeout``; a
    connection idle between messages is not."""
    async def f():
        s = Server({"record": record}, security=Security(), stall_timeout=0.5)
        s.listen(0)
        try:
            stream = await connect(s.address, security=Security())
            await asyncio.sleep(1.0)  # idle between messages: fine
            await stream.write(frames_to_bytes(dumps({"op": "record", "x": 1})))
            assert await asyncio.wait_for(read(stream), 5) == 1
            data = frames_to_bytes(dumps({"op": "record", "x": b"x" * size}))
            loop = asyncio.get_running_loop()
            start = loop.time()
            await stream.write(data[: len(data) // 2])
            with pytest.raises(StreamClosedError):
                await asyncio.wait_for(stream.read_bytes(1), 5)
            assert 0.4 < loop.time() - start < 3
        finally:
            s.stop()

    with caplog.at_level(logging.WARNING, logger="distributed.core"):
        run(f())
    assert "did not arrive within 0.5 s" in caplog.text


def test_rate_limited_log(caplog):
    from distributed.core import RateLimitedLog

    log = RateLimitedLog(logging.getLogger("test-rate"), 0.3)
    with caplog.at_level(logging.WARNING, logger="test-rate"):
        for i in range(100):
            log(logging.WARNING, "a", "refused %d", i)
        log(logging.WARNING, "b", "other kind")
        time.sleep(0.35)
        log(logging.WARNING, "a", "refused %d", 100)
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "other kind", "refused 100 (and 99 more like it in the last 0 s)"]


# ---------------------------------------------------------------------------
# A cluster with a token


async def cluster_with(security, n=2):
    c = Center("127.0.0.1", security=security)
    c.listen(0)
    workers = [Worker(c.ip, c.port, ip="127.0.0.1", ncores=1, security=security)
               for _ in range(n)]
    await asyncio.gather(*[w._start(0, timeout=5) for w in workers])
    return c, workers


async def end_to_end(c, security):
    e = Executor(c.address, start=False, security=security)
    await e._start()
    try:
        x = await e._scatter([10])  # executor -> worker
        futures = e.map(inc, range(10)) + [e.submit(sum, x)]  # worker <-> worker too
        assert await e._gather(futures) == list(range(1, 11)) + [10]
        assert await e.submit(sum, futures[:10]) == sum(range(1, 11))
    finally:
        await e._shutdown()


def test_center_worker_executor_with_token():
    security = Security(token=TOKEN)

    async def f():
        c, workers = await cluster_with(security)
        try:
            await wait_for(lambda: len(c.ncores) == 2)
            await end_to_end(c, security)
            # without the token: nothing
            with pytest.raises(AuthenticationError, match="authentication failed"):
                await Executor(c.address, start=False, security=Security(),
                               timeout=3)._start()
            with pytest.raises(AuthenticationError, match="authentication failed"):
                await rpc(workers[0].address, security=Security()).run(
                    function=os.getpid, timeout=5)
        finally:
            await end_cluster(c, workers)

    run(f())


def test_worker_with_wrong_token_fails_to_register_at_once():
    async def f():
        c = Center("127.0.0.1", security=Security(token=TOKEN))
        c.listen(0)
        w = Worker(c.ip, c.port, ip="127.0.0.1", security=Security(token="wrong"))
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(AuthenticationError, match="authentication failed with "
                               "127.0.0.1:.*tokens differ"):
                await w._start(0, timeout=10)
            assert loop.time() - start < 5  # no retrying: it cannot help
            assert not c.ncores
        finally:
            await w._close(report=False, timeout=1)
            c.close()

    run(f())


@pytest.mark.processes
def test_executor_local_cluster_has_a_token():
    e = Executor(n_workers=1)
    try:
        token = e.cluster.security.token
        assert token and len(token) == 64
        assert e.security is e.cluster.security
        assert e.submit(inc, 1).result() == 2
        # the token is nowhere on the cluster's command lines
        for p in [e.cluster.center] + e.cluster.workers:
            assert token not in " ".join(psutil.Process(p.pid).cmdline())
        # this process's Executor(address) finds it; others need it
        with Executor(e.address) as e2:
            assert e2.submit(inc, 2).result() == 3

        async def without():
            with pytest.raises(AuthenticationError, match="authentication failed"):
                await rpc(e.address, security=Security()).ncores(timeout=5)
        run(without())
    finally:
        e.shutdown()


# ---------------------------------------------------------------------------
# TLS with a throw-away CA


def _make_certs(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, ca=False):
        builder = (x509.CertificateBuilder()
                   .subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False), critical=True)
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(filename, obj):
        path = str(directory / filename)
        with open(path, "wb") as f:
            if isinstance(obj, x509.Certificate):
                f.write(obj.public_bytes(serialization.Encoding.PEM))
            else:
                f.write(obj.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return path

    paths = {}
    for ca_name in ("ca", "other-ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        node_key = ec.generate_private_key(ec.SECP256R1())
        node_cert = cert("node", node_key, ca_name, ca_key)
        paths[ca_name] = {"tls_ca": write(ca_name + ".pem", ca_cert),
                          "tls_cert": write(ca_name + "-node.pem", node_cert),
                          "tls_key": write(ca_name + "-node.key", node_key)}
    return paths


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    pytest.importorskip("cryptography")
    return _make_certs(tmp_path_factory.mktemp("tls"))


def test_tls_contexts(certs):
    s = Security(**certs["ca"])
    server = s.server_context()
    assert server.verify_mode == ssl.CERT_REQUIRED  # clients need a certificate too
    assert s.client_context("127.0.0.1").check_hostname is False
    assert s.client_context("localhost").check_hostname is True
    assert s.client_context("127.0.0.1").verify_mode == ssl.CERT_REQUIRED
    assert Security(**certs["ca"], tls_check_hostname=True).client_context(
        "127.0.0.1").check_hostname is True
    encrypt_only = Security(tls_cert=certs["ca"]["tls_cert"],
                            tls_key=certs["ca"]["tls_key"])
    assert encrypt_only.client_context("127.0.0.1").verify_mode == ssl.CERT_NONE
    assert encrypt_only.server_context().verify_mode == ssl.CERT_NONE
    with pytest.raises(ValueError, match="needs a certificate"):
        Server({}, security=Security(tls_ca=certs["ca"]["tls_ca"]))


def test_rpc_over_tls(certs, recorded, caplog):
    tls = Security(**certs["ca"])

    async def f():
        s = Server({"record": record}, security=tls)
        s.listen(0)
        try:
            with rpc(s.address, security=tls) as r:
                assert await r.record(x=b"x" * 100_000) == b"x" * 100_000
                stream = r.pool.available[s.address][0]
                assert stream.socket.version().startswith("TLS")
            # by host name: the certificate's name is checked, and matches
            with rpc("localhost:%d" % s.port, security=tls) as r:
                assert await r.record(x=2) == 2
            # plain TCP is refused
            with rpc(s.address, security=Security()) as r:
                with pytest.raises((CommClosedError, OSError)):
                    await r.record(x=Payload(), timeout=5)
            # a certificate from another CA is refused, both ways, and so is a
            # client without one (with TLS 1.3, at its first request)
            other = Security(**certs["other-ca"])
            for client in [other, Security(tls_ca=certs["other-ca"]["tls_ca"]),
                           Security(tls_ca=certs["ca"]["tls_ca"])]:
                with rpc(s.address, security=client) as r:
                    with pytest.raises(OSError):  # StreamClosedError is one
                        await r.record(x=Payload(), timeout=5)
        finally:
            s.stop()
        # TLS to a plain server
        plain = Server({"record": record}, security=Security())
        plain.listen(0)
        try:
            with pytest.raises(OSError):
                await connect(plain.address, security=tls, timeout=5)
        finally:
            plain.stop()

    with caplog.at_level(logging.ERROR, logger="distributed.core"):
        run(f())
    assert recorded == [b"x" * 100_000, 2]
    assert "opened a TLS connection, but this node does not use TLS" in caplog.text


@pytest.mark.parametrize("case", ["client without certificate", "wrong CA",
                                  "plain TCP to TLS", "TLS to plain", "token, no cert",
                                  "token, plain TCP to TLS"])
def test_tls_failures_name_tls_and_the_peer(certs, case):
    """Every failed TLS handshake raises a ConnectionError that says TLS, names
    the peer and why, not 'Stream is closed'."""
    tls = Security(**certs["ca"])
    client, server_security, expected = {
        "client without certificate": (Security(tls_ca=certs["ca"]["tls_ca"]), tls,
                                       "requires a client certificate"),
        "wrong CA": (Security(**certs["other-ca"]), tls, "certificate verify failed"),
        "plain TCP to TLS": (Security(), tls, "requires TLS"),
        "TLS to plain": (tls, Security(), "does it use TLS"),
        "token, no cert": (Security(token=TOKEN, tls_ca=certs["ca"]["tls_ca"]),
                           tls.with_token(TOKEN), "requires a client certificate"),
        "token, plain TCP to TLS": (Security(token=TOKEN), tls.with_token(TOKEN),
                                    "requires TLS"),
    }[case]

    async def f():
        s = Server({"record": record}, security=server_security)
        s.listen(0)
        try:
            with rpc(s.address, security=client) as r:
                with pytest.raises(ConnectionError) as info:
                    await r.record(x=1, timeout=5)
            message = str(info.value)
            assert "TLS" in message and s.address in message, message
            assert expected in message, message
            assert "Stream is closed" not in message
        finally:
            s.stop()

    run(f())


@pytest.mark.processes
def test_cli_tls_failures_name_tls_and_the_center(certs):
    flags = ["--tls-cert", certs["ca"]["tls_cert"], "--tls-key", certs["ca"]["tls_key"],
             "--tls-ca", certs["ca"]["tls_ca"]]
    env = {k: v for k, v in os.environ.items() if k not in sec._ENV_VARS}
    with dcenter(flags, env=env) as center:
        address = wait_for_line(center, "Start center at").split()[-1]
        other = certs["other-ca"]
        for worker_flags, expected in [
                ([], "requires TLS"),
                (["--tls-cert", other["tls_cert"], "--tls-key", other["tls_key"],
                  "--tls-ca", other["tls_ca"]], "certificate verify failed")]:
            with dworker(address, ["--no-nanny"] + worker_flags, env=env) as worker:
                line = wait_for_line(worker, "dworker: error", timeout=20)
                assert "TLS" in line and address in line and expected in line, line
                assert worker.wait(10) == 1
        # an executor without a certificate: told at once, not after its timeout
        start = time.time()
        with pytest.raises(ConnectionError, match="TLS handshake with %s failed: .*"
                           "requires a client certificate" % address):
            Executor(address, security=Security(tls_ca=certs["ca"]["tls_ca"]), timeout=20)
        assert time.time() - start < 10


def test_center_worker_executor_over_tls_with_token(certs):
    security = Security(token=TOKEN, **certs["ca"])

    async def f():
        c, workers = await cluster_with(security)
        try:
            await end_to_end(c, security)
            # TLS without the token is not enough
            with pytest.raises(AuthenticationError):
                await rpc(c.address, security=Security(**certs["ca"])).ncores(timeout=5)
        finally:
            await end_cluster(c, workers)

    run(f())


# ---------------------------------------------------------------------------
# Command lines


def dcenter(args, env=None):
    return popen([sys.executable, "-m", "distributed.cli.dcenter", "--port", "0"] + args,
                 env=env)


def dworker(center, args, env=None):
    return popen([sys.executable, "-m", "distributed.cli.dworker", center,
                  "--connect-timeout", "10"] + args, env=env)


@pytest.mark.processes
def test_cli_auth_token_and_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "DISTRIBUTED_AUTH_TOKEN"}
    with dcenter([], env=dict(env, DISTRIBUTED_AUTH_TOKEN=TOKEN)) as center:
        address = wait_for_line(center, "Start center at").split()[-1]
        # a worker under a nanny, with the option
        with dworker(address, ["--auth-token", TOKEN], env=env) as worker:
            wait_for_line(worker, "Registered with center", timeout=20)
            ncores = call(address, "ncores", Security(token=TOKEN))
            assert len(ncores) == 1
            # the nanny gave it to its worker by environment, not on the command line
            [child] = psutil.Process(worker.pid).children()
            assert TOKEN not in " ".join(child.cmdline())
            assert child.environ()["DISTRIBUTED_AUTH_TOKEN"] == TOKEN
            with pytest.raises(AuthenticationError, match="authentication failed"):
                call(address, "ncores", Security())
        # a worker without a token is refused
        with dworker(address, ["--no-nanny"], env=env) as worker:
            line = wait_for_line(worker, "dworker: error", timeout=20)
            assert "authentication failed" in line and "requires an auth token" in line
            assert worker.wait(10) == 1
        # a worker with the wrong token stops at once with a clear error
        with dworker(address, ["--no-nanny", "--auth-token", "wrong"]) as worker:
            line = wait_for_line(worker, "dworker: error", timeout=20)
            assert "authentication failed" in line and "tokens differ" in line
            assert worker.wait(10) == 1


@pytest.mark.processes
def test_cli_tls(certs):
    tls = Security(**certs["ca"])
    flags = ["--tls-cert", certs["ca"]["tls_cert"], "--tls-key", certs["ca"]["tls_key"],
             "--tls-ca", certs["ca"]["tls_ca"]]
    with dcenter(flags + ["--auth-token", TOKEN]) as center:
        address = wait_for_line(center, "Start center at").split()[-1]
        # settings from the environment: the worker, under a nanny, gets them too
        with dworker(address, [], env=tls.with_token(TOKEN).child_env()) as worker:
            wait_for_line(worker, "Registered with center", timeout=20)
            assert len(call(address, "ncores", tls.with_token(TOKEN))) == 1


@pytest.mark.processes
def test_cli_bad_tls_file_is_a_usage_error(tmp_path):
    with dcenter(["--tls-cert", str(tmp_path / "missing.pem")]) as center:
        line = wait_for_line(center, "error")
        assert "cannot load the TLS certificate" in line
        assert center.wait(10) == 2


def collect_until(proc, pattern):
    lines = []
    while True:
        line = wait_for_line(proc, ".*")
        lines.append(line)
        if pattern in line:
            return lines


@pytest.mark.processes
def test_non_loopback_warning():
    env = {k: v for k, v in os.environ.items() if k != "DISTRIBUTED_AUTH_TOKEN"}
    with dcenter(["--host", "0.0.0.0"], env=env) as center:
        lines = collect_until(center, "Start center at")
    assert any("anyone who can reach this port can run code" in line for line in lines)
    with dcenter(["--host", "0.0.0.0"], env=dict(env, DISTRIBUTED_AUTH_TOKEN=TOKEN)) \
            as center:
        lines = collect_until(center, "Start center at")
    assert not any("anyone" in line for line in lines), lines


def test_warn_if_exposed(caplog):
    log = logging.getLogger("test-security")
    with caplog.at_level(logging.WARNING, logger="test-security"):
        warn_if_exposed(log, "the worker", "127.0.0.1", Security())
        warn_if_exposed(log, "the worker", "192.0.2.2", Security(token=TOKEN))
        assert not caplog.text
        warn_if_exposed(log, "the worker", "192.0.2.2", Security())
    assert "the worker listens on 192.0.2.2 without an auth token: anyone who can " \
           "reach this port can run code on it" in caplog.text


# ---------------------------------------------------------------------------
# Every connection a node opens uses that node's settings (flags, not only env)


def env_without_security():
    return child_env({k: v for k, v in os.environ.items() if k not in sec._ENV_VARS})


@pytest.mark.processes
@pytest.mark.timeout(90)
@pytest.mark.parametrize("which", ["token", "tls"])
def test_nanny_uses_its_own_flags(which, request):
    """``dworker --auth-token`` / ``--tls-*`` with nothing in the environment:
    the nanny's heartbeats are accepted, so a worker holding the GIL longer
    than the heartbeat timeout is busy, not dead."""
    if which == "token":
        flags, security = ["--auth-token", TOKEN], Security(token=TOKEN)
    else:
        certs = request.getfixturevalue("certs")
        flags = ["--tls-cert", certs["ca"]["tls_cert"], "--tls-key",
                 certs["ca"]["tls_key"], "--tls-ca", certs["ca"]["tls_ca"]]
        security = Security(**certs["ca"])
    env = env_without_security()
    with dcenter(flags + ["--heartbeat-timeout", "2"], env=env) as center:
        address = wait_for_line(center, "Start center at").split()[-1]
        with dworker(address, flags + ["--ncores", "1"], env=env) as worker:
            wait_for_line(worker, "Registered with center", timeout=30)
            with Executor(address, security=security) as e:
                (worker_address,) = e.ncores()
                f = e.submit(hold_gil, 5, pure=False)
                t0 = time.time()
                while not f.done():
                    assert worker_address in e.ncores(), "busy worker removed as dead"
                    assert time.time() - t0 < 30
                    time.sleep(0.25)
                assert f.result() == 5
        lines = center.unread_lines()
    assert not [line for line in lines if "refused" in line or "closing connection" in line
                or "opened a TLS" in line or "no heartbeat" in line], lines


# ---------------------------------------------------------------------------
# What a peer sends cannot forge a log record


async def send_raw(address, data, linger=1.0):
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    try:
        await asyncio.wait_for(reader.read(), linger)
    except asyncio.TimeoutError:
        pass
    writer.close()


@pytest.mark.processes
def test_peer_text_is_escaped_in_the_log():
    forged = "\nFAKE RECORD 2026-01-01 distributed.center WARNING: all is well"
    env = {k: v for k, v in os.environ.items() if k not in sec._ENV_VARS}
    env["DISTRIBUTED_REFUSAL_LOG_INTERVAL"] = "0"  # log every refusal
    with dcenter(["--auth-token", TOKEN], env=env) as center:
        address = wait_for_line(center, "Start center at").split()[-1]
        # a refusal as the first message, and one instead of the proof
        run(send_raw(address, sec.refusal_message(forged)))
        run(send_raw(address, sec.hello_message(sec.new_nonce())
                     + sec.refusal_message(forged)))
        lines = collect_until(center, "refused connection from")
        lines += collect_until(center, "refused connection from")
        lines += center.unread_lines()
    # a cluster without a token trusts its peers, but its log is still one line
    # per record
    with dcenter([], env=env) as center:
        address = wait_for_line(center, "Start center at").split()[-1]

        async def died():
            with rpc(address, security=Security()) as r:
                await r.worker_died(address="127.0.0.1:1", cause=forged, timeout=10)

        run(died())
        lines += collect_until(center, "died")
        lines += center.unread_lines()
    assert not [line for line in lines if line.startswith("FAKE")], lines
    assert sum("\\nFAKE RECORD" in line for line in lines) >= 1, lines


def test_log_safe():
    from distributed.utils import log_safe

    assert log_safe("a\nb\r\x1b[31mc\u2028") == "a\\nb\\r\\x1b[31mc\\u2028"
    assert log_safe("plain 127.0.0.1:80") == "plain 127.0.0.1:80"
    assert len(log_safe("x" * 10_000)) < 250
    assert log_safe(b"\n") == "b'\\\\n'"

    class Hostile:
        def __str__(self):
            raise RuntimeError("no")

    assert "Hostile" in log_safe(Hostile())


# ---------------------------------------------------------------------------
# A cluster without a token says once that local users can run code on it


@pytest.mark.processes
def test_tokenless_cluster_prints_one_hint():
    env = {k: v for k, v in os.environ.items() if k not in sec._ENV_VARS}
    with dcenter([], env=env) as center:
        center_lines = collect_until(center, "Start center at")
        address = center_lines[-1].split()[-1]
        center_lines += center.unread_lines()
        with dworker(address, [], env=env) as worker:  # under a nanny
            worker_lines = collect_until(worker, "Registered with center")
            worker_lines += worker.unread_lines()
        with dworker(address, ["--no-nanny"], env=env) as worker:
            plain_worker_lines = collect_until(worker, "Registered with center")
            plain_worker_lines += worker.unread_lines()
    for lines in (center_lines, worker_lines, plain_worker_lines):
        hints = [line for line in lines if "without an auth token" in line]
        assert len(hints) == 1, lines
        assert "any user of this machine can run code" in hints[0]
        assert "--auth-token" in hints[0] and "DISTRIBUTED_AUTH_TOKEN" in hints[0]
    # with a token: no hint
    with dcenter(["--auth-token", TOKEN], env=env) as center:
        lines = collect_until(center, "Start center at") + center.unread_lines()
    assert not [line for line in lines if "without an auth token" in line], lines


@pytest.mark.processes
def test_local_cluster_prints_no_hint(capfd, monkeypatch):
    """``Executor()``'s local cluster has a token: none of its processes hints."""
    from distributed.local import LocalCluster

    for name in sec._ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    cluster = LocalCluster(n_workers=1, echo=True)  # echo: children's output is ours
    try:
        with Executor(cluster.center_address) as e:
            assert e.submit(inc, 1).result() == 2
    finally:
        cluster.close()
    out, err = capfd.readouterr()
    assert "Start center at" in out  # the children's output is seen here
    assert "without an auth token" not in out + err
