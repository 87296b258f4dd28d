"""``tokenize(*args, **kwargs)``: a deterministic hash of arguments.

Identical pure submissions get the same key, so they share one computation::

    >>> tokenize(1, 'a') == tokenize(1, 'a')
    True
    >>> tokenize(1, 'a') == tokenize(1, 'b')
    False
    >>> tokenize(1) == tokenize(1.0) or tokenize({1}) == tokenize({'1'})
    False

The rule: **equal tokens only for values equal in type and content**; when
unsure, be different, never the same.  ``normalize_token`` turns a value into
a tagged, nested tuple of plain atoms whose ``repr`` is hashed.  It
dispatches on the *exact* type (``type(o) is dict``, never a subclass) for the
types it understands completely: builtins, functions and methods, numpy and
pandas objects.  Anything else (subclasses included) is hashed through its
pickle, which names its type and holds its content; an object that cannot be
pickled gets a random token, so it never collides with anything.
"""

import hashlib
import logging
import marshal
import pickle
import sys
import threading
import types
import uuid
from collections import Counter, OrderedDict
from functools import partial

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

logger = logging.getLogger(__name__)

__all__ = ["tokenize", "normalize_token", "hash_buffer", "Normalized", "by_reference"]

#: bytes and str longer than this are hashed rather than kept in the token
_INLINE = 1024
#: ints longer than this many bits are hashed (their repr may be refused)
_INT_BITS = 8192


def tokenize(*args, **kwargs):
    try:
        data = normalize_token((args, kwargs) if kwargs else args)
    except Exception:  # a cycle (RecursionError), a hostile object: never the same
        logger.debug("random token for an argument that does not normalize", exc_info=True)
        data = _random()
    return hashlib.md5(repr(data).encode("utf-8", "surrogatepass")).hexdigest()


# Token grammar: an atom (exact int, float, bool, complex, str, bytes, None),
# whose reprs never coincide across these types, or a tuple whose first item
# is a tag string naming what follows.  Only normalizers build tuples, so the
# repr of a token is unambiguous.

_normalizers = {}
_lazy = {}  # top-level module name -> function registering its types
_lazy_lock = threading.RLock()


def normalize_token(o):
    """The token of ``o``: equal only for ``o`` equal in type and content."""
    t = type(o)
    f = _normalizers.get(t)
    if f is None:
        f = _lookup(t)
    return f(o)


def _register(*types_):
    def decorator(f):
        for t in types_:
            _normalizers[t] = f
        return f
    return decorator


#: ``@normalize_token.register(T)`` normalizes objects of exactly type ``T``
normalize_token.register = _register


def _lookup(t):
    package = (getattr(t, "__module__", None) or "").partition(".")[0]
    if package in _lazy:
        with _lazy_lock:  # a second thread must not miss half the registrations
            register = _lazy.pop(package, None)
            if register is not None:
                try:
                    register()
                except ImportError:  # pragma: no cover
                    pass
        f = _normalizers.get(t)
        if f is not None:
            return f
    return _normalize_object


def _random():
    return ("random", uuid.uuid4().hex)


def _type_name(t):
    return "%s.%s" % (getattr(t, "__module__", None), getattr(t, "__qualname__", None))


# -- builtins -------------------------------------------------------------------------


@_register(float, bool, complex, type(None), type(Ellipsis), type(NotImplemented))
def _identity(o):
    return o


@_register(int)
def _normalize_int(o):
    if o.bit_length() <= _INT_BITS:
        return o
    nbytes = (o.bit_length() + 8) // 8
    return ("bigint", hash_buffer(o.to_bytes(nbytes, "little", signed=True)))


@_register(str)
def _normalize_str(o):
    if len(o) <= _INLINE:
        return o
    return ("str", hash_buffer(o.encode("utf-8", "surrogatepass")))


@_register(bytes)
def _normalize_bytes(o):
    if len(o) <= _INLINE:
        return o
    return ("bytes", hash_buffer(o))


@_register(bytearray)
def _normalize_bytearray(o):
    return ("bytearray", hash_buffer(o))


@_register(memoryview)
def _normalize_memoryview(o):
    data = o if o.c_contiguous else o.tobytes()
    return ("memoryview", o.format, o.shape, o.readonly, hash_buffer(data))


