"""Hostile input, fuzzed: the pure protocol decoder, then a live cluster.

Two layers:

* **protocol** (no sockets): ``Decoder.feed`` and ``loads`` get random
  bytes, valid messages truncated, bit-flipped, spliced and cut into random
  chunks, random preludes (counts and lengths of 0, 2**62, 2**64-1, ...),
  valid framing around garbage msgpack headers, headers that claim the wrong
  number of frames, and garbage pickles.  ``ProtocolError`` (and its
  subclasses) is the only exception allowed; truncated valid input must wait,
  valid input in any chunking must decode exactly, nothing may take long, and
  an announced length is never allocated before its bytes arrive.
* **live**: raw TCP connections to the center and to both workers of a
  ``LocalCluster`` send malformed, truncated, oversized and nonsensical
  messages (after the auth handshake, when the cluster has a token; some
  connections skip or botch the handshake) while an ``Executor`` keeps
  computing; every result is checked, and at the end all three processes
  are alive, still serve and hold no more open files than before.

Garbage pickles can make CPython's unpickler allocate a huge memo (see
``test_pickle_memo_index_allocates``, an expected failure); the decoder fuzz
refuses those itself (``memo_bombs_refused``) and the live fuzz never sends
them.

Every case is generated from ``random.Random(SEED, case number)``, so a
failure names the case that reproduces it.  ``DISTRIBUTED_FUZZ_SEED``
changes the seed to explore further.  The 100,000-message versions are
marked ``slow`` (``pytest --runslow``).
"""

import asyncio
import math
import os
import pickle
import pickletools
import random
import re
import struct
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
import types
import warnings
from collections import Counter, namedtuple
from contextlib import contextmanager
from functools import lru_cache

import msgpack
import numpy as np
import psutil
import pytest

from distributed import core, protocol
from distributed.protocol import (
    DEFAULT_LIMITS,
    Decoder,
    DeserializationError,
    FrameTooLarge,
    Limits,
    ProtocolError,
    dumps,
    frames_to_bytes,
    loads,
    serialize,
)
from distributed.utils_test import add, authenticate, inc, read_handshake

SEED = int(os.environ.get("DISTRIBUTED_FUZZ_SEED", "20261127"))

U64 = struct.Struct("<Q")
SMALL_LIMITS = Limits(max_frames=8, max_frame_size=2**16, max_message_size=2**17)
SPECIAL_COUNTS = [0, 1, 2, 3, 4, 7, 255, 2**20, 2**20 + 1, 2**31, 2**32, 2**62,
                  2**63, 2**64 - 1]
SPECIAL_LENGTHS = [0, 1, 7, 8, 63, 2**16, 2**16 + 1, 2**17 + 1, 2**30, 2**36,
                   2**36 + 1, 2**62, 2**63, 2**64 - 1]
#: plain and not-so-plain values that like to break things
NASTY = [None, True, False, 0, 1, 2, 3, -1, 255, 2**32, 2**63 - 1, 2**64 - 1,
         -(2**63), 2**70, 1.5, -0.0, float("nan"), float("inf"), "", "op", "p", "d",
         "x", "v", "\udc80", "\x00", b"", b"\x00", b"\xff" * 9, [], {}, (), [1, 2],
         {"op": "x"}, {"d": {}}]


def case_rng(i, salt=0):
    """The generator of case ``i``: each case reproduces on its own."""
    return random.Random(SEED * 1_000_003 + salt * 7_919 + i)


# ---------------------------------------------------------------------------
# corpus of valid messages


def _offset_lambda():
    offset = 3
    return lambda x: x + offset


def _error_reply():
    def boom():
        raise ValueError("boom")

    try:
        boom()
    except ValueError as e:
        return core.error_message(e)


@lru_cache(maxsize=None)
def corpus():
    """``[(message, wire bytes, frames as bytes)]`` for a variety of messages:
    plain header only, pickle, out-of-band numpy buffers, large bytes frames,
    cloudpickled closures, tracebacks, lone surrogates."""
    messages = [
        {"op": "ping"},
        {"op": "identity", "reply": False, "close": True},
        {"op": "compute", "function": inc, "args": (1,), "key": "inc-1",
         "who_has": {"x": ["127.0.0.1:1"]}},
        {"op": "update_data", "data": {"x": np.arange(9000, dtype="f8")}, "report": True},
        {"op": "put", "big": bytes(range(256)) * 300, "small": b"abc"},
        {"op": "f", "function": _offset_lambda()},
        b"OK",
        12345,
        "text",
        None,
        2**70,
        -1.5,
        float("nan"),
        [1, (2, 3), {"a": [b"x"]}],
        (b"OK", {"nbytes": 8}),
        _error_reply(),
        {"op": "s", "s": {1, 2, 3}, 1: "non-str key"},
        np.arange(20, dtype="i4"),
        {"op": "surrogates \udc80", "v": "\ud800"},
    ]
    out = []
    for m in messages:
        frames = [bytes(f) for f in dumps(m)]
        out.append((m, frames_to_bytes(frames), frames))
    return out


@lru_cache(maxsize=None)
def valid_pickles():
    """``(payload, buffers, extra frames)`` of serialized objects, to mutate."""
    objs = [{"a": 1, "b": [1, 2.5, "x"]}, {"data": np.arange(9000, dtype="f8")},
            {"blob": b"z" * 70000}, {"f": inc, "g": _offset_lambda()}, [1, 2, 3],
            {"e": ValueError("x")}, {"t": (1, (2, (3,))), "s": frozenset({1})}]
    out = []
    for o in objs:
        payload, oob, extra = serialize(o)
        out.append((payload, [bytes(b) for b in oob], [bytes(b) for b in extra]))
    return out


