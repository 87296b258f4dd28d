"""The scheduler file: how a center's address (and what it takes to talk to
it) travels to workers and clients over a shared filesystem.

::

    $ dcenter --scheduler-file ~/cluster.json          # writes it once it listens
    $ dworker --scheduler-file ~/cluster.json          # waits for it, then connects
    e = Executor(scheduler_file="~/cluster.json")      # the same, from Python

The file is JSON, readable by its owner only (mode 0600 from its creation:
it is written to a temporary file created with that mode, then renamed over
the path, so no reader ever sees half of it or a world-readable copy)::

    {"address": "10.0.0.5:8787", "auth_token": "...", "tls_cert": "/path/cert.pem",
     "tls_key": "/path/key.pem", "tls_ca": "/path/ca.pem", "pid": 12345}

The TLS entries are paths (the files themselves stay where they are, on the
shared filesystem); entries without a value are left out.  The center
removes the file when it stops cleanly (not when it is killed): a worker
started after that waits for the next center instead of trying a dead
address.
"""

import json
import os
import time

from .security import Security

__all__ = ["write_scheduler_file", "read_scheduler_file", "remove_scheduler_file",
           "SchedulerFileTimeout"]

#: seconds between looks for a scheduler file that is not there yet
POLL_INTERVAL = 0.1
#: the entries of a :class:`~distributed.security.Security` in the file
_SECURITY_KEYS = {"auth_token": "token", "tls_cert": "tls_cert", "tls_key": "tls_key",
                  "tls_ca": "tls_ca"}


class SchedulerFileTimeout(TimeoutError):
    """No usable scheduler file appeared at the path within the timeout."""


def write_scheduler_file(path, address, security=None):
    """Write ``address`` and the client settings of ``security`` to ``path``,
    atomically and readable by the owner only; return the absolute path.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> p = write_scheduler_file(os.path.join(d, "s.json"), "127.0.0.1:8787",
    ...                          Security(token="secret"))
    >>> oct(os.stat(p).st_mode & 0o777), read_scheduler_file(p)[0]
    ('0o600', '127.0.0.1:8787')
    """
    path = os.path.abspath(os.path.expanduser(path))
    content = {"address": address, "pid": os.getpid()}
    if security is not None:
        for key, attr in _SECURITY_KEYS.items():
            value = getattr(security, attr)
            if value:
                content[key] = (os.path.abspath(value) if key.startswith("tls_")
                                else value)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:  # left by a crash of a process with our pid: O_EXCL would refuse it
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OSError("cannot write the scheduler file %s: %s" % (path, e)) from None
    try:
        # 0600 from creation: the token is never readable by others, not for an instant
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o600)
    except OSError as e:
        raise OSError("cannot write the scheduler file %s: %s" % (path, e.strerror)) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _load(path):
    """The file's content, or None while it is not there (or not complete)."""
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:  # written by something else than write_scheduler_file
        return None
    if not isinstance(content, dict) or not content.get("address"):
        return None
    return content


def read_scheduler_file(path, timeout=30, security=None):
    """``(address, security)`` from the scheduler file at ``path``, waiting up
    to ``timeout`` seconds for it to appear.

    ``security``: settings given otherwise (command-line flags); the ones it
    has win over the file's.  The environment's ``DISTRIBUTED_*`` settings
    do not: the file says all the center needs (no token in it: the center
    has none).  Raises :class:`SchedulerFileTimeout`, naming the path, when
    no file came.
    """
    path = os.path.abspath(os.path.expanduser(path))
    deadline = time.monotonic() + timeout
    while True:
        content = _load(path)
        if content is not None:
            break
        if time.monotonic() >= deadline:
            raise SchedulerFileTimeout(
                "no scheduler file at %s after %g s: start the center with "
                "`dcenter --scheduler-file %s` (on a filesystem this machine shares), "
                "or wait longer" % (path, timeout, path))
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
    given = {}
    if security is not None:
        given = {"token": security.token, "tls_cert": security.tls_cert,
                 "tls_key": security.tls_key, "tls_ca": security.tls_ca}
    merged = {attr: given.get(attr) or content.get(key)
              for key, attr in _SECURITY_KEYS.items()}
    return content["address"], Security(**merged)


def remove_scheduler_file(path, address):
    """Remove the scheduler file at ``path`` if it still names ``address``
    (a newer center may have written its own meanwhile); True if removed."""
    path = os.path.abspath(os.path.expanduser(path))
    content = _load(path)
    if content is None or content.get("address") != address:
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
