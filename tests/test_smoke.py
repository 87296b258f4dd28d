from operator import add

import pytest

from distributed.core import rpc
from distributed.utils_test import gen_cluster, popen, wait_for_line


@gen_cluster(ncores=[1, 1])
async def test_compute_fetches_from_peer(c, a, b):
    await rpc(a.address).update_data(data={"x": 1})
    await rpc(b.address).update_data(data={"a": 10})
    resp, meta = await rpc(a.address).compute(function=add, keys=["x", "a"])
    assert resp == b"OK"
    assert a.data[meta["key"]] == 11
    assert a.address in c.who_has[meta["key"]]


@pytest.mark.processes
def test_dcenter_starts():
    with popen(["dcenter", "--port", "0"]) as p:
        line = wait_for_line(p, "Start center at")
        assert line.startswith("Start center at 127.0.0.1:")
