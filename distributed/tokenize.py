"""``tokenize(*args, **kwargs)``: a deterministic hash of arguments.

Identical pure submissions get the same key, so they share one computation::

    >>> tokenize(1, 'a') == tokenize(1, 'a')
    True
    >>> tokenize(1, 'a') == tokenize(1, 'b')
    False

Values that cannot be hashed deterministically get a random token (so they
never collide with anything).
"""

import hashlib
import pickle
import uuid
from functools import singledispatch

import cloudpickle

try:  # ~30 GB/s against sha1's ~2: scattering a big array hashes all of it
    import xxhash

    def hash_buffer(buf):
        """Hex digest of a buffer's bytes (128-bit xxh3, sha1 without xxhash)."""
        return xxhash.xxh3_128_hexdigest(buf)
except ImportError:  # pragma: no cover
    def hash_buffer(buf):
        """Hex digest of a buffer's bytes (128-bit xxh3, sha1 without xxhash)."""
        return hashlib.sha1(buf).hexdigest()

__all__ = ["tokenize", "normalize_token", "hash_buffer"]

#: bytes and str longer than this are hashed rather than kept in the token
_INLINE = 1024


def tokenize(*args, **kwargs):
    data = normalize_token((args, kwargs) if kwargs else args)
    return hashlib.md5(repr(data).encode("utf-8", "surrogatepass")).hexdigest()


_ATOMS = (int, float, str, bytes, bool, complex, type(None), type(Ellipsis), slice, range)


@singledispatch
def normalize_token(o):
    method = getattr(o, "__dask_tokenize__", None)
    if method is not None:
        return method()
    if callable(o):
        return _normalize_function(o)
    try:
        return "pickle", hashlib.md5(pickle.dumps(o, protocol=5)).hexdigest()
    except Exception:
        return "random", uuid.uuid4().hex


for _t in _ATOMS:
    normalize_token.register(_t)(lambda o: o)


@normalize_token.register(bytes)
@normalize_token.register(bytearray)
@normalize_token.register(memoryview)
def _normalize_bytes(o):
    if len(o) <= _INLINE and type(o) is bytes:
        return o
    return type(o).__name__, hash_buffer(o)


@normalize_token.register(str)
def _normalize_str(o):
    if len(o) <= _INLINE:
        return o
    return "str", hash_buffer(o.encode("utf-8", "surrogatepass"))


@normalize_token.register(tuple)
@normalize_token.register(list)
def _normalize_seq(o):
    return type(o).__name__, [normalize_token(x) for x in o]


@normalize_token.register(dict)
def _normalize_dict(o):
    return "dict", sorted(((normalize_token(k), normalize_token(v)) for k, v in o.items()),
                          key=str)


@normalize_token.register(set)
@normalize_token.register(frozenset)
def _normalize_set(o):
    return type(o).__name__, sorted(map(str, map(normalize_token, o)))


_function_tokens = {}


def _normalize_function(func):
    try:
        return _function_tokens[func]
    except (KeyError, TypeError):
        pass
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if module and qualname and "<" not in qualname and module != "__main__":
        token = ("function", module, qualname)
    else:
        try:
            token = ("function", hashlib.md5(cloudpickle.dumps(func)).hexdigest())
        except Exception:
            token = ("random", uuid.uuid4().hex)
    try:
        if len(_function_tokens) > 10000:
            _function_tokens.clear()
        _function_tokens[func] = token
    except TypeError:
        pass
    return token


def _register_numpy():
    import numpy as np

    @normalize_token.register(np.ndarray)
    def _normalize_array(x):
        if x.dtype.hasobject:
            try:
                data = hashlib.md5(pickle.dumps(x, protocol=5)).hexdigest()
            except Exception:
                return "random", uuid.uuid4().hex
        else:
            data = hash_buffer(np.ascontiguousarray(x).view("u1").data)
        return "ndarray", x.shape, x.dtype.str, data

    @normalize_token.register(np.generic)
    def _normalize_scalar(x):
        return "npscalar", x.dtype.str, repr(x.item())


def _register_pandas():
    import pandas as pd

    def _hash(obj):
        values = pd.util.hash_pandas_object(obj, index=True).values
        return hash_buffer(values.view("u1").data)

    @normalize_token.register(pd.DataFrame)
    def _normalize_frame(df):
        return "DataFrame", list(map(str, df.columns)), list(map(str, df.dtypes)), _hash(df)

    @normalize_token.register(pd.Series)
    def _normalize_series(s):
        return "Series", str(s.name), str(s.dtype), _hash(s)

    @normalize_token.register(pd.Index)
    def _normalize_index(i):
        return "Index", str(i.dtype), _hash(i)


try:
    _register_numpy()
except ImportError:
    pass
try:
    _register_pandas()
except ImportError:
    pass
