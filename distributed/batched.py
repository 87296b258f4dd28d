"""Long-lived message streams: many small messages, few writes.

The center keeps one stream open to every worker and every executor.  What
travels on them are *batches*: lists of message dicts.  :class:`BatchedSend`
collects the messages produced while the event loop is busy and writes them
as one batch as soon as the loop is free (no timer: an idle system sends
each message at once; a busy one sends fewer, larger writes)::

    bs = BatchedSend(stream)
    bs.send({'op': 'task-finished', 'key': 'x'})
    bs.send({'op': 'task-finished', 'key': 'y'})    # same write as 'x'

:func:`read_batches` is the other end: it yields every message of every
batch until the stream closes.
"""

import logging

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from .core import CommClosedError, read, write
from .protocol import DEFAULT_LIMITS

logger = logging.getLogger(__name__)

__all__ = ["BatchedSend", "read_batches", "payload_nbytes"]


class BatchedSend:
    """Batch messages to ``stream``; see the module docstring."""

    def __init__(self, stream, loop=None, max_bytes=None):
        self.stream = stream
        self.loop = loop or IOLoop.current()
        #: write batches of at most this many payload bytes (the reader's limit)
        self.max_bytes = max_bytes
        self.buffer = []
        self.closed = False
        self._busy = False  # a flush is scheduled or writing
        self.batches_sent = 0
        self.messages_sent = 0

    def send(self, msg):
        """Queue ``msg``; it is written at the next opportunity."""
        if self.closed:
            raise CommClosedError("the batched stream is closed")
        self.buffer.append(msg)
        if not self._busy:
            self._busy = True
            self.loop.add_callback(self._flush)

    def send_many(self, msgs):
        for msg in msgs:
            self.send(msg)

    async def _flush(self):
        try:
            while self.buffer and not self.closed:
                batch, self.buffer = self._take_batch()
                self.batches_sent += 1
                self.messages_sent += len(batch)
                await write(self.stream, batch)
        except StreamClosedError:
            self.abort()
        except Exception:
            logger.exception("could not send a batch; closing the stream")
            self.abort()
        finally:
            self._busy = False

    def _take_batch(self):
        if self.max_bytes is None or len(self.buffer) == 1:
            return self.buffer, []
        total = 0
        for i, msg in enumerate(self.buffer):
            total += payload_nbytes(msg)
            if total > self.max_bytes and i > 0:
                return self.buffer[:i], self.buffer[i:]
        return self.buffer, []

    def abort(self):
        """Close the stream and drop what was not sent."""
        self.closed = True
        self.buffer = []
        self.stream.close()

    close = abort


async def read_batches(stream, handle, limits=DEFAULT_LIMITS):
    """Call ``handle(msg)`` for each message of each batch until the stream closes.

    Returns normally when the stream closes; a malformed batch raises.
    """
    while True:
        try:
            batch = await read(stream, limits)
        except StreamClosedError:
            return
        if type(batch) is not list:
            batch = [batch]
        for msg in batch:
            handle(msg)


def payload_nbytes(msg):
    """The bytes of the buffers in ``msg`` (dicts, lists, tuples): what
    dominates its size on the wire."""
    total = 0
    stack = [msg]
    while stack:
        o = stack.pop()
        t = type(o)
        if t is bytes or t is bytearray:
            total += len(o)
        elif t is memoryview:
            total += o.nbytes
        elif t is dict:
            stack.extend(o.values())
        elif t is list or t is tuple:
            stack.extend(o)
    return total