def same(a, b):
    """Equality for decoded messages: arrays, nan, exceptions, functions."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if type(a) is float and math.isnan(a):
        return math.isnan(b)
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, BaseException):
        return a.args == b.args
    if isinstance(a, (types.FunctionType, types.TracebackType)):
        return True
    return a == b


# ---------------------------------------------------------------------------
# random pieces


def rand_key(rng):
    r = rng.random()
    if r < 0.6:
        return rng.choice(["d", "p", "x", "v", "op", "reply", "close", "status", "k"])
    if r < 0.8:
        return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(5)))
    if r < 0.9:
        return rng.randbytes(rng.randrange(4))  # bytes keys: msgpack allows them
    return rng.choice([1, -1, 2**40, 1.5, None, True])  # refused: strict_map_key


def rand_obj(rng, depth=0, packable=True):
    """A random value; ``packable``: only what msgpack can pack."""
    r = rng.random()
    if depth > 3 or r < 0.45:
        return rng.choice(NASTY)
    if r < 0.55:
        return rng.getrandbits(rng.choice([8, 32, 64])) - (1 << 7)
    if r < 0.62:
        return "".join(chr(rng.choice([rng.randrange(128), rng.randrange(0x110000)]))
                       for _ in range(rng.randrange(12)))
    if r < 0.68:
        return rng.randbytes(rng.randrange(40))
    if r < 0.8:
        return [rand_obj(rng, depth + 1, packable) for _ in range(rng.randrange(5))]
    if r < 0.92:
        return {rand_key(rng): rand_obj(rng, depth + 1, packable) for _ in range(rng.randrange(5))}
    if packable:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(14)))
    return rng.choice([{1, 2}, (1, rand_obj(rng, depth + 1, False)), frozenset(),
                       np.arange(rng.randrange(5)), complex(1, 2), Ellipsis])


def pack(obj):
    try:
        return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogatepass")
    except Exception:  # e.g. an int beyond 64 bits
        return msgpack.packb(None)


def rand_header(rng):
    """A msgpack header that looks more or less like ours."""
    if rng.random() < 0.3:
        return pack(rand_obj(rng))
    h = {}
    if rng.random() < 0.6:
        h["d"] = (rand_obj(rng) if rng.random() < 0.2 else
                  {"op": rng.choice(["ping", "identity", "x", ""]),
                   **{rand_key(rng): rand_obj(rng, 3) for _ in range(rng.randrange(3))}})
    if rng.random() < 0.6:
        h["p"] = rng.choice([rng.randrange(-2, 5), rng.choice(NASTY)])
    if rng.random() < 0.3:
        h["x"] = rng.choice([rng.randrange(-2, 4), rng.choice(NASTY)])
    if rng.random() < 0.3:
        h["v"] = rand_obj(rng)
    if rng.random() < 0.1:
        h[rand_key(rng)] = rand_obj(rng)
    return pack(h)


def mutate(rng, data, focus=64):
    """Bit flips, insertions, deletions, duplications; biased to the start."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        r = rng.random()
        if not data:
            data += rng.randbytes(rng.randrange(1, 9))
            continue
        pos = rng.randrange(min(len(data), focus)) if rng.random() < 0.6 else rng.randrange(len(data))
        if r < 0.5:
            data[pos] ^= 1 << rng.randrange(8)
        elif r < 0.65:
            data[pos:pos] = rng.randbytes(rng.randrange(1, 17))
        elif r < 0.8:
            del data[pos:pos + rng.randrange(1, 17)]
        elif r < 0.9:
            span = data[pos:pos + rng.randrange(1, 33)]
            data[pos:pos] = span
        else:
            data[pos] = rng.choice([0, 0xFF, 0x80, 0x7F, 0xC1])
    return bytes(data)


class _PidPickler(pickle.Pickler):
    """Pickles every bytes object as a persistent id of our choosing."""

    def __init__(self, file, pids):
        super().__init__(file, protocol=5)
        self.pids = iter(pids)

    def persistent_id(self, obj):
        if type(obj) is bytes:
            return next(self.pids)
        return None


def garbage_pickle(rng):
    """``(payload, buffers, extra)``: an invalid, truncated or surprising pickle."""
    r = rng.random()
    if r < 0.15:
        return rng.randbytes(rng.randrange(60)), [], []
    if r < 0.3:
        return b"\x80\x05" + rng.randbytes(rng.randrange(60)), [], []
    if r < 0.6:
        payload, oob, extra = rng.choice(valid_pickles())
        choice = rng.random()
        if choice < 0.5:
            payload = mutate(rng, payload, focus=len(payload))
        elif choice < 0.7:
            payload = payload[: rng.randrange(len(payload))]
        elif choice < 0.85:  # drop or add buffers: a wrong count
            oob = oob[1:] if oob else [b"x"]
        else:
            extra = extra[1:] if extra else [b"y" * rng.randrange(10)]
        return payload, oob, extra
    if r < 0.7:  # persistent ids pointing nowhere or of the wrong type
        import io

        f = io.BytesIO()
        pid = rng.choice([5, -1, 2**40, "x", (1, 2), 1.5, b"k"])
        _PidPickler(f, [pid] * 3).dump({"a": b"q", "b": [b"r"]})
        return f.getvalue(), [], rng.choice([[], [b"only"]])
    if r < 0.75:  # an out-of-band buffer that is not there
        return pickle.dumps(pickle.PickleBuffer(b"abc"), protocol=5,
                            buffer_callback=lambda b: False), [], []
    if r < 0.8:  # a length that CPython's unpickler tries to allocate
        op, fmt = rng.choice([(b"\x8e", "<Q"), (b"\x96", "<Q"), (b"\x8d", "<Q"),
                              (b"B", "<I"), (b"X", "<I")])
        n = rng.choice([2**31 - 1, 2**32 - 1, 2**34, 2**40, 2**62])
        n &= (1 << (8 * struct.calcsize(fmt))) - 1
        return b"\x80\x05" + op + struct.pack(fmt, n) + b"abc", [], []
    if r < 0.85:  # deep nesting
        depth = rng.choice([1000, 30_000])
        return b"\x80\x05" + b"]" * depth + b"a" * (depth - 1) + b".", [], []
    if r < 0.9:  # a module that does not exist
        return b"\x80\x05\x8c\x0fno_such_module_\x94\x8c\x01f\x94\x93\x94.", [], []
    # valid pickles of the wrong thing (a list in a dict message...)
    return pickle.dumps(rng.choice([[1], None, 5, "s", (1,), {1: 2}]), protocol=5), [], []


