"""Shared pieces of the command lines: signals, logging, sizes, security options."""

import asyncio
import logging
import os
import re
import signal
import sys

import psutil

from ..security import ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY, ENV_TOKEN, Security
from ..utils import is_loopback

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
          "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_limit(text):
    """``'4GB'`` / ``'512MiB'`` / ``'0.5'`` (of RAM) / ``'auto'`` / ``'0'`` -> bytes or None.

    >>> parse_memory_limit('2GB')
    2000000000
    """
    if text is None:
        return None
    text = str(text).strip().lower()
    total = psutil.virtual_memory().total
    if text in ("", "0", "none"):
        return None
    if text == "auto":
        return total
    m = re.fullmatch(r"([0-9.]+)\s*([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(
            "memory limit %r not understood: use bytes ('4GB', '512MiB'), a fraction "
            "of RAM ('0.5') or 'auto'" % text
        )
    value = float(m.group(1))
    if not m.group(2) and value <= 1:
        return int(value * total)
    return int(value * _UNITS[m.group(2)])


def add_security_arguments(parser):
    """``--auth-token``, ``--tls-cert``, ``--tls-key``, ``--tls-ca`` (each also
    from its environment variable)."""
    parser.add_argument(
        "--auth-token", default=None, metavar="TOKEN",
        help="shared secret that every center, worker and client of the cluster "
        "must prove it knows when a connection opens (default: $%s; prefer the "
        "variable: a command line is visible to every user of the machine)" % ENV_TOKEN)
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="this node's TLS certificate (chain); turns TLS on for "
                        "every connection (default: $%s)" % ENV_TLS_CERT)
    parser.add_argument("--tls-key", default=None, metavar="PEM",
                        help="the private key of --tls-cert, unless that file holds "
                        "it (default: $%s)" % ENV_TLS_KEY)
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="verify peers' certificates against this CA, and require "
                        "one from every client (default: $%s)" % ENV_TLS_CA)


def security_from_args(args, parser):
    """The :class:`Security` of the options (environment variables fill the gaps)."""
    try:
        return Security.from_env(token=args.auth_token, tls_cert=args.tls_cert,
                                 tls_key=args.tls_key, tls_ca=args.tls_ca)
    except ValueError as e:
        parser.error(str(e))


def warn_if_exposed(logger, what, host, security):
    """Say that a node without a token runs anyone's code: a warning on a
    non-loopback address, a one-line hint (on stderr) on loopback."""
    if security.token is not None:
        return
    target = "the cluster" if what == "the center" else "it"
    if not is_loopback(host):
        logger.warning("%s listens on %s without an auth token: anyone who can reach "
                       "this port can run code on %s; set --auth-token or %s",
                       what, host, target, ENV_TOKEN)
    else:
        print("Hint: %s listens on %s without an auth token: any user of this machine "
              "can run code on %s; set --auth-token or %s to a shared secret"
              % (what, host, target, ENV_TOKEN), file=sys.stderr, flush=True)


def raise_open_files_limit(cap=2**20):
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (at most ``cap``), where
    allowed: a node holding many connections should not run out of file
    descriptors at the usual soft limit of 1024.  Returns the soft limit now."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def setup_logging(verbose=False):
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def run_until_signal(start, stop, prog=None):
    """Run ``await start(stopping)``, then wait for SIGINT/SIGTERM and ``await stop()``.

    ``stopping`` is an ``asyncio.Event`` the node may set itself (on a
    ``terminate`` request) to end the process the same way.  A signal that
    arrives while ``start()`` is still running (a worker waiting for its
    center, say) cancels it and stops at once.
    """

    async def main():
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        starting = asyncio.ensure_future(start(stopping))
        signalled = asyncio.ensure_future(stopping.wait())
        await asyncio.wait([starting, signalled], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            error = starting.exception()
            if error is not None:
                signalled.cancel()
                try:
                    await stop()
                except Exception:
                    pass
                raise error
            await signalled
        else:
            starting.cancel()
            try:
                await starting
            except asyncio.CancelledError:
                pass
        await stop()

    try:
        asyncio.run(main())
    except (OSError, TimeoutError, EOFError, ValueError) as e:
        print("%s: error: %s" % (prog or os.path.basename(sys.argv[0]), e), file=sys.stderr,
              flush=True)
        return 1
    return 0
