"""``python -m distributed.demo``: the system at work on a local cluster.

1. The worker story: ``dcenter`` and two ``dworker`` processes (alice and
   bob) on 127.0.0.1, and the conversation of the worker docs: data put on
   alice and bob, alice computing ``add(x, a)`` with ``a`` fetched straight
   from bob, the center told who holds what.
2. The executor quickstart on an embedded local cluster (``Executor()``):
   map, submit on futures, gather, a task graph, an error coming back.

Everything stops at the end.
"""

import asyncio
import sys
import time
from operator import add

import numpy as np
import pandas as pd

from .core import rpc
from .process import popen, wait_for_line


def say(*args):
    print(*args, flush=True)


async def story(center_address, alice_address, bob_address):
    center = rpc(center_address)
    alice = rpc(alice_address)
    bob = rpc(bob_address)

    say("\n>>> alice.update_data(data={'x': np.arange(5), 'y': DataFrame})")
    say(await alice.update_data(data={"x": np.arange(5),
                                      "y": pd.DataFrame({"a": [1, 2, 3]})}))
    say(">>> alice.get_data(keys=['x', 'y'])")
    d = await alice.get_data(keys=["x", "y"])
    say(repr(d["x"]), "and a DataFrame of shape", d["y"].shape)
    say(">>> bob.update_data(data={'a': 10})")
    say(await bob.update_data(data={"a": 10}))
    say(">>> center.who_has()")
    say(await center.who_has())
    say(">>> alice.compute(function=add, keys=['x', 'a'])   # alice fetches 'a' from bob")
    response, metadata = await alice.compute(function=add, keys=["x", "a"], key="z")
    say(response, {k: metadata[k] for k in ("key", "nbytes", "type")})
    say(">>> alice.get_data(keys=['z'])")
    say(await alice.get_data(keys=["z"]))
    say(">>> center.who_has(keys=['a', 'z'])    # alice kept her result, not bob's 'a'")
    say(await center.who_has(keys=["a", "z"]))
    say(">>> center.delete_data(keys=['x', 'a'])")
    say(await center.delete_data(keys=["x", "a"]))
    say(">>> center.has_what()")
    say(await center.has_what())
    for r in (center, alice, bob):
        r.close_streams()


def square(x):
    return x ** 2


def neg(x):
    return -x


def inc(x):
    return x + 1


def div(x, y):
    return x / y


def quickstart():
    from .executor import Executor

    say("\n--- the executor on an embedded local cluster ---")
    say(">>> e = Executor()")
    with Executor() as e:
        say(e, e.ncores())
        say(">>> A = e.map(square, range(10)); B = e.map(neg, A)")
        A = e.map(square, range(10))
        B = e.map(neg, A)
        say(">>> total = e.submit(sum, B); total.result()")
        total = e.submit(sum, B)
        say(total.result())
        say(">>> e.gather(A)")
        say(e.gather(A))
        say(">>> e.get({'a': 1, 'b': (inc, 'a'), 'c': (add, 'a', 'b')}, 'c')")
        say(e.get({"a": 1, "b": (inc, "a"), "c": (add, "a", "b")}, "c"))
        say(">>> e.submit(div, 1, 0).result()")
        try:
            e.submit(div, 1, 0).result()
        except ZeroDivisionError as exc:
            say("ZeroDivisionError raised here, from the worker:", exc)
        say(">>> x = e.scatter(np.arange(1e6)); e.submit(np.sum, x).result()")
        x = e.scatter(np.arange(1e6))
        say(e.submit(np.sum, x).result())


def main():
    start = time.time()
    python = sys.executable
    with popen([python, "-m", "distributed.cli.dcenter", "--port", "0"]) as c:
        center_address = wait_for_line(c, "Start center at").split()[-1]
        say("center at", center_address)
        with popen([python, "-m", "distributed.cli.dworker", center_address,
                    "--name", "alice", "--ncores", "1"]) as a, \
             popen([python, "-m", "distributed.cli.dworker", center_address,
                    "--name", "bob", "--ncores", "1"]) as b:
            alice_address = wait_for_line(a, "Start worker at").split()[-1]
            bob_address = wait_for_line(b, "Start worker at").split()[-1]
            wait_for_line(a, "Registered with center")
            wait_for_line(b, "Registered with center")
            say("alice at", alice_address, "| bob at", bob_address)
            asyncio.run(story(center_address, alice_address, bob_address))
    quickstart()
    say("\ndemo finished in %.1f s; all processes stopped" % (time.time() - start))


if __name__ == "__main__":
    main()