# ---------------------------------------------------------------------------
# protocol fuzz: cases


Case = namedtuple("Case", "kind data frames limits expect")
# data: the bytes to feed; frames: the frame list it encodes (or None)
# expect: None (only: ProtocolError or messages), ("wait", msgs, pending) or
#         ("messages", msgs)


def limits_for(rng):
    return SMALL_LIMITS if rng.random() < 0.25 else DEFAULT_LIMITS


def c_random_bytes(rng):
    n = rng.choice([rng.randrange(17), rng.randrange(300), rng.randrange(4096)])
    return Case("random-bytes", rng.randbytes(n), None, limits_for(rng), None)


def _concat(rng, k):
    items = [rng.choice(corpus()) for _ in range(k)]
    return items, b"".join(w for _, w, _ in items)


def c_truncated(rng):
    items, data = _concat(rng, rng.randint(1, 3))
    cut = rng.randrange(len(data))
    done, pos = [], 0
    for m, w, _ in items:
        if pos + len(w) > cut:
            break
        done.append(m)
        pos += len(w)
    return Case("truncated", data[:cut], None, DEFAULT_LIMITS, ("wait", done, cut - pos))


def c_valid(rng):
    items, data = _concat(rng, rng.randint(1, 4))
    return Case("valid-chunked", data, None, DEFAULT_LIMITS,
                ("messages", [m for m, _, _ in items]))


def c_mutated(rng):
    _, wire, _ = rng.choice(corpus())
    return Case("mutated", mutate(rng, wire, focus=rng.choice([16, 64, len(wire)])),
                None, limits_for(rng), None)


def c_prelude_overwrite(rng):
    _, wire, frames = rng.choice(corpus())
    i = rng.randrange(len(frames) + 1)
    value = rng.choice(SPECIAL_COUNTS + SPECIAL_LENGTHS + [rng.getrandbits(64)])
    if rng.random() < 0.3:
        value = max(0, U64.unpack_from(wire, 8 * i)[0] + rng.randint(-3, 3))
    data = wire[: 8 * i] + U64.pack(value) + wire[8 * i + 8:]
    return Case("prelude-overwrite", data, None, limits_for(rng), None)


def c_splice(rng):
    (_, a, _), (_, b, _) = rng.choice(corpus()), rng.choice(corpus())
    data = a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1):]
    return Case("splice", data, None, limits_for(rng), None)


def c_random_prelude(rng):
    count = rng.choice(SPECIAL_COUNTS + [rng.randrange(1, 20)] * 6 + [rng.getrandbits(64)])
    lengths = [rng.choice(SPECIAL_LENGTHS + [rng.randrange(100)] * 6 + [rng.getrandbits(64)])
               for _ in range(min(count, rng.randrange(9)))]
    data = (U64.pack(count) + b"".join(map(U64.pack, lengths))
            + rng.randbytes(rng.randrange(200)))
    return Case("random-prelude", data, None, limits_for(rng), None)


def c_garbage_header(rng):
    r = rng.random()
    if r < 0.45:
        header = rng.randbytes(rng.randrange(40))
    elif r < 0.55:  # ext type -1 (msgpack timestamps) of a wrong or odd size
        header = b"\x81\xa1d" + rng.choice([b"\xd4", b"\xd5", b"\xd6", b"\xd7", b"\xd8"]) \
            + b"\xff" + rng.randbytes(rng.randrange(20))
    else:  # msgpack-looking: a map/array/str marker and random rest
        header = bytes([rng.choice([0x80, 0x81, 0x82, 0x8F, 0x91, 0xDC, 0xDE, 0xDF,
                                    0xA1, 0xD9, 0xC4, 0xC7, 0xD4])]) + rng.randbytes(rng.randrange(20))
    frames = [header] + [rng.randbytes(rng.randrange(30)) for _ in range(rng.randrange(3))]
    return Case("garbage-header", frames_to_bytes(frames), frames, limits_for(rng), None)


def c_wrong_header(rng):
    """Valid msgpack, wrong shape, and frame counts that may not match."""
    header = rand_header(rng)
    n = rng.randrange(5)
    frames = [header] + [rng.choice([rng.randbytes(rng.randrange(30)),
                                     pickle.dumps({"k": 1}), pickle.dumps([1])])
                         for _ in range(n)]
    return Case("wrong-header", frames_to_bytes(frames), frames, limits_for(rng), None)


def c_garbage_pickle(rng):
    payload, oob, extra = garbage_pickle(rng)
    header = {"p": len(oob)}
    if extra:
        header["x"] = len(extra)
    if rng.random() < 0.6:
        header["d"] = {"op": "x", "reply": rng.choice([True, False])}
    if rng.random() < 0.1:  # and a count that does not match
        header["p"] += rng.choice([-1, 1, 2**62])
    frames = [pack(header), payload] + oob + extra
    return Case("garbage-pickle", frames_to_bytes(frames), frames, DEFAULT_LIMITS, None)


def c_frames_mutated(rng):
    """A valid message with one frame changed, dropped, duplicated or swapped."""
    _, _, frames = rng.choice(corpus())
    frames = list(frames)
    r = rng.random()
    i = rng.randrange(len(frames))
    if r < 0.4:
        frames[i] = mutate(rng, frames[i], focus=len(frames[i]))
    elif r < 0.6:
        del frames[i]
    elif r < 0.7:
        frames.insert(i, frames[i])
    elif r < 0.8:
        j = rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    else:
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    return Case("frames-mutated", frames_to_bytes(frames), frames, DEFAULT_LIMITS, None)


