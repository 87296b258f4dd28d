"""Peer transfer: fetching values from the workers that hold them.

::

    result = yield gather_from_workers({'x': ['127.0.0.1:40001']}, rpc_for)
    result.data            # {'x': 1}
    result.missing         # keys no reachable holder had
    result.bad             # addresses that could not be reached
    result.errors          # {key: exception} of holders that answered with an error

Used by the worker (inputs of its tasks, the ``gather`` rpc) and by the
executor (``gather`` of results).  A worker shares the transfers under way
between its tasks with :class:`Transfers`: two tasks needing the same input
wait for one transfer.
"""

import asyncio
import logging
import random
from collections import defaultdict, namedtuple

from tornado import gen
from tornado.iostream import StreamClosedError

# the worker's logger: "could not fetch ..." lines keep the name they always had
logger = logging.getLogger("distributed.worker")

#: seconds allowed for one transfer from a peer
TRANSFER_TIMEOUT = 300

#: a peer failing with one of these is gone (or unreachable): ask another
CONNECTION_ERRORS = (OSError, StreamClosedError, TimeoutError)


def _first_bytes(keys, nbytes, max_bytes):
    """The first of ``keys`` that add up to at most ``max_bytes`` (one at least).

    >>> _first_bytes(['a', 'b', 'c'], {'a': 4, 'b': 4, 'c': 4}, 8)
    ['a', 'b']
    >>> _first_bytes(['a', 'b'], {'a': 100}, 8)
    ['a']
    """
    total = 0
    for i, key in enumerate(keys):
        total += nbytes.get(key) or 0
        if total > max_bytes and i > 0:
            return keys[:i]
    return keys


@gen.coroutine
def gather_from_workers(who_has, rpc_for, timeout=TRANSFER_TIMEOUT, nbytes=None,
                        max_bytes=None):
    """Fetch keys from the workers that hold them.

    ``who_has`` is ``{key: [address, ...]}``; ``rpc_for(address)`` gives an
    :class:`~distributed.core.rpc`.  Keys are grouped by holder (chosen at
    random, to spread load) so that each peer is asked once.  With
    ``nbytes`` (``{key: bytes}``) and ``max_bytes``, one request asks a peer
    for at most about ``max_bytes`` (at least one key), and its other keys
    wait for the next round: a peer that spilled more than its memory can
    send it all without reading it back all at once.  A peer that
    cannot be reached is dropped and its keys are asked of the remaining
    holders; a peer that answers with an error (a value that does not
    serialize, say) gets each key asked alone, so that one bad value does
    not spoil the others.

    Returns ``GatherResult(data, missing, bad, errors)``: the values fetched,
    the keys no reachable holder had, the addresses that could not be
    reached, and ``{key: exception}`` for keys whose holder answered with an
    error.
    """
    candidates = {k: list(v) for k, v in who_has.items()}
    data, missing, bad, errors = {}, set(), set(), {}
    alone = set()  # keys to ask for one at a time
    while candidates:
        requests = []  # (address, keys)
        by_worker = defaultdict(list)
        for key, holders in candidates.items():
            holders = [h for h in holders if h not in bad]
            if not holders:
                missing.add(key)
                continue
            holder = random.choice(holders)
            if key in alone:
                requests.append((holder, [key]))
            else:
                by_worker[holder].append(key)
        for holder, keys in by_worker.items():
            if max_bytes is not None and nbytes:
                keys = _first_bytes(keys, nbytes, max_bytes)
            requests.append((holder, keys))
        if not requests:
            break
        results = yield [_get_data(rpc_for, a, keys, timeout) for a, keys in requests]
        for (address, keys), result in zip(requests, results):
            if isinstance(result, CONNECTION_ERRORS):
                logger.warning("could not fetch %d keys from %s: %s",
                               len(keys), address, result)
                bad.add(address)
            elif isinstance(result, Exception):
                if len(keys) == 1:
                    errors[keys[0]] = result
                else:
                    alone.update(keys)
            else:
                data.update(result)
                for key in keys:
                    if key not in result:  # the peer no longer has it
                        candidates[key] = [h for h in candidates[key] if h != address]
        candidates = {
            k: [h for h in v if h not in bad]
            for k, v in candidates.items()
            if k not in data and k not in missing and k not in errors
        }
        for k in [k for k, v in candidates.items() if not v]:
            missing.add(k)
            del candidates[k]
    return GatherResult(data, missing, bad, errors)


GatherResult = namedtuple("GatherResult", "data missing bad errors")


async def _get_data(rpc_for, address, keys, timeout):
    try:
        r = rpc_for(address)
    except ValueError as e:  # a name in the center's tables ('alice'), not an address
        return OSError("%r is not a worker's address: %s" % (address, e))
    try:
        return await r.get_data(keys=keys, timeout=timeout)
    except Exception as e:  # reported per peer, the others go on
        return e



class Transfers:
    """The transfers under way, by key, shared by whoever needs those keys.

    >>> async def fake_gather(who_has, rpc_for):
    ...     return GatherResult({k: 1 for k in who_has}, set(), set(), {})
    >>> async def demo():
    ...     t = Transfers(rpc_for=None, gather=fake_gather)
    ...     first = t.start({'x': ['a'], 'y': ['a']})
    ...     again = t.start({'y': ['a'], 'z': ['b']})  # joins the transfer of 'y'
    ...     assert first < again and len(again) == 2
    ...     results = [await f for f in again]
    ...     t.finished(again)
    ...     return sorted(k for r in results for k in r.data), t.fetching
    >>> asyncio.run(demo())
    (['x', 'y', 'z'], {})
    """

    def __init__(self, rpc_for, gather=None):
        self.rpc_for = rpc_for
        self.gather = gather or gather_from_workers
        self.fetching = {}  # key -> future of the transfer bringing it

    def start(self, who_has):
        """The futures (of :class:`GatherResult`) that bring the keys of
        ``who_has`` (``{key: [address, ...]}``): one new transfer for the
        keys not under way, the transfers under way for the others."""
        new = {k: v for k, v in who_has.items() if v and k not in self.fetching}
        if new:
            # a task of its own: it runs whether or not anyone awaits it yet
            future = asyncio.ensure_future(self.gather(new, self.rpc_for))
            for key in new:
                self.fetching[key] = future
        return {self.fetching[k] for k in who_has if k in self.fetching}

    def finished(self, futures):
        """Forget the transfers of ``futures`` (done): later requests start anew."""
        for key, future in list(self.fetching.items()):
            if future in futures:
                del self.fetching[key]
