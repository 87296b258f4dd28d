"""Shared pieces of the command lines: the options tables' machinery
(:class:`Option`), signals, logging, sizes, security options.

Each command keeps one table, a list of :class:`Option` (``dworker.OPTIONS``,
``dcenter.OPTIONS``); its parser, its constructor call and the command lines
of its children are all made from it, so a new flag is one new row.
"""

import argparse
import asyncio
import atexit
import inspect
import logging
import os
import re
import signal
import sys

import psutil

from ..logs import LOG_LENGTH, LOG_LENGTH_ENV
from ..security import ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY, ENV_TOKEN, Security
from ..utils import PortInUse, is_loopback

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
          "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_resources(text):
    """``'GPU=2,MEM=10e9'`` -> ``{'GPU': 2.0, 'MEM': 1e10}`` (``dworker --resources``).

    >>> parse_resources('GPU=2, MEM=10e9')
    {'GPU': 2.0, 'MEM': 10000000000.0}
    """
    if text is None:
        return None
    resources = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        name, sep, amount = part.partition("=")
        name = name.strip()
        try:
            value = float(amount)
        except ValueError:
            value = -1
        if not sep or not name or not value >= 0:
            raise ValueError("resources %r not understood: use NAME=AMOUNT pairs "
                             "separated by commas, e.g. 'GPU=2,MEM=10e9'" % text)
        resources[name] = value
    return resources or None


def format_resources(resources):
    """The ``--resources`` text of ``{'GPU': 2, 'MEM': 1e10}`` (text stays text).

    >>> format_resources({'GPU': 2, 'MEM': 10e9})
    'GPU=2,MEM=10000000000.0'
    """
    if isinstance(resources, dict):
        return ",".join("%s=%r" % item for item in resources.items())
    return str(resources)


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


#: the child command lines an option is passed on to (see :class:`Option`)
NANNY_CHILD = "nanny"    # the worker a ``dworker`` nanny starts
NPROCS_CHILD = "nprocs"  # each ``dworker`` that ``dworker --nprocs N`` starts
#: the TCP port 0: the system picks a free one
FREE_PORT = 0
#: where a center (and a local cluster) listens unless told otherwise
LOCALHOST = "127.0.0.1"

# Printed lines that other processes wait for (``Process.wait_for_line``) and
# take the address from (the last word); see docs/internals.md.
#: ``dcenter``: ``Start center at 127.0.0.1:8787``
CENTER_STARTED = "Start center at"
#: ``dworker``: ``Start worker at: 127.0.0.1:40123`` (listening, not yet registered)
WORKER_STARTED = "Start worker at:"
#: ``dworker``: ``Registered with center at: 127.0.0.1:8787`` (ready for work)
WORKER_REGISTERED = "Registered with center at:"
#: ``dworker`` (with a nanny): ``Start nanny at: 127.0.0.1:42749``
NANNY_STARTED = "Start nanny at:"
#: the nanny, once it replaced a dead worker: ``Restarted worker at: 127.0.0.1:40124``
WORKER_RESTARTED = "Restarted worker at:"
#: ``dcenter``, after :data:`CENTER_STARTED` unless ``--no-dashboard``:
#: ``Dashboard at http://127.0.0.1:8797/status``
DASHBOARD_STARTED = "Dashboard at"