GENERATORS = [
    (c_random_bytes, 12), (c_truncated, 8), (c_valid, 4), (c_mutated, 16),
    (c_prelude_overwrite, 8), (c_splice, 6), (c_random_prelude, 12),
    (c_garbage_header, 8), (c_wrong_header, 12), (c_garbage_pickle, 10),
    (c_frames_mutated, 8),
]
_GEN_FUNCS = [g for g, _ in GENERATORS]
_GEN_WEIGHTS = [w for _, w in GENERATORS]


def make_case(i):
    rng = case_rng(i)
    (gen,) = rng.choices(_GEN_FUNCS, _GEN_WEIGHTS)
    return gen(rng), rng


# ---------------------------------------------------------------------------
# protocol fuzz: running them


def chunks_of(rng, data):
    if not data or rng.random() < 0.4:
        return [data]
    if rng.random() < 0.05 and len(data) < 2000:
        return [data[i:i + 1] for i in range(len(data))]  # byte by byte
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(1, 6)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def feed_all(decoder, chunks):
    """``(messages, error)``: only a ProtocolError may come out."""
    out = []
    try:
        for c in chunks:
            out.extend(decoder.feed(c))
    except ProtocolError as e:
        return out, e
    return out, None


class FuzzFailure(AssertionError):
    pass


def check_case(case, rng, stats):
    d = Decoder(case.limits)
    out, err = feed_all(d, chunks_of(rng, case.data))
    stats[case.kind, "error" if err else ("message" if out else "wait")] += 1
    if err is not None:
        stats["reason", re.sub(r"\d+", "N", str(err).split(":")[0])] += 1
    if case.expect is not None:
        what = case.expect[0]
        if err is not None:
            raise FuzzFailure("%s input refused: %r" % (what, err))
        if len(out) != len(case.expect[1]) or not all(map(same, out, case.expect[1])):
            raise FuzzFailure("decoded %r, expected %r" % (out, case.expect[1]))
        expected_pending = case.expect[2] if what == "wait" else 0
        if d.pending != expected_pending:
            raise FuzzFailure("pending %d, expected %d" % (d.pending, expected_pending))
    elif rng.random() < 0.3:
        # chunking does not matter: the same outcome fed at once
        out2, err2 = feed_all(Decoder(case.limits), [case.data])
        if type(err2) is not type(err):
            raise FuzzFailure("fed at once: %r; in chunks: %r" % (err2, err))
        if err is None and (len(out2) != len(out)):
            raise FuzzFailure("fed at once: %d messages; in chunks: %d" % (len(out2), len(out)))
    if case.frames is not None:
        # loads on the frames agrees with the decoder on their bytes
        try:
            loads(case.frames)
            direct = None
        except ProtocolError as e:
            direct = e
        if (direct is None) != (err is None):
            raise FuzzFailure("loads(frames) -> %r but Decoder -> %r" % (direct, err))
    if err is not None and rng.random() < 0.2:
        # the decoder is to be discarded now; fed again anyway (with the
        # exception still alive), it may only refuse or wait
        feed_all(d, [rng.randbytes(rng.randrange(64))])
    del err


#: memo indices beyond this make CPython's unpickler allocate (see
#: test_pickle_memo_index_allocates)
MEMO_LIMIT = 2**16


def memo_bomb(payload):
    """Does this pickle PUT into a huge memo index?"""
    if not (b"p" in payload or b"q" in payload or b"r" in payload):
        return False  # no PUT, BINPUT or LONG_BINPUT opcode (and no need to parse)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # escape sequences in garbage strings
            for op, arg, _ in pickletools.genops(payload):
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > MEMO_LIMIT:
                    return True
    except Exception:  # not a pickle, or cut short: the unpickler stops there too
        pass
    return False


@contextmanager
def memo_bombs_refused(stats):
    """Refuse (as an unloadable pickle) what would allocate a huge memo.

    That is the unpickler's doing, not the framing's, and no check on the
    bytes can stop it short of parsing every pickle; only authentication
    keeps such peers out.  Counted in ``stats['memo-bomb']``.
    """
    deserialize = protocol.deserialize

    def guarded(payload, buffers=(), byte_frames=()):
        if memo_bomb(payload):
            stats["memo-bomb"] += 1
            raise pickle.UnpicklingError("memo index beyond %d (refused by the test)" % MEMO_LIMIT)
        return deserialize(payload, buffers, byte_frames)

    protocol.deserialize = guarded
    try:
        yield
    finally:
        protocol.deserialize = deserialize


def run_protocol_fuzz(n, start=0):
    stats = Counter()
    failures = []
    slowest = (0.0, None)
    t0 = time.perf_counter()
    for i in range(start, start + n):
        case, rng = make_case(i)
        t = time.perf_counter()
        try:
            with memo_bombs_refused(stats):
                check_case(case, rng, stats)
        except FuzzFailure as e:
            failures.append("case %d (%s, seed %d): %s; input %r"
                            % (i, case.kind, SEED, e, case.data[:80]))
        except Exception as e:  # anything but a ProtocolError is a bug
            failures.append("case %d (%s, seed %d): %s: %s; input %r"
                            % (i, case.kind, SEED, type(e).__name__, e, case.data[:80]))
        elapsed = time.perf_counter() - t
        if elapsed > slowest[0]:
            slowest = (elapsed, i)
        if elapsed > 0.1:
            stats["slow", "%d:%s:%.2fs" % (i, case.kind, elapsed)] += 1
        if len(failures) >= 20:
            break
    total = time.perf_counter() - t0
    return stats, failures, slowest, total


def report(stats, slowest, total, n):
    kinds = sorted({k[0] for k in stats if type(k) is tuple and k[0] not in ("reason", "slow")})
    lines = ["%d cases in %.1f s, slowest %.3f s (case %s), %d memo bombs refused"
             % (n, total, *slowest, stats["memo-bomb"])]
    for k in kinds:
        lines.append("  %-18s error %6d  wait %6d  message %6d" % (
            k, stats[k, "error"], stats[k, "wait"], stats[k, "message"]))
    return "\n".join(lines)