_ATOMS = {float, bool, type(None)}


def _normalize_items(seq):
    # the common atoms inline: lists of a million numbers stay fast
    atoms = _ATOMS
    out = []
    append = out.append
    for x in seq:
        t = type(x)
        if t in atoms or (t is int and -(1 << 62) < x < (1 << 62)):
            append(x)
        else:
            append(normalize_token(x))
    return tuple(out)


@_register(tuple)
def _normalize_tuple(o):
    return ("tuple", _normalize_items(o))


@_register(list)
def _normalize_list(o):
    return ("list", _normalize_items(o))


def _sorted_tokens(tokens):
    """Sort tokens by their repr: a deterministic order for unordered things."""
    return tuple(sorted(tokens, key=repr))


@_register(set)
def _normalize_set(o):
    return ("set", _sorted_tokens(_normalize_items(o)))


@_register(frozenset)
def _normalize_frozenset(o):
    return ("frozenset", _sorted_tokens(_normalize_items(o)))


@_register(dict)
def _normalize_dict(o):
    # dict equality ignores order, so the token does too
    return ("dict", _sorted_tokens(zip(_normalize_items(o), _normalize_items(o.values()))))


@_register(Counter)
def _normalize_counter(o):
    return ("Counter", _sorted_tokens(zip(_normalize_items(o), _normalize_items(o.values()))))


@_register(OrderedDict)
def _normalize_ordered_dict(o):
    # OrderedDict equality respects order, so the token does too
    return ("OrderedDict", _normalize_items(o), _normalize_items(o.values()))


@_register(slice)
def _normalize_slice(o):
    return ("slice", normalize_token(o.start), normalize_token(o.stop), normalize_token(o.step))


@_register(range)
def _normalize_range(o):
    return ("range", o.start, o.stop, o.step)


# -- functions ------------------------------------------------------------------------


