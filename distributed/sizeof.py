"""``sizeof(obj)``: an estimate in bytes of a value, used for ``nbytes``.

::

    >>> sizeof(b'12345')
    5
    >>> import numpy as np
    >>> sizeof(np.zeros(1000))
    8000
"""

import sys
from functools import singledispatch

__all__ = ["sizeof"]


_lazy = {}  # top-level module name -> function registering its types


@singledispatch
def sizeof(obj):
    module = type(obj).__module__.partition(".")[0]
    register = _lazy.pop(module, None)
    if register is not None:  # first value of a numpy/pandas type: register them
        register()
        return sizeof(obj)
    try:
        return sys.getsizeof(obj)
    except Exception:  # some objects refuse
        return 100


@sizeof.register(bytes)
@sizeof.register(bytearray)
def _sizeof_bytes(obj):
    return len(obj)


@sizeof.register(memoryview)
def _sizeof_memoryview(obj):
    return obj.nbytes


@sizeof.register(list)
@sizeof.register(tuple)
@sizeof.register(set)
@sizeof.register(frozenset)
def _sizeof_container(obj):
    return sum(map(sizeof, obj))


@sizeof.register(dict)
def _sizeof_dict(obj):
    return sum(map(sizeof, obj.keys())) + sum(map(sizeof, obj.values()))


def _register_numpy():
    import numpy as np

    @sizeof.register(np.ndarray)
    def _sizeof_ndarray(x):
        return int(x.nbytes)

    @sizeof.register(np.generic)
    def _sizeof_scalar(x):
        return int(x.nbytes)


def _register_pandas():
    import pandas as pd

    @sizeof.register(pd.DataFrame)
    def _sizeof_frame(df):
        return int(df.memory_usage(index=True, deep=False).sum())

    @sizeof.register(pd.Series)
    def _sizeof_series(s):
        return int(s.memory_usage(index=True, deep=False))

    @sizeof.register(pd.Index)
    def _sizeof_index(i):
        return int(i.memory_usage(deep=False))


# registered on first use, so that importing this module does not import pandas
_lazy["numpy"] = _register_numpy
_lazy["pandas"] = _register_pandas