def _protocol_fuzz(n):
    stats, failures, slowest, total = run_protocol_fuzz(n)
    print(report(stats, slowest, total, n))
    assert not failures, "\n".join(failures)
    assert slowest[0] < 2.0, "case %s took %.2f s" % (slowest[1], slowest[0])
    # the fuzz reaches every layer: framing, header and pickle errors, waits
    # and successfully decoded messages
    for kind, _ in GENERATORS:
        name = kind(case_rng(0)).kind
        assert stats[name, "error"] + stats[name, "wait"] + stats[name, "message"] > 0
    reasons = {k[1] for k in stats if type(k) is tuple and k[0] == "reason"}
    for expected in ["a message needs at least one frame", "peer announced",
                     "undecodable message header", "message header is not a map",
                     "frame count does not match the message header",
                     "could not unpickle the message",
                     "pickled part of a dict message is not a dict",
                     "unexpected frames after a plain message"]:
        assert any(r.startswith(expected[:40]) for r in reasons), (expected, reasons)
    outcomes = Counter()
    for k, v in stats.items():
        if type(k) is tuple and k[0] not in ("reason", "slow"):
            outcomes[k[1]] += v
    assert outcomes["wait"] > n // 20 and outcomes["message"] > n // 20, outcomes


def test_protocol_fuzz():
    """10,000 hostile inputs for the decoder (the default run)."""
    _protocol_fuzz(10_000)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_protocol_fuzz_100k():
    _protocol_fuzz(100_000)


def test_fuzz_cases_are_reproducible():
    for i in [0, 1, 17, 12345]:
        a, _ = make_case(i)
        b, _ = make_case(i)
        assert a.kind == b.kind and a.data == b.data


def test_announced_sizes_are_not_allocated():
    """Random preludes announcing up to 2**64-1 bytes or frames: the decoder
    refuses or waits, and never allocates what was announced."""
    rng = random.Random(SEED)
    cases = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            count = rng.choice([1, 2, 3, 2**20, 2**20 + 1, 2**40, 2**62, 2**64 - 1])
            lengths = [rng.choice([0, 10, 2**30, 2**35, 2**36, 2**36 + 1, 2**62, 2**64 - 1])
                       for _ in range(min(count, rng.randint(1, 4)))]
            data = U64.pack(count) + b"".join(map(U64.pack, lengths)) + rng.randbytes(50)
            d = Decoder()
            for chunk in chunks_of(rng, data):
                try:
                    assert d.feed(chunk) == []
                except FrameTooLarge:
                    break
                except ProtocolError:
                    break
            cases += 1
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert cases == 3000
    assert peak < 2**20, "%d bytes allocated for announced sizes" % peak


def test_full_prelude_of_max_frames():
    """The largest allowed count with its whole prelude (8 MiB of lengths):
    refused or decoded quickly, not stuck."""
    n = DEFAULT_LIMITS.max_frames
    for lengths, tail in [(bytes(8 * n), b""), (U64.pack(2**62) * n, b"")]:
        t = time.perf_counter()
        with pytest.raises(ProtocolError):
            Decoder().feed(U64.pack(n) + lengths + tail)
        assert time.perf_counter() - t < 5


def test_decoder_refed_after_error_raises_only_protocol_errors():
    """After a ProtocolError, feeding the same decoder again (while the
    exception is still referenced, as a logger or test would keep it) must
    not raise BufferError."""
    for bad in [U64.pack(1) + U64.pack(2**62),
                U64.pack(2) + U64.pack(10) + U64.pack(2**63),
                U64.pack(3) + U64.pack(2**36) * 3]:
        d = Decoder()
        with pytest.raises(FrameTooLarge) as info:
            d.feed(bad)
        with pytest.raises(ProtocolError):
            d.feed(b"more")
        assert info.value is not None


def test_decoder_stays_in_step_after_unloadable_pickle():
    """A well framed message whose pickle does not load raises
    DeserializationError, and the next message on the same decoder decodes:
    the connection stays in step, as the server's does."""
    bad = frames_to_bytes([pack({"d": {"op": "x"}, "p": 0}), b"\x80\x05garbage"])
    good = frames_to_bytes(dumps({"op": "ping"}))
    d = Decoder()
    with pytest.raises(DeserializationError) as info:
        d.feed(bad + good[:5])
    assert info.value.header == {"op": "x"}
    assert d.feed(good[5:]) == [{"op": "ping"}]
    assert d.pending == 0


@pytest.mark.processes
@pytest.mark.xfail(strict=True, reason=(
    "CPython's C unpickler grows its memo to any index a PUT/BINPUT/LONG_BINPUT "
    "names: a 37-byte message (LONG_BINPUT 2**25) makes the receiver allocate "
    "512 MiB, 2**30 makes it 16 GiB and ~40 s of CPU. protocol.loads unpickles "
    "every well-framed message; only authentication (or a pickle opcode scan) "
    "keeps this out"))