class Option:
    """One command-line option: the one place that says how it is parsed, what
    it does, which constructor keyword it becomes and which child command lines
    carry it.

    >>> o = Option("--ncores", type=int, default=None, kwarg="ncores",
    ...            children=(NANNY_CHILD,), help="threads that run tasks",
    ...            default_text="cores of this machine")
    >>> o.dest, o.kwargs(4), o.argv(4), o.argv(None)
    ('ncores', {'ncores': 4}, ['--ncores', '4'], [])

    - ``flag`` (and ``aliases``): the spelling(s); ``dest`` is the Python name
      (``--local-dir`` -> ``local_dir``), also the keyword of
      ``LocalCluster(worker_options=...)`` and ``center_args``.
    - ``type``, ``default``, ``metavar``, ``help``: as in argparse; ``default``
      is a named constant of the code that uses it; ``default_text`` says in
      words what None means (``--help`` shows it, or else the default).
      ``switch=True``: a flag without a value (``store_true``).
    - ``kwarg``: the constructor keyword (``Worker(...)``, ``Center(...)``) it
      becomes: a name, or a function of the value returning a dict of
      keywords; None when the command uses it itself (``--port``: ``listen``).
      ``convert`` turns the text into the keyword's value (``'4GB'`` -> bytes).
    - ``children``: the child command lines that get it (:data:`NANNY_CHILD`,
      :data:`NPROCS_CHILD`); ``spread(value, i)``: its value for the i-th of
      several processes (``--port``: consecutive ports, ``--name``: ``-i``).
    - ``env``: an environment variable that gives the value when the flag is
      not given (``DISTRIBUTED_DEATH_TIMEOUT``); the processes the command
      starts inherit it.
    - ``repeat=True``: the flag may be given several times; its value is the
      list of them (``--preload a --preload b``).
    - ``format``: the text of a Python value on a command line, when ``str``
      is not it (``{'GPU': 2}`` -> ``'GPU=2'`` for ``--resources``).
    """

    def __init__(self, flag, default=None, type=None, help="", kwarg=None, convert=None,
                 children=(), spread=None, aliases=(), metavar=None, default_text=None,
                 switch=False, hidden=False, env=None, repeat=False, format=str):
        self.flag = flag
        self.env = env
        self.repeat = repeat
        self.format = format
        self.aliases = tuple(aliases)
        self.dest = flag.lstrip("-").replace("-", "_")
        self.default = False if switch else default
        self.type = type
        self.help = help
        self.kwarg = kwarg
        self.convert = convert
        self.children = frozenset(children)
        self.spread = spread
        self.metavar = metavar
        self.default_text = default_text
        self.switch = switch
        self.hidden = hidden

    def __repr__(self):
        return "Option(%r)" % self.flag

    def add_to(self, parser):
        """Add this option to an ``argparse`` parser."""
        if self.hidden:
            help = argparse.SUPPRESS
        elif self.switch:
            help = self.help
        else:
            shown = self.default_text
            if shown is None:
                shown = "none" if self.default is None else str(self.default)
                if self.env is not None:
                    shown = "$%s, else %s" % (self.env, shown)
            help = "%s (default: %s)" % (self.help, shown.replace("%", "%%"))
        names = sorted((self.flag,) + self.aliases, key=len)  # -v, --verbose
        if self.switch:
            parser.add_argument(*names, dest=self.dest, action="store_true", help=help)
        elif self.repeat:
            parser.add_argument(*names, dest=self.dest, action="append", type=self.type,
                                metavar=self.metavar, help=help)
        else:
            default = self.default
            if self.env is not None and os.environ.get(self.env):
                default = os.environ[self.env]  # argparse applies ``type`` to it
            parser.add_argument(*names, dest=self.dest,
                                default=default, type=self.type,
                                metavar=self.metavar, help=help)

    def kwargs(self, value):
        """The constructor keywords for ``value`` (``{}`` when it has none)."""
        if self.kwarg is None:
            return {}
        if self.convert is not None:
            value = self.convert(value)
        if callable(self.kwarg):
            return self.kwarg(value)
        return {self.kwarg: value}

    def argv(self, value, index=None):
        """This option on a command line: ``[]`` for its default (or None)."""
        if index is not None and self.spread is not None:
            value = self.spread(value, index)
        if value is None or value == self.default:
            return []
        if self.switch:
            return [self.flag] if value else []
        argv = []
        for one in self._values(value):
            argv += [self.flag, self.format(one)]
        return argv

    def _values(self, value):
        """The values of a repeated option (one given alone counts as one)."""
        if self.repeat and isinstance(value, (list, tuple)):
            return list(value)
        return [value]

    def check(self, value):
        """Raise ``ValueError`` now for a value the child would refuse."""
        if value is None or self.switch:
            return
        for one in self._values(value):
            text = self.format(one)
            if self.type is not None:
                self.type(text)
            if self.convert is not None:
                self.convert(text)


