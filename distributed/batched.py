"""Long-lived message streams: many small messages, few writes.

The center keeps one stream open to every worker and every executor.  What
travels on them are *batches*: lists of message dicts.  :class:`BatchedSend`
collects the messages produced while the event loop is busy and writes them
as one batch as soon as the loop is free (no timer: an idle system sends
each message at once; a busy one sends fewer, larger writes)::

    bs = BatchedSend(stream)
    bs.send({'op': 'task-finished', 'key': 'x'})
    bs.send({'op': 'task-finished', 'key': 'y'})    # same write as 'x'

:func:`handle_batches` is the other end: it reads the batches and calls
``handlers[msg['op']](**extra, **fields)`` for every message.  Every node
keeps those handlers in one dict, ``stream_handlers``, beside the rpc
``handlers`` of its :class:`~distributed.core.Server` (see
docs/internals.md, "Messages", for every op).
"""

import asyncio
import inspect
import logging

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from .core import CommClosedError, RateLimitedLog, read, write
from .protocol import DEFAULT_LIMITS, ProtocolError
from .utils import log_safe

logger = logging.getLogger(__name__)

__all__ = ["BatchedSend", "handle_batches", "close_stream", "CloseStream", "payload_nbytes"]


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

    def offer(self, msg, max_waiting):
        """Queue ``msg`` unless ``max_waiting`` messages already wait (the peer
        reads slowly, or is gone); return whether it was queued.  For
        messages that may be lost, such as printed output, rather than pile up.

        >>> bs = BatchedSend(None)
        >>> bs.buffer = [{'op': 'task-finished'}] * 3
        >>> bs.offer({'op': 'task-output'}, max_waiting=3)
        False
        """
        if self.closed or len(self.buffer) >= max_waiting:
            return False
        self.send(msg)
        return True

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


class CloseStream(Exception):
    """Raised by a stream handler to end :func:`handle_batches` (the peer is
    done with the stream); see :func:`close_stream`."""


def close_stream(**extra):
    """The ``close-stream`` handler: the peer says it sends nothing more.

    The read loop ends after the batch that carried it (the rest of that
    batch is ignored); the stream itself stays open.
    """
    raise CloseStream


#: seconds between two warnings about unknown ops on one stream
UNKNOWN_OP_LOG_INTERVAL = 5


async def handle_batches(stream, handlers, extra=None, *, sender="the peer",
                         limits=DEFAULT_LIMITS, stall=None, every_batch=None):
    """Read batches from ``stream`` and call a handler for each message, until
    the stream closes (or ``every_batch`` or a handler ends it).

    Each message ``{'op': op, **fields}`` calls ``handlers[op](**extra,
    **fields)``: one calling convention for every node, where ``extra``
    names the peer (the center passes ``{'address': worker}`` or
    ``{'client': id}``; a peer cannot send those fields itself)::

        handlers = {'task-finished': scheduler.task_finished}
        await handle_batches(stream, handlers, {'address': address},
                             sender=address, every_batch=flush)

    * A handler that returns an awaitable (a coroutine, a ``gen.coroutine``
      future) is not waited for: it runs as a task of its own, so that a slow
      one does not hold up the stream; its exception is logged.
    * A handler's exception is logged and the next message is handled.
    * An unknown op is logged (rate-limited: at most one line per
      :data:`UNKNOWN_OP_LOG_INTERVAL` seconds per stream) and skipped.
    * ``every_batch()`` is called after each batch's messages; it returning
      ``False`` ends the loop.  A handler raising :class:`CloseStream` (see
      :func:`close_stream`) ends it once ``every_batch`` has run.
    * ``limits`` and ``stall`` (seconds) go to :func:`~distributed.core.read`.
      A :class:`~distributed.protocol.ProtocolError` (malformed or stalled
      input) is logged and closes the stream; a closed stream returns.  A
      batch that arrives after this side closed the stream (it dropped the
      peer meanwhile) is not handled.
    """
    if extra is None:
        extra = {}
    unknown = None  # a RateLimitedLog, made on the first unknown op
    while True:
        try:
            batch = await read(stream, limits, stall)
        except StreamClosedError:
            return
        except ProtocolError as e:
            logger.error("closing the stream of %s: %s", log_safe(sender), log_safe(e))
            stream.close()
            return
        if stream.closed():
            return
        if type(batch) is not list:
            batch = [batch]
        closing = False
        for msg in batch:
            op = None
            try:
                op = msg.pop("op")
                handler = handlers[op]
            except Exception:  # no op, an unknown or unhashable one, not a dict
                if unknown is None:
                    unknown = RateLimitedLog(logger, UNKNOWN_OP_LOG_INTERVAL)
                unknown(logging.WARNING, "unknown op", "unknown stream op %s from %s",
                        log_safe(repr(msg if op is None else op)), log_safe(sender))
                continue
            try:
                result = handler(**extra, **msg)
            except CloseStream:
                closing = True
                break
            except Exception:
                logger.exception("error handling stream op %s from %s",
                                 log_safe(repr(op)), log_safe(sender))
                continue
            if result is not None and inspect.isawaitable(result):
                _run_in_background(result, op, sender)
        if every_batch is not None and every_batch() is False:
            return
        if closing:
            return


_background = set()  # tasks started by handlers, kept until done


def _run_in_background(awaitable, op, sender):
    task = asyncio.ensure_future(awaitable)
    _background.add(task)

    def done(task):
        _background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("error handling stream op %s from %s", log_safe(repr(op)),
                         log_safe(sender), exc_info=task.exception())

    task.add_done_callback(done)


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