def test_pickle_memo_index_allocates():
    code = "\n".join([
        "import struct, tracemalloc, msgpack",
        "from distributed.protocol import Decoder, ProtocolError, frames_to_bytes",
        "payload = b'\\x80\\x05Nr' + struct.pack('<I', 2**25) + b'.'",
        "wire = frames_to_bytes([msgpack.packb({'p': 0}), payload])",
        "assert len(wire) == 37",
        # what is allocated, not the RSS: the kernel may never back the
        # untouched pages of the memo (the RSS test passed now and then)
        "tracemalloc.start()",
        "try:",
        "    Decoder().feed(wire)",
        "except ProtocolError:",
        "    pass",
        "print(tracemalloc.get_traced_memory()[1] // 2**20)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    assert grown < 64, "a 37-byte message made the decoder allocate %d MiB" % grown


# ---------------------------------------------------------------------------
# live fuzz: raw connections to a LocalCluster while an Executor computes


@contextmanager
def fuzz_cluster():
    """A LocalCluster of 2 single-threaded workers and an Executor on it.

    Dead workers are not replaced: a crash must show, not be repaired.
    """
    from distributed.executor import Executor
    from distributed.local import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, timeout=60,
                           restart_dead_workers=False)
    e = None
    try:
        e = Executor(cluster.center_address, timeout=30)
        yield cluster, e
    finally:
        if e is not None:
            try:
                e.shutdown()
            except Exception:
                pass
        cluster.close()


class Churn(threading.Thread):
    """Keeps an executor computing, and checks every result, until stopped."""

    def __init__(self, e, batch=40):
        super().__init__(daemon=True, name="fuzz-churn")
        self.e = e
        self.batch = batch
        self.stopping = threading.Event()
        self.rounds = 0
        self.tasks = 0
        self.error = None

    def run(self):
        e, n = self.e, self.batch
        try:
            while not self.stopping.is_set():
                base = 1_000_000 + self.rounds * n  # new keys every round
                futures = e.map(inc, range(base, base + n))
                total = e.submit(add, futures[0], futures[-1])
                single = e.submit(inc, self.rounds, pure=False)
                results = e.sync(e._gather, futures, timeout=120)
                assert results == list(range(base + 1, base + n + 1)), results
                assert total.result(timeout=120) == 2 * base + n + 1
                assert single.result(timeout=120) == self.rounds + 1
                del futures, total, single
                self.rounds += 1
                self.tasks += n + 2
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self, timeout=180):
        self.stopping.set()
        self.join(timeout)
        assert not self.is_alive(), "the executor's computations hang"
        if self.error is not None:
            raise self.error


def _split(address):
    host, port = address.rsplit(":", 1)
    return host, int(port)


# operations whose bad arguments are sent; never terminate, restart,
# register or a valid broadcast/unregister/update_data (those are legitimate
# requests that change the cluster, not malformed ones)
CENTER_OPS = {
    "who_has": ["keys"], "has_what": ["addresses", "keys"], "ncores": ["addresses"],
    "nbytes": ["keys"], "heartbeat": ["address", "now"], "add_keys": ["address", "keys", "nbytes"],
    "remove_keys": ["address", "keys"], "unregister": ["address"],
    "delete_data": ["keys"], "broadcast": ["msg", "workers"], "worker-stream": ["address"],
    "register-client": ["client"], "processing": [], "task_states": ["keys"],
    "identity": [], "ping": [],
}
WORKER_OPS = {
    "get_data": ["keys"], "keys": [], "health": [], "delete_data": ["keys", "report"],
    "compute": ["function", "key", "args", "kwargs", "keys", "needed", "who_has"],
    "run": ["function", "args", "kwargs"], "gather": ["who_has"],
    "update_data": ["data", "report"], "upload_file": ["filename", "data", "load"],
    "identity": [], "ping": [],
}
VALID = {
    "center": [{"op": "identity"}, {"op": "ncores"}, {"op": "who_has", "keys": ["nope"]},
               {"op": "has_what"}, {"op": "nbytes", "keys": []}, {"op": "processing"},
               {"op": "task_states", "keys": ["nope"]}],
    "worker": [{"op": "identity"}, {"op": "keys"}, {"op": "health"},
               {"op": "get_data", "keys": ["nope"]}],
}
PING = frames_to_bytes(dumps({"op": "ping"}))
RESERVED = ("op", "close", "reply")


def sanitize(op, kwargs, real):
    """Keep a bad argument from being a good, cluster-changing one."""
    for name in ("address", "workers"):
        if name in kwargs:
            try:
                if core.coerce_to_address(kwargs[name]) in real:
                    kwargs[name] = 5
            except Exception:
                pass
    if op == "register-client":
        kwargs["client"] = None
    if op == "broadcast" and type(kwargs.get("msg")) is dict:
        kwargs["msg"] = list(kwargs["msg"].items())
    if op == "gather" and type(kwargs.get("who_has")) is dict:
        kwargs["who_has"] = 5
    if op == "update_data" and type(kwargs.get("data")) is dict:
        kwargs["data"] = list(kwargs["data"].items()) or 5
    if op == "upload_file" and isinstance(kwargs.get("filename"), str):
        kwargs["filename"] = "../" + kwargs["filename"]  # never a plain file name
    if op in ("compute", "run") and callable(kwargs.get("function")):
        kwargs["function"] = None
    return kwargs


def rand_kwargs(rng, names=()):
    kwargs = {}
    for name in names:
        if rng.random() < 0.7:
            kwargs[name] = rand_obj(rng, packable=False)
    for _ in range(rng.randrange(3) if rng.random() < 0.3 else 0):
        name = rng.choice(["x", "keys", "who_has", "data", "junk", "\udc80", "", "a" * 300])
        kwargs[name] = rand_obj(rng, packable=False)
    for r in RESERVED:
        kwargs.pop(r, None)
    return kwargs


def bad_pickle_message(rng, kind):
    """A well-framed request whose pickle does not load: the server answers
    with an error and keeps the connection.  Checked here first."""
    for _ in range(10):
        payload, oob, extra = garbage_pickle(rng)
        if memo_bomb(payload):
            continue
        d = {"op": rng.choice(["identity", "nope", "ping", "who_has"])}
        if rng.random() < 0.2:
            d["reply"] = False
        header = {"d": d, "p": len(oob)}
        if extra:
            header["x"] = len(extra)
        frames = [pack(header), payload] + oob + extra
        try:
            loads(frames)
        except DeserializationError:
            return frames_to_bytes(frames), 0 if d.get("reply") is False else 1
        except ProtocolError:
            continue
    return frames_to_bytes(dumps({"op": "nope"})), 1


