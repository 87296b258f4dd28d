"""``dssh`` (alias ``dcluster``): a center and workers on other hosts, over SSH.

::

    $ export DISTRIBUTED_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
    $ dssh node1 node2 node3 --nthreads 4 --remote-python /opt/env/bin/python
    [node1] Start center at 10.0.0.1:8787
    [node1] Start nanny at: 10.0.0.1:41533
    [node2] Registered with center at: 10.0.0.1:8787
    ...
    Cluster running: center at 10.0.0.1:8787, 3 hosts; Ctrl-C stops it

Ctrl-C (or SIGTERM) stops every remote process; so does the end of this
command, even by SIGKILL (see :mod:`distributed.deploy.ssh`).
"""

import argparse
import os
import secrets
import signal
import sys
import threading

from ..deploy.ssh import CENTER_PORT, GRACE, SSHCluster
from ..security import ENV_TOKEN
from .utils import (
    SECURITY_OPTIONS,
    Option,
    build_parser,
    constructor_kwargs,
    parse_memory_limit,
    port_number,
    security_from_args,
)

#: the ``dssh`` options (besides the hosts, ``--ssh-option`` and ``--remote-env``);
#: ``kwarg``: the ``SSHCluster`` keyword each becomes
OPTIONS = [
    Option("--center-host", aliases=("--scheduler",), kwarg="center_host",
           help="the host that runs the center", default_text="the first host"),
    Option("--center-port", type=port_number, default=CENTER_PORT, kwarg="center_port",
           help="the center's port (0: a free one)"),
    Option("--center-ip", kwarg="center_ip", help="the address the center listens on and workers reach it at",
           default_text="the address ssh reaches the center's host at"),
    Option("--http-port", type=port_number,
           help="the center's dashboard port (0: a free one)",
           default_text="dcenter's default"),
    Option("--no-dashboard", switch=True, help="start the center without its dashboard"),
    Option("--nprocs", aliases=("--nworkers",), type=int, default=1, kwarg="nprocs",
           help="worker processes on every host"),
    Option("--nthreads", aliases=("--ncores",), type=int, kwarg="nthreads",
           help="threads of every worker process",
           default_text="the host's cores divided by --nprocs"),
    Option("--memory-limit", kwarg="memory_limit", help="memory of every worker process (see dworker --help)",
           default_text="no limit"),
    Option("--ssh-key", aliases=("--ssh-private-key",), kwarg="ssh_key", help="private key file (ssh -i)",
           default_text="ssh's own choice"),
    Option("--ssh-port", type=port_number, kwarg="ssh_port", help="sshd's port on every host (ssh -p)",
           default_text="ssh's own choice, 22"),
    Option("--ssh-username", kwarg="ssh_username", help="user name on every host (ssh -l)",
           default_text="ssh's own choice"),
    Option("--ssh-config", kwarg="ssh_config", help="ssh configuration file (ssh -F)",
           default_text="~/.ssh/config"),
    Option("--remote-python", default="python3", kwarg="remote_python",
           help="the Python on the hosts that has distributed installed"),
    Option("--token-file", default=os.path.join("~", ".distributed", "dssh-token"),
           help="where to write the auth token dssh makes when none is given "
           "(readable by you only); clients read it: "
           "DISTRIBUTED_AUTH_TOKEN=$(cat FILE)"),
    Option("--timeout", type=float, default=60, kwarg="timeout", help="seconds for the start-up"),
    Option("--grace", type=float, default=GRACE, kwarg="grace",
           help="seconds a remote process has to stop before it is killed"),
    *SECURITY_OPTIONS,
]


def make_parser():
    parser = build_parser(
        "dssh",
        "Start a distributed center on one host and workers on every host, over "
        "SSH (the system ssh client: your ~/.ssh/config applies). Their output "
        "is printed here, prefixed with the host. Stop them all with Ctrl-C.",
        OPTIONS,
        positionals=[("hosts", dict(nargs="+", metavar="HOST",
                                    help="hosts to start workers on (user@host works)"))])
    parser.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an ssh option (ssh -o), e.g. ConnectTimeout=10; repeatable")
    parser.add_argument("--remote-env", action="append", default=[], metavar="NAME=VALUE",
                        type=_assignment,
                        help="an environment variable of the remote processes, e.g. "
                        "PYTHONPATH=/home/me/src; repeatable. Sent through the ssh "
                        "session, not on a command line")
    return parser


def _assignment(text):
    """``'NAME=VALUE'`` -> ``('NAME', 'VALUE')`` (``--remote-env``).

    >>> _assignment('PYTHONPATH=/src:/lib')
    ('PYTHONPATH', '/src:/lib')
    """
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("%r is not NAME=VALUE" % text)
    return name, value


def write_token(path, token):
    """Write ``token`` to ``path``, readable by its owner only; return the path."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    return path


def cluster_kwargs(args):
    """The ``SSHCluster`` keywords of parsed ``args`` (all but ``security``).

    >>> kw = cluster_kwargs(make_parser().parse_args(
    ...     ['n1', 'n2', '--nthreads', '2', '--no-dashboard', '--remote-env', 'A=1']))
    >>> kw['hosts'], kw['nthreads'], kw['center_options'], kw['remote_env']
    (['n1', 'n2'], 2, {'no_dashboard': True}, {'A': '1'})
    """
    kwargs = constructor_kwargs(OPTIONS, args)
    center_options = {}  # --http-port and --no-dashboard: dcenter's own options
    if args.http_port is not None:
        center_options["http_port"] = args.http_port
    if args.no_dashboard:
        center_options["no_dashboard"] = True
    kwargs.update(hosts=args.hosts, center_options=center_options,
                  ssh_options=args.ssh_option, remote_env=dict(args.remote_env), echo=True)
    return kwargs


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.nprocs < 1:
        parser.error("--nprocs must be at least 1")
    if args.memory_limit is not None:
        try:
            parse_memory_limit(args.memory_limit)
        except ValueError as e:
            parser.error(str(e))
    security = security_from_args(args, parser)
    if security.token is None:
        security = security.with_token(secrets.token_hex(32))
        path = write_token(args.token_file, security.token)
        print("Auth token written to %s; clients: export %s=$(cat %s)"
              % (path, ENV_TOKEN, path), flush=True)

    stopping = threading.Event()
    cluster = None
    try:
        # Ctrl-C while it starts: KeyboardInterrupt, and SSHCluster stops what it started
        cluster = SSHCluster(security=security, **cluster_kwargs(args))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        print("Cluster running: center at %s, %d hosts; Ctrl-C stops it"
              % (cluster.center_address, len(cluster.hosts)), flush=True)
        while not stopping.wait(0.5):
            if cluster.center.poll() is not None:
                print("dssh: the center's session ended", file=sys.stderr, flush=True)
                return 1
        return 0
    except (OSError, TimeoutError, EOFError, ValueError, TypeError) as e:
        print("dssh: error: %s" % e, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if cluster is not None:
            print("Stopping the cluster", flush=True)
            cluster.close()
            print("Cluster stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