def build_parser(prog, description, options, positionals=()):
    """An ``argparse`` parser of ``options`` (a list of :class:`Option`), after
    the positional ``(name, kwargs)`` pairs, with ``--version``."""
    from .. import __version__

    p = argparse.ArgumentParser(prog=prog, description=description)
    for name, kwargs in positionals:
        p.add_argument(name, **kwargs)
    for option in options:
        option.add_to(p)
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


def constructor_kwargs(options, args):
    """The constructor keywords of parsed ``args``, as the table says.

    >>> table = [Option("--name", kwarg="name"), Option("--port", type=int, default=0)]
    >>> args = build_parser("x", "", table).parse_args(["--name", "a", "--port", "5"])
    >>> constructor_kwargs(table, args)
    {'name': 'a'}
    """
    kwargs = {}
    for option in options:
        kwargs.update(option.kwargs(getattr(args, option.dest)))
    return kwargs


def child_argv(options, args, child, index=None):
    """The options of parsed ``args`` that ``child`` (:data:`NANNY_CHILD`,
    :data:`NPROCS_CHILD`) gets on its command line, for the ``index``-th of
    several processes.  A pure function: the same table parses them back.

    >>> table = [Option("--name", children=(NPROCS_CHILD,),
    ...                 spread=lambda name, i: name and "%s-%d" % (name, i)),
    ...          Option("--nprocs", type=int, default=1)]
    >>> args = build_parser("x", "", table).parse_args(["--name", "w", "--nprocs", "2"])
    >>> child_argv(table, args, NPROCS_CHILD, index=1)
    ['--name', 'w-1']
    """
    argv = []
    for option in options:
        if child in option.children:
            argv += option.argv(getattr(args, option.dest), index)
    return argv


def options_argv(options, values, exclude=(), index=None, what="option"):
    """The command line of ``values``, options by their Python names (what
    ``LocalCluster`` passes on); ``TypeError`` for a name that is not one of
    ``options`` (or is in ``exclude``), ``ValueError`` for a value the child
    would refuse: both before any process starts."""
    by_name = {o.dest: o for o in options if o.dest not in exclude and not o.hidden}
    argv = []
    for name, value in values.items():
        option = by_name.get(name)
        if option is None:
            raise TypeError("unknown %s %r; the options are: %s"
                            % (what, name, ", ".join(sorted(by_name))))
        option.check(value)
        argv += option.argv(value, index)
    return argv


class PortError(ValueError, argparse.ArgumentTypeError):
    """A port number out of range: argparse prints its message after the
    option's name (``argument --port: ...``); elsewhere it is a ValueError."""


def port_number(text):
    """A TCP port from ``'8787'``: ``PortError`` unless it is in 0-65535 (0:
    a free one), rather than a port the system would wrap around (99999 ->
    34463).

    >>> port_number('8787')
    8787
    """
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise PortError("%r is not a port number: use 0-65535 (0: a free one)"
                        % (text,)) from None
    if not 0 <= port <= 65535:
        raise PortError("port %d is out of range: use 0-65535 (0: a free one)" % port)
    return port


def parse_port(text):
    """A port from ``'8787'``, ``':8787'`` or ``'host:8787'`` (the form of
    dask's ``--dashboard-address``), checked as :func:`port_number` does.

    >>> parse_port(':8788'), parse_port('8788')
    (8788, 8788)
    """
    return port_number(str(text).rpartition(":")[2])