def in_step_message(rng, kind, real):
    """``(bytes, replies expected, label)``: malformed, but well framed."""
    r = rng.random()
    if r < 0.2:
        op = rng.choice([rng.choice(NASTY), "".join(rng.choice("abcdefgh-_") for _ in range(6)),
                         rand_obj(rng, packable=False), "terminate " * 3, b"ping"])
        msg, label = {"op": op, **rand_kwargs(rng)}, "unknown-op"
    elif r < 0.55:
        ops = CENTER_OPS if kind == "center" else WORKER_OPS
        op = rng.choice(sorted(ops))
        kwargs = sanitize(op, rand_kwargs(rng, ops[op]), real)
        if op == "ping" and not kwargs:
            kwargs = {"junk": 1}
        msg, label = {"op": op, **kwargs}, "bad-args"
    elif r < 0.65:
        msg = rand_obj(rng, packable=False)
        if type(msg) is dict:
            msg = list(msg.items())
        label = "non-dict"
    elif r < 0.7:
        msg = {k: v for k, v in rand_kwargs(rng, ["x", "keys"]).items()}
        label = "no-op"
    elif r < 0.77:
        msg, label = dict(rng.choice(VALID[kind])), "valid"
    elif r < 0.82:
        msg = {"op": rng.choice(["nope", "identity", "ping", rng.choice(NASTY)]),
               "reply": False, **rand_kwargs(rng)}
        return frames_to_bytes(dumps(msg)), 0, "no-reply"
    else:
        data, replies = bad_pickle_message(rng, kind)
        return data, replies, "bad-pickle"
    return frames_to_bytes(dumps(msg)), 1, label


def terminator(rng):
    """``(label, bytes, expect)``: what ends a connection; ``expect`` is
    'closed' (the server must hang up), 'pong-closed' or 'hangup' (we do)."""
    r = rng.random()
    if r < 0.15:
        data = rng.randbytes(rng.randrange(8, 300))
        label = "random-bytes"
    elif r < 0.3:
        data = (U64.pack(rng.randint(1, 3))
                + U64.pack(rng.choice([2**36 + 1, 2**40, 2**62, 2**63, 2**64 - 1]))
                + rng.randbytes(rng.randrange(40)))
        label = "oversized-length"
    elif r < 0.4:
        data = U64.pack(rng.choice([2**20 + 1, 2**32, 2**62, 2**64 - 1])) + rng.randbytes(16)
        label = "huge-count"
    elif r < 0.45:
        data, label = U64.pack(0) + rng.randbytes(rng.randrange(20)), "zero-count"
    elif r < 0.55:
        data = c_garbage_header(rng).data
        label = "garbage-header"
    elif r < 0.65:
        data = c_wrong_header(rng).data
        label = "wrong-header"
    elif r < 0.7:
        data = frames_to_bytes([pack({"d": {"op": "ping"}, "p": 0}),
                                pickle.dumps([1, 2], protocol=5)])
        label = "not-a-dict-pickle"
    elif r < 0.85:
        _, wire, _ = rng.choice(corpus())
        return "half-frame", wire[: rng.randrange(1, len(wire))], "hangup"
    elif r < 0.92:
        data = U64.pack(2) + U64.pack(20) + U64.pack(2**30) + rng.randbytes(30)
        return "announce-1GiB", data, "hangup"
    else:
        return "close-true", frames_to_bytes(dumps({"op": "ping", "close": True})), "pong-closed"
    # what the decoder here says decides what the server must do
    bombs = Counter()
    try:
        with memo_bombs_refused(bombs):
            Decoder().feed(data)
    except DeserializationError:
        if bombs:  # never sent
            return "zero-count", U64.pack(0), "closed"
        return label, data, "hangup"  # answered, then it waits: ours to close
    except ProtocolError:
        return label, data, "closed"
    return label, data, "hangup"  # it waits for more (or, rarely, was valid)


async def read_messages(reader, n, timeout=30):
    d = Decoder()
    out = []
    while len(out) < n:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            raise EOFError("connection closed after %d of %d replies" % (len(out), n))
        out.extend(d.feed(chunk))
    return out, d


async def read_to_eof(reader, timeout=15):
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not chunk:
            return data
        data += chunk


async def unauthenticated_session(rng, addr, stats, token):
    """A peer without the token: refused before any message is read."""
    from distributed import security as sec

    reader, writer = await asyncio.open_connection(*_split(addr))
    try:
        r = rng.random()
        if r < 0.3:
            label = "no-handshake-request"
            writer.write(frames_to_bytes(dumps({"op": rng.choice(["ping", "terminate",
                                                                  "identity"])})))
        elif r < 0.5:
            label = "no-handshake-garbage"
            writer.write(b"\x00" + rng.randbytes(rng.randrange(8, 100)))
        elif r < 0.7:
            label = "wrong-proof"
            nonce = sec.new_nonce()
            writer.write(sec.hello_message(nonce))
            kind, body = await read_handshake(reader)
            writer.write(sec.proof_message(token + "x", nonce, body[:sec.NONCE_SIZE]))
        elif r < 0.85:
            label = "mutated-hello"
            writer.write(mutate(rng, sec.hello_message(sec.new_nonce()), focus=8))
            stats["messages"] += 1
            stats["unauth", label] += 1
            return  # and hang up: the server may be waiting for more
        else:
            label = "hello-then-hangup"
            writer.write(sec.hello_message(sec.new_nonce())[: rng.randrange(1, 40)])
            stats["messages"] += 1
            stats["unauth", label] += 1
            return
        await writer.drain()
        rest = await read_to_eof(reader)
        stats["messages"] += 1
        stats["unauth", label] += 1
        # all it may get is a refusal: a handshake refusal or an error reply
        if label == "wrong-proof":
            assert rest[:sec.HEADER_SIZE - 3] == sec.MAGIC or rest == b"", rest[:80]
        elif rest:
            reply = Decoder().feed(rest)
            assert len(reply) == 1 and core.is_error_message(reply[0]), reply
            assert "auth" in str(reply[0]["exception"]), reply
    finally:
        writer.transport.abort()