def by_reference(obj):
    """True if pickle sends ``obj`` (a function or class) by its name alone.

    That is the case when ``module.qualname`` finds this very object and the
    module is not ``__main__`` (whose names differ from script to script).
    Such objects' tokens and pickles may be cached; anything else is sent by
    value, and its globals may change between calls.
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return False
    if module == "__main__" or "<" in qualname:
        return False
    found = sys.modules.get(module)
    if found is None:  # not imported here: do not import it for a token
        return False
    try:
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        return False
    return found is obj


_code_digests = {}


def _code_digest(code):
    try:
        return _code_digests[code]
    except KeyError:
        pass
    try:
        digest = hashlib.md5(marshal.dumps(code)).hexdigest()
    except Exception:  # pragma: no cover
        digest = uuid.uuid4().hex
    if len(_code_digests) > 10000:
        _code_digests.clear()
    _code_digests[code] = digest
    return digest


@_register(types.FunctionType)
def _normalize_function(func):
    if by_reference(func):
        # the code digest tells apart two versions of a module (two executors)
        return ("function", func.__module__, func.__qualname__, _code_digest(func.__code__),
                normalize_token(func.__defaults__), normalize_token(func.__kwdefaults__))
    return _normalize_pickle(func, cloudpickle.dumps)


@_register(type)
def _normalize_type(t):
    if by_reference(t):
        return ("type", t.__module__, t.__qualname__)
    return _normalize_pickle(t, cloudpickle.dumps)


@_register(types.MethodType)
def _normalize_method(m):
    return ("method", normalize_token(m.__func__), normalize_token(m.__self__))


@_register(types.BuiltinFunctionType, types.MethodWrapperType)
def _normalize_builtin(f):
    owner = getattr(f, "__self__", None)
    if owner is None or isinstance(owner, types.ModuleType):
        if by_reference(f):
            return ("builtin", f.__module__, f.__qualname__)
        return _normalize_object(f)
    # a bound method of a builtin type, like [1].append or (1).__add__
    return ("builtin-method", _type_name(type(owner)), f.__name__, normalize_token(owner))


@_register(partial)
def _normalize_partial(p):
    return ("partial", normalize_token(p.func), normalize_token(p.args),
            normalize_token(p.keywords))


# -- everything else ------------------------------------------------------------------


def _normalize_object(o):
    method = getattr(o, "__dask_tokenize__", None)
    if method is not None and not isinstance(o, type):
        # the class promises a token of its content; its name keeps types apart
        return ("__dask_tokenize__", _type_name(type(o)), normalize_token(method()))
    return _normalize_pickle(o)


def _normalize_pickle(o, dumps=None):
    """The hash of ``o``'s pickle (it names the type and holds the content).

    Out-of-band buffers (numpy arrays inside objects) are hashed apart, at
    memory speed.  Objects of ``__main__`` are pickled by value: two scripts
    may name different things alike.  A random token if nothing pickles.
    """
    buffers = []
    for dumps_ in ([dumps] if dumps else [pickle.dumps, cloudpickle.dumps]):
        del buffers[:]
        try:
            data = dumps_(o, protocol=5, buffer_callback=buffers.append)
        except Exception:
            continue
        if dumps_ is pickle.dumps and b"__main__" in data:
            continue
        try:
            return ("pickle", _type_name(type(o)), hash_buffer(data),
                    tuple(hash_buffer(b.raw()) for b in buffers))
        except Exception:  # a buffer that is not contiguous
            continue
    return _random()


class Normalized:
    """A value whose token is computed once: ``tokenize(Normalized(f), x) == tokenize(f, x)``.

    For ``map``, which tokenizes the same function with many arguments.
    """

    __slots__ = ("token",)

    def __init__(self, obj):
        self.token = normalize_token(obj)


_register(Normalized)(lambda o: o.token)


# -- numpy ----------------------------------------------------------------------------


def _register_numpy():
    import numpy as np

    # kinds whose bytes are their content (no pointers, no objects)
    raw_kinds = set("biufcmMSUV")

    def dtype_token(dt):
        # empty metadata is none: numpy < 2.3 gives a deep copy of '<M8[ns]' a {}
        if dt.fields is None and dt.subdtype is None and not dt.metadata:
            return ("dtype", dt.str)  # '<f8', '<M8[ns]', '<U3', ...
        # structured ('|V8' alone would drop the field names), subarray, metadata
        sub = dt.subdtype and (dtype_token(dt.subdtype[0]), dt.subdtype[1])
        return ("dtype", dt.str, repr(dt.descr), dt.names, dt.itemsize, dt.isalignedstruct, sub,
                _normalize_pickle(dt) if dt.metadata else None)

    def content(x):
        dt = x.dtype
        if dt.kind in raw_kinds and not dt.hasobject and dt.itemsize:
            try:
                data = np.ascontiguousarray(x).reshape(-1).view("u1")
                return hash_buffer(data)
            except Exception:
                pass
        if dt.hasobject and dt.fields is None:
            return ("items", _normalize_items(x.flat))
        return _normalize_pickle(np.ascontiguousarray(x))

    @_register(np.ndarray)
    def _normalize_array(x):
        return ("ndarray", x.shape, dtype_token(x.dtype), content(x))

    @_register(np.ma.MaskedArray)
    def _normalize_masked(x):
        return ("MaskedArray", _normalize_array(x.data),
                _normalize_array(np.ma.getmaskarray(x)),
                normalize_token(x.fill_value), bool(x.hardmask))

    def _normalize_scalar(x):
        if x.dtype.hasobject:
            return _normalize_pickle(x)
        return ("npscalar", _type_name(type(x)), dtype_token(x.dtype), x.tobytes())

    scalars = {t for t in np.sctypeDict.values() if issubclass(t, np.generic)}
    scalars.update([np.datetime64, np.timedelta64, np.void, np.bytes_, np.str_, np.bool_])
    _register(*scalars)(_normalize_scalar)
    _register(*{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUVOMm"})(dtype_token)


_lazy["numpy"] = _register_numpy


# -- pandas ---------------------------------------------------------------------------


def _register_pandas():
    import numpy as np
    import pandas as pd

    _register_numpy_if_needed()
    normalize = normalize_token

    def attrs(obj):
        return normalize(dict(obj.attrs)) if getattr(obj, "attrs", None) else None

    @_register(pd.CategoricalDtype)
    def _normalize_categorical_dtype(dt):
        categories = dt.categories
        return ("CategoricalDtype", None if categories is None else normalize(categories),
                dt.ordered)

    def _normalize_extension_dtype(dt):
        # ``_metadata`` names the attributes that define a pandas dtype's
        # equality (pickles of dtypes carry caches, so they vary)
        return ("ExtensionDtype", _type_name(type(dt)),
                tuple((a, normalize(getattr(dt, a))) for a in dt._metadata))

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    _register(*[t for t in subclasses(pd.api.extensions.ExtensionDtype)
                if t.__module__.partition(".")[0] == "pandas" and isinstance(t._metadata, tuple)
                and t is not pd.CategoricalDtype])(_normalize_extension_dtype)

    @_register(pd.Categorical)
    def _normalize_categorical(c):
        return ("Categorical", normalize(c.dtype), normalize(c.codes))

    @_register(pd.arrays.IntegerArray, pd.arrays.FloatingArray, pd.arrays.BooleanArray)
    def _normalize_masked_array(a):
        return ("MaskedEA", _type_name(type(a)), normalize(a.dtype), normalize(a._data),
                normalize(a._mask))

    @_register(pd.arrays.NumpyExtensionArray, pd.arrays.StringArray)
    def _normalize_numpy_ea(a):
        return ("NumpyEA", _type_name(type(a)), normalize(a.dtype), normalize(a._ndarray))

    @_register(pd.arrays.DatetimeArray, pd.arrays.TimedeltaArray, pd.arrays.PeriodArray)
    def _normalize_datetimelike(a):
        return ("DatetimeLikeEA", _type_name(type(a)), normalize(a.dtype),
                normalize(a._ndarray), normalize(getattr(a, "freq", None)))

    @_register(pd.arrays.ArrowExtensionArray, pd.arrays.ArrowStringArray)
    def _normalize_arrow(a):
        # pickles of arrow arrays change with their chunking: hash the content
        data = a._pa_array.combine_chunks()
        if data.offset == 0 and data.type.num_fields == 0 and not hasattr(data, "dictionary"):
            content = tuple(None if b is None else hash_buffer(b) for b in data.buffers())
        else:
            content = ("items", _normalize_items(data.to_pylist()))
        return ("ArrowEA", _type_name(type(a)), normalize(a.dtype), str(data.type), len(data),
                data.null_count, content)

    @_register(pd.arrays.SparseArray)
    def _normalize_sparse(a):
        return ("SparseArray", normalize(a.dtype), len(a), normalize(a.sp_values),
                normalize(np.asarray(a.sp_index.indices)))

    @_register(type(pd.NA))
    def _normalize_na(na):
        return ("pd.NA",)

    def index_values(i):
        return normalize(i._values)

    @_register(pd.Index, pd.DatetimeIndex, pd.TimedeltaIndex, pd.PeriodIndex,
               pd.CategoricalIndex, pd.IntervalIndex)
    def _normalize_index(i):
        freq = getattr(i, "freq", None)
        return ("Index", _type_name(type(i)), normalize(i.name), normalize(i.dtype),
                index_values(i), normalize(freq))

    @_register(pd.RangeIndex)
    def _normalize_range_index(i):
        return ("RangeIndex", normalize(i.name), i.start, i.stop, i.step)

    @_register(pd.MultiIndex)
    def _normalize_multiindex(i):
        return ("MultiIndex", normalize(list(i.names)),
                tuple(normalize(level) for level in i.levels),
                tuple(normalize(np.asarray(c)) for c in i.codes), i.sortorder)

    @_register(pd.Series)
    def _normalize_series(s):
        return ("Series", normalize(s.name), normalize(s.dtype), normalize(s._values),
                normalize(s.index), attrs(s))

    @_register(pd.DataFrame)
    def _normalize_frame(df):
        try:
            columns = [df._mgr.iget_values(i) for i in range(df.shape[1])]
        except Exception:  # pragma: no cover - pandas internals moved
            columns = [df.iloc[:, i]._values for i in range(df.shape[1])]
        return ("DataFrame", normalize(df.columns), normalize(df.index),
                tuple((normalize(c.dtype), normalize(c)) for c in columns), attrs(df))


def _register_numpy_if_needed():
    with _lazy_lock:
        register = _lazy.pop("numpy", None)
        if register is not None:
            register()


_lazy["pandas"] = _register_pandas