def http_service(service):
    """The ``kwarg`` of an ``--http-port`` option: the ``services`` and
    ``service_ports`` keywords that start ``service`` on that port."""

    def kwargs(port):
        if port is None:
            return {}
        return {"services": {"http": service}, "service_ports": {"http": port}}

    return kwargs


def no_http_service(off):
    """The ``kwarg`` of a ``--no-dashboard`` switch (after ``--http-port`` in
    its table): no HTTP service at all when set."""
    return {"services": {}, "service_ports": {}} if off else {}


#: ``--auth-token``, ``--tls-*``: into ``security=`` (:func:`security_from_args`);
#: children get them through their environment, never on a command line
SECURITY_OPTIONS = [
    Option("--auth-token", metavar="TOKEN",
           help="shared secret that every center, worker and client of the cluster "
           "must prove it knows when a connection opens; prefer the variable: a "
           "command line is visible to every user of the machine",
           default_text="$" + ENV_TOKEN),
    Option("--tls-cert", metavar="PEM",
           help="this node's TLS certificate (chain); turns TLS on for every connection",
           default_text="$" + ENV_TLS_CERT),
    Option("--tls-key", metavar="PEM",
           help="the private key of --tls-cert, unless that file holds it",
           default_text="$" + ENV_TLS_KEY),
    Option("--tls-ca", metavar="PEM",
           help="verify peers' certificates against this CA, and require one from "
           "every client", default_text="$" + ENV_TLS_CA),
]

#: ``--log-length``: records each node keeps for ``get_logs`` (both commands)
LOG_LENGTH_OPTION = Option(
    "--log-length", type=int, kwarg="log_length", children=(NANNY_CHILD, NPROCS_CHILD),
    metavar="RECORDS", help="recent log records the node keeps in memory for "
    "get_logs (Executor.get_worker_logs / get_center_logs)",
    default_text="$%s, else %d" % (LOG_LENGTH_ENV, LOG_LENGTH))

#: ``-v``: every child logs as much as its parent
VERBOSE = Option("--verbose", aliases=("-v",), switch=True, help="log what happens",
                 children=(NANNY_CHILD, NPROCS_CHILD))


#: ``--preload``: every process that runs a node (a nanny's worker, each of
#: ``--nprocs``) runs the hook with its own node
PRELOAD_OPTION = Option(
    "--preload", children=(NANNY_CHILD, NPROCS_CHILD), metavar="MODULE", repeat=True,
    help="import MODULE (a module name, or the path of a .py file) and call its "
    "dask_setup(node) once the node (the Worker or the Center object) has started; "
    "an error in it stops the command; may be given several times (run in order)")


#: ``--scheduler-file``: ``dcenter`` writes its address (and what a client
#: needs to connect) there, ``dworker`` reads it (see distributed.scheduler_file)
ENV_SCHEDULER_FILE = "DISTRIBUTED_SCHEDULER_FILE"
#: ``--pid-file``: this process's pid (never inherited by the processes it starts)
ENV_PID_FILE = "DISTRIBUTED_PID_FILE"
#: ``dworker --death-timeout``, ``--lifetime``, ``--lifetime-stagger``
ENV_DEATH_TIMEOUT = "DISTRIBUTED_DEATH_TIMEOUT"
ENV_LIFETIME = "DISTRIBUTED_LIFETIME"
ENV_LIFETIME_STAGGER = "DISTRIBUTED_LIFETIME_STAGGER"
#: the variables of the deployment flags: a ``LocalCluster`` does not hand
#: them to its processes (its center must not overwrite a real cluster's
#: scheduler file; its options come from its arguments)
DEPLOY_ENV = (ENV_SCHEDULER_FILE, ENV_PID_FILE, ENV_DEATH_TIMEOUT, ENV_LIFETIME,
              ENV_LIFETIME_STAGGER)

PID_FILE_OPTION = Option(
    "--pid-file", metavar="PATH", env=ENV_PID_FILE,
    help="write the pid of this process to PATH (removed when it stops); "
    "its children do not inherit it")