async def session(rng, kind, addr, stats, real, token):
    """One connection: malformed requests answered in order, then maybe a
    terminator that ends it."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*_split(addr)), 10)
    try:
        if token is not None:
            await asyncio.wait_for(authenticate(reader, writer, token), 10)
        wire, expected, labels = bytearray(), 0, Counter()
        n = rng.randrange(0, 41)
        for _ in range(n):
            data, replies, label = in_step_message(rng, kind, real)
            wire += data
            expected += replies
            labels[label] += 1
        wire += PING
        for chunk in chunks_of(rng, bytes(wire)):
            writer.write(chunk)
            await writer.drain()
        replies, d = await read_messages(reader, expected + 1)
        assert len(replies) == expected + 1 and d.pending == 0, (len(replies), expected)
        pongs = [type(r) is bytes and r == b"pong" for r in replies]
        assert pongs[-1] and not any(pongs[:-1]), "replies out of step: %r" % replies
        stats["messages"] += n + 1
        stats["error-replies"] += sum(map(core.is_error_message, replies))
        for label, count in labels.items():
            stats["sent", label] += count
        if rng.random() < 0.5:
            return
        label, data, expect = terminator(rng)
        writer.write(data)
        await writer.drain()
        stats["messages"] += 1
        stats["terminator", label] += 1
        if expect == "closed":
            rest = await read_to_eof(reader)
            assert rest == b"", "%s: the server answered %r" % (label, rest[:100])
        elif expect == "pong-closed":
            rest = await read_to_eof(reader)
            assert Decoder().feed(rest) == [b"pong"], rest
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()
        else:
            writer.close()


def live_fuzz(cluster, n_messages, concurrency=12, timeout=900):
    """Send ``n_messages`` hostile messages to the center and the workers."""
    token = getattr(getattr(cluster, "security", None), "token", None)
    center = cluster.center_address
    workers = [p.address for p in cluster.workers]
    real = set([center] + workers)
    stats, failures = Counter(), []

    async def main():
        counter = iter(range(10**9))
        stalled = []
        for addr in [center] + workers:  # peers that stop half-way for the whole run
            for j in range(3):
                reader, writer = await asyncio.open_connection(*_split(addr))
                if token is not None and j:
                    await authenticate(reader, writer, token)
                writer.write(PING[: 5 + 7 * j])
                stalled.append(writer)

        async def loop():
            while stats["messages"] < n_messages and len(failures) < 20:
                i = next(counter)
                rng = case_rng(i, salt=1)
                addr = center if rng.random() < 0.5 else rng.choice(workers)
                kind = "center" if addr == center else "worker"
                try:
                    if token is not None and rng.random() < 0.1:
                        await asyncio.wait_for(
                            unauthenticated_session(rng, addr, stats, token), 60)
                    else:
                        await asyncio.wait_for(
                            session(rng, kind, addr, stats, real, token), 60)
                except Exception as e:
                    where = traceback.extract_tb(e.__traceback__)[-1]
                    failures.append("session %d (seed %d) to the %s at %s: %s: %s (%s:%d)"
                                    % (i, SEED, kind, addr, type(e).__name__, e,
                                       os.path.basename(where.filename), where.lineno))

        await asyncio.gather(*[loop() for _ in range(concurrency)])
        for writer in stalled:
            writer.transport.abort()

    asyncio.run(asyncio.wait_for(main(), timeout))
    return stats, failures


def process_fds(pid):
    try:
        return psutil.Process(pid).num_fds()
    except psutil.Error:
        return None


#: CPython 3.11's PyByteArray_FromStringAndSize frees a bytearray it could not
#: allocate before setting ob_exports, and bytearray_dealloc then prints this
#: (harmless) complaint: a pickle's BYTEARRAY8 of 2**60 bytes is enough
CPYTHON_NOISE = "SystemError: deallocated bytearray object has exported buffers"


def unexpected_log_lines(process):
    """Tracebacks and unhandled-exception reports in a node's output."""
    markers = ("Traceback", "Exception in callback", "Task exception was never retrieved",
               "Unhandled", "Error in", "SystemError")
    return [line.rstrip() for line in process.output
            if any(m in line for m in markers) and CPYTHON_NOISE not in line]


def _live_fuzz(n_messages):
    with fuzz_cluster() as (cluster, e):
        procs = [cluster.center] + list(cluster.workers)
        workers = sorted(p.address for p in cluster.workers)
        assert sorted(e.ncores()) == workers
        # warm up, then the baseline of open files of every node
        assert e.gather(e.map(inc, range(100))) == list(range(1, 101))
        fds_before = [process_fds(p.pid) for p in procs]

        churn = Churn(e)
        churn.start()
        t = time.time()
        try:
            stats, failures = live_fuzz(cluster, n_messages)
        finally:
            churn.stop()
        elapsed = time.time() - t
        print("\n%d messages in %.1f s (%d error replies) while %d tasks ran in %d rounds"
              % (stats["messages"], elapsed, stats["error-replies"], churn.tasks, churn.rounds))
        for key in sorted(k for k in stats if type(k) is tuple):
            print("  %-40s %d" % (" ".join(map(str, key)), stats[key]))
        assert not failures, "\n".join(failures)
        assert stats["messages"] >= n_messages
        assert churn.rounds >= 3, churn.rounds

        # every node is alive, no worker was lost, and all still compute
        assert [p.poll() for p in procs] == [None] * len(procs)
        assert not cluster.deaths
        assert sorted(e.ncores()) == workers
        futures = e.map(inc, range(1000))
        assert e.sync(e._gather, futures, timeout=60) == list(range(1, 1001))
        assert e.submit(add, futures[0], futures[-1]).result(timeout=60) == 1001

        # the fuzz connections are gone on the nodes' side too
        deadline = time.time() + 30
        while True:
            fds = [process_fds(p.pid) for p in procs]
            if all(a <= b + 10 for a, b in zip(fds, fds_before)) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert all(a <= b + 10 for a, b in zip(fds, fds_before)), (fds_before, fds)
        logs = {"%s (pid %d)" % (p.args[2], p.pid): unexpected_log_lines(p) for p in procs}
        return logs


@pytest.mark.processes
def test_live_fuzz():
    """~5,000 hostile messages to a live cluster while it computes."""
    logs = _live_fuzz(5_000)
    assert not any(logs.values()), logs


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_live_fuzz_100k():
    logs = _live_fuzz(100_000)
    assert not any(logs.values()), logs