def write_pid_file(path):
    """``--pid-file``: write our pid to ``path`` and remove it at exit (if it
    still holds our pid); the variable is dropped so no child we start writes
    its own pid there.  Returns the absolute path, or None without one."""
    os.environ.pop(ENV_PID_FILE, None)
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    pid = str(os.getpid())
    with open(path, "w") as f:
        f.write(pid + "\n")

    def remove():
        try:
            with open(path) as f:
                if f.read().strip() == pid:
                    os.unlink(path)
        except OSError:
            pass

    atexit.register(remove)
    return path


class PreloadError(RuntimeError):
    """A ``--preload`` module that could not be imported, or whose hook raised."""


def import_preload(module):
    """The module ``module`` names: a module name, or the path of a .py file."""
    import importlib
    import importlib.util

    if module.endswith(".py") or os.sep in module:
        path = os.path.abspath(module)
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or not os.path.isfile(path):
            raise FileNotFoundError("no such file: %s" % path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


async def run_preload(modules, node):
    """``--preload MODULE`` (each of ``modules``, a list or one name, in
    order): import it and call its ``dask_setup(node)``, if it has one
    (awaited when it is a coroutine function); :class:`PreloadError`, naming
    the module and the error, when either fails.

    ::

        # setup.py, run as: dworker 127.0.0.1:8787 --preload setup.py
        def dask_setup(worker):
            worker.my_cache = {}
    """
    if modules is None:
        return
    for module in [modules] if isinstance(modules, str) else modules:
        await _run_one_preload(module, node)


async def _run_one_preload(module, node):
    try:
        mod = import_preload(module)
        hook = getattr(mod, "dask_setup", None)
        if hook is not None:
            result = hook(node)
            if inspect.isawaitable(result):
                await result
    except Exception as e:
        raise PreloadError("--preload %s: %s: %s" % (module, type(e).__name__, e)) from None


def security_from_args(args, parser, fallback=None):
    """The :class:`Security` of the options; the environment variables fill
    the gaps, or, instead of them, a ``fallback`` Security (a scheduler
    file's, which describes the center completely)."""
    given = dict(token=args.auth_token, tls_cert=args.tls_cert,
                 tls_key=args.tls_key, tls_ca=args.tls_ca)
    try:
        if fallback is None:
            return Security.from_env(**given)
        return Security(**{name: value or getattr(fallback, name)
                           for name, value in given.items()})
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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes: a worker's
    task thread's records then go, like its prints, to the executor that
    submitted the task (see distributed.output)."""

    def __init__(self, level=logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr


def setup_logging(verbose=False):
    """The console shows WARNING and up (INFO with ``verbose``); the node's
    log buffer (``get_logs``) keeps the ``distributed`` INFO records either way."""
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, _StderrHandler):  # called before, in this process
            handler.setLevel(level)
            break
    else:
        handler = _StderrHandler(level)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(handler)  # beside the log buffers' handler, if already there
    root.setLevel(level)
    logging.getLogger("distributed").setLevel(logging.INFO)


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
    except PortInUse as e:
        option = "--port" if e.listener == "tcp" else "--http-port"
        print("%s: error: %s; start it with another %s, or %s 0 for a free one"
              % (prog or os.path.basename(sys.argv[0]), e, option, option),
              file=sys.stderr, flush=True)
        return 1
    except (OSError, TimeoutError, EOFError, ValueError, PreloadError) as e:
        print("%s: error: %s" % (prog or os.path.basename(sys.argv[0]), e), file=sys.stderr,
              flush=True)
        return 1
    return 0


def exit_at_once(code):
    """End the process now with ``code``, flushing output and logs first.

    For a worker stopped while tasks still run in its threads: a normal
    exit would wait for them (Python joins a thread pool's threads at
    exit), so a restart or Ctrl-C would last as long as the longest task.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
