"""tokenize: equal tokens only for values equal in type and content.

The tests marked ``pure`` start no cluster (one short subprocess at most):
``python -m pytest -m pure``.  The last ones send the same look-alike pairs
through submit, map and scatter on a real LocalCluster (the ``e`` fixture
of conftest.py).
"""

import copy
import functools
import math
import os
import pathlib
import subprocess
import sys
import warnings
from collections import Counter, OrderedDict, defaultdict, deque

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distributed.tokenize import Normalized, by_reference, normalize_token, tokenize
from distributed.utils_test import TESTS_DIR, child_env

pure = pytest.mark.pure

SETTINGS = settings(max_examples=int(os.environ.get("TOKENIZE_EXAMPLES", 150)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# same(a, b): strict equality of type and content


def same(a, b):
    """True if ``a`` and ``b`` are equal in type and content, strictly.

    Stricter than ``==``: ``1`` and ``1.0``, ``0.0`` and ``-0.0``, ``None``
    and ``nan``, ``dict`` and ``Counter`` all differ; NaN is the same as NaN.
    """
    t = type(a)
    if t is not type(b):
        return False
    if a is b:
        return True
    if t is float:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if t is complex:
        return same(a.real, b.real) and same(a.imag, b.imag)
    if t in (list, tuple):
        return len(a) == len(b) and all(map(same, a, b))
    if t is OrderedDict:
        return same(list(a.items()), list(b.items()))
    if t in (dict, Counter):
        return same_unordered(list(a.items()), list(b.items()))
    if t in (set, frozenset):
        return same_unordered(list(a), list(b))
    if t is np.ma.MaskedArray:
        return (same(a.data, b.data) and same(np.ma.getmaskarray(a), np.ma.getmaskarray(b))
                and same(a.fill_value, b.fill_value))
    if t is np.ndarray:
        return same_array(a, b)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.dtype.descr == b.dtype.descr and a.tobytes() == b.tobytes()
    if t is pd.DataFrame:
        pd.testing.assert_frame_equal(a, b, check_exact=True, check_column_type=True,
                                      check_index_type=True, check_names=True)
        return (same(a.columns, b.columns) and same(a.index, b.index)
                and all(same(a.iloc[:, i], b.iloc[:, i]) for i in range(a.shape[1])))
    if t is pd.Series:
        pd.testing.assert_series_equal(a, b, check_exact=True, check_index_type=True)
        return (same(a.name, b.name) and a.dtype == b.dtype and same_values(a._values, b._values)
                and same(a.index, b.index))
    if t is pd.MultiIndex:
        return (same(list(a.names), list(b.names)) and same(list(a.levels), list(b.levels))
                and same([np.asarray(c) for c in a.codes], [np.asarray(c) for c in b.codes]))
    if isinstance(a, pd.Index):
        pd.testing.assert_index_equal(a, b, exact=True, check_exact=True, check_names=True)
        return same(a.name, b.name) and a.dtype == b.dtype and same_values(a._values, b._values)
    if isinstance(a, pd.api.extensions.ExtensionArray):
        return same_values(a, b)
    return a == b


def same_unordered(xs, ys):
    if len(xs) != len(ys):
        return False
    ys = list(ys)
    for x in xs:
        for i, y in enumerate(ys):
            if same(x, y):
                del ys[i]
                break
        else:
            return False
    return True


def same_array(a, b):
    if a.dtype != b.dtype or a.dtype.descr != b.dtype.descr or a.shape != b.shape:
        return False
    if a.dtype.hasobject:
        return same(a.ravel().tolist(), b.ravel().tolist())
    # bytes, not ==: tells 0.0 from -0.0, and NaN is the same as NaN
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def same_values(a, b):
    """Same type, dtype and elements (pandas' missing values not merged)."""
    if type(a) is not type(b) or a.dtype != b.dtype or str(a.dtype) != str(b.dtype):
        return False
    if isinstance(a, np.ndarray):
        return same_array(a, b)
    if isinstance(a, pd.Categorical):
        return (same(a.categories, b.categories) and a.ordered == b.ordered
                and same_array(a.codes, b.codes))
    if len(a) != len(b):
        return False
    return all(same(x, y) for x, y in zip(a.astype(object), b.astype(object)))


# ---------------------------------------------------------------------------
# strategies: small universes, so that near-equal pairs come up often


atoms = st.one_of(
    st.sampled_from([0, 1, -1, 2 ** 70, True, False, None, 0.0, -0.0, 1.0, math.nan,
                     math.inf, -math.inf, 1j, 0j, "", "1", "a", "nan", "None", b"", b"1",
                     b"a", bytearray(b"1"), Ellipsis]),
    st.integers(-3, 3),
    st.text(max_size=3),
    st.floats(),
)
hashables = st.recursive(
    atoms.filter(lambda x: type(x) is not bytearray),
    lambda children: st.one_of(
        st.tuples(children, children),
        st.frozensets(children, max_size=3),
    ),
    max_leaves=6,
)


def containers(children):
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.sets(hashables, max_size=3),
        st.frozensets(hashables, max_size=3),
        st.dictionaries(hashables, children, max_size=3),
        st.dictionaries(hashables, children, max_size=3).map(OrderedDict),
        st.dictionaries(st.sampled_from(["a", "b", 1]), st.integers(-1, 2),
                        max_size=3).map(Counter),
    )


builtins = st.recursive(atoms, containers, max_leaves=8)

DTYPES = ["i8", "i4", "u1", "f8", "f4", "c16", "?", "U2", "S2", "M8[s]", "M8[ms]",
          "m8[ns]", [("a", "i4"), ("b", "f4")], [("x", "i4"), ("b", "f4")],
          [("a", "f4"), ("b", "i4")]]
ELEMENTS = [0, 1, -1, 0.0, -0.0, math.nan, 1.5, "1", ""]


@st.composite
def numeric_arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    n = draw(st.integers(0, 3))
    raw = draw(st.lists(st.sampled_from([0, 1, 255]), min_size=n * dtype.itemsize,
                        max_size=n * dtype.itemsize))
    x = np.frombuffer(bytes(raw), dtype=dtype).copy()
    if draw(st.booleans()) and n == 2:
        x = x.reshape(2, 1)
    if draw(st.booleans()) and dtype.kind == "f" and n:
        x[0] = draw(st.sampled_from([0.0, -0.0, math.nan]))
    return x


@st.composite
def object_arrays(draw):
    items = draw(st.lists(st.one_of(atoms, st.lists(atoms, max_size=2)), max_size=3))
    x = np.empty(len(items), dtype=object)
    x[:] = items
    return x


@st.composite
def masked_arrays(draw):
    data = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3))
    mask = draw(st.lists(st.booleans(), min_size=len(data), max_size=len(data)))
    fill = draw(st.sampled_from([None, 0, 7]))
    return np.ma.MaskedArray(np.array(data, dtype=draw(st.sampled_from(["i8", "f8"]))),
                             mask=mask, fill_value=fill)


arrays = st.one_of(numeric_arrays(), object_arrays(), masked_arrays(),
                   st.sampled_from([np.float64(0.0), np.float64(-0.0), np.int64(1),
                                    np.int32(1), np.datetime64(1, "s"),
                                    np.datetime64(1, "ms"), np.str_("1")]))

PD_DTYPES = [None, object, "float64", "int64", "Int64", "Int32", "Float64", "boolean",
             "string", "str", "category", "datetime64[ns]"]
LABELS = [None, 0, 1, "1", "a", 1.0]


def _build(factory):
    try:
        return factory()
    except (TypeError, ValueError):
        assume(False)


@st.composite
def series(draw):
    values = draw(st.lists(st.sampled_from(ELEMENTS + [None, "a"]), max_size=3))
    dtype = draw(st.sampled_from(PD_DTYPES))
    name = draw(st.sampled_from(LABELS))
    index = draw(st.sampled_from([None, "labels"]))
    if index:
        index = draw(st.lists(st.sampled_from(LABELS[1:]), min_size=len(values),
                              max_size=len(values)))
    return _build(lambda: pd.Series(values, dtype=dtype, name=name, index=index))


@st.composite
def frames(draw):
    columns = draw(st.lists(st.sampled_from(LABELS[1:]), max_size=3, unique_by=repr))
    n = draw(st.integers(0, 2))
    data = {}
    for c in columns:
        s = draw(series())
        assume(len(s) >= n)
        data[c] = s.iloc[:n].reset_index(drop=True)
    if not data:
        return pd.DataFrame(index=pd.RangeIndex(n))
    return _build(lambda: pd.DataFrame(data))


@st.composite
def indexes(draw):
    kind = draw(st.sampled_from(["index", "range", "multi"]))
    name = draw(st.sampled_from(LABELS))
    if kind == "range":
        return pd.RangeIndex(draw(st.integers(0, 2)), name=name)
    values = draw(st.lists(st.sampled_from(ELEMENTS + [None]), max_size=3))
    if kind == "multi":
        return _build(lambda: pd.MultiIndex.from_arrays(
            [values, values[::-1]], names=[name, draw(st.sampled_from(LABELS))]))
    return _build(lambda: pd.Index(values, dtype=draw(st.sampled_from(PD_DTYPES)), name=name))


@st.composite
def categoricals(draw):
    categories = draw(st.lists(st.sampled_from(["a", "b", 1, "1"]), min_size=1, max_size=3,
                               unique_by=repr))
    values = draw(st.lists(st.sampled_from(categories + [None]), max_size=3))
    return _build(lambda: pd.Categorical(values, categories=categories,
                                         ordered=draw(st.booleans())))


pandas_objects = st.one_of(series(), frames(), indexes(), categoricals(),
                           series().map(lambda s: s.array))
anything = st.one_of(builtins, arrays, pandas_objects)


# twins: a value and a look-alike of it (equal under ==, or printed alike, or
# only reordered), where a careless tokenize gives equal tokens


def atom_twins(x):
    out = [x, copy.copy(x)]
    t = type(x)
    if t in (int, bool, float, complex):
        out += [str(x), repr(x).encode(), complex(x)]
        if t is not complex:
            out += [float(x)]
            if math.isfinite(x):
                out += [int(x), bool(x), -x, np.float64(x)]
    if x is None:
        out += [math.nan, "None", (), pd.NA]
    if t is str:
        out += [x.encode("utf-8", "surrogatepass"), np.str_(x)]
        if x.isdigit() and x.isascii():
            out += [int(x), float(x)]
    if t in (bytes, bytearray):
        out += [bytes(x), bytearray(x), x.decode("latin1")]
    return out


def twin(x):
    """A strategy for look-alikes of ``x``."""
    t = type(x)
    if t in (list, tuple):
        parts = st.tuples(*[twin(v) for v in x])
        return st.one_of(parts.map(list), parts, parts.map(deque))
    if t in (set, frozenset):
        parts = st.tuples(*[twin_hashable(v) for v in sorted(x, key=repr)])  # a fixed order
        return st.one_of(parts.map(set), parts.map(frozenset), parts.map(list),
                         st.just(t(reversed(list(x)))))
    if t in (dict, OrderedDict, Counter):
        pairs = st.tuples(*[st.tuples(twin_hashable(k), twin(v)) for k, v in x.items()])
        wrap = st.sampled_from([dict, OrderedDict, lambda p: Counter(dict(p)),
                                lambda p: defaultdict(int, p)])
        return st.builds(lambda w, p, rev: w(p[::-1] if rev else p), wrap, pairs, st.booleans())
    return st.sampled_from(atom_twins(x))


def twin_hashable(x):
    return twin(x).filter(lambda y: _hashable(y))


def _hashable(y):
    try:
        hash(y)
        return True
    except TypeError:
        return False


def array_twins(x):
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lossy casts are the point
        return _array_twins(x)


def _array_twins(x):
    out = [x.copy()]
    if isinstance(x, np.ndarray) and x.dtype.names is None and x.dtype.kind != "O":
        for dt in ["i8", "i4", "f8", "f4", "?", "O", "U3", "M8[s]", "M8[ms]", "m8[ns]"]:
            try:
                out.append(x.astype(dt))
            except Exception:  # e.g. raw bytes that are no valid code points
                pass
        if x.dtype.itemsize == 8:
            out.append(x.view("M8[ms]" if x.dtype.kind != "M" else "i8"))
        if x.size and x.dtype.kind == "f":
            y = x.copy()
            y.flat[0] = -y.flat[0]
            out.append(y)
        out.append(np.ma.MaskedArray(x))
    if isinstance(x, np.ma.MaskedArray):
        out += [x.data, np.ma.MaskedArray(x.data, mask=~np.ma.getmaskarray(x)),
                np.ma.MaskedArray(x.data, mask=np.ma.getmaskarray(x), fill_value=1)]
    elif isinstance(x, np.ndarray):
        if x.dtype.names:
            out.append(x.view([("z%d" % i, x.dtype.fields[n][0])
                               for i, n in enumerate(x.dtype.names)]))
            out.append(x.view("V%d" % x.dtype.itemsize))
        if x.dtype.kind == "O":
            out.append(np.array([atom_twins(v)[-1] if type(v) is not list else v
                                 for v in x.tolist()] + [None], dtype=object)[:-1])
        out.append(x.reshape(-1, 1) if x.ndim == 1 else x.ravel())
    if isinstance(x, np.generic):
        out += [x.item()] + [x.astype(dt) for dt in ["i8", "i4", "f8", "f4"]
                             if x.dtype.kind in "iuf"]
    return out


def pandas_twins(x):
    out = [x.copy()]

    def attempt(f):
        try:
            out.append(f())
        except Exception:
            pass

    for dt in PD_DTYPES[1:]:
        attempt(lambda: x.astype(dt))
    if isinstance(x, (pd.Series, pd.Index)):
        for name in LABELS:
            attempt(lambda: x.rename(name))
        attempt(lambda: x.astype(object).map(lambda v: atom_twins(v)[2]))
    if isinstance(x, pd.Series):
        attempt(lambda: x.set_axis(x.index.astype(str)))
        attempt(lambda: x.set_axis(x.index.astype(float)))
        attempt(lambda: x.set_axis(pd.Index(list(x.index), dtype=object)))
        attempt(lambda: x.astype(object).where(x.notna(), None))
        attempt(lambda: x.astype(object).where(x.notna(), math.nan))
        attempt(lambda: -x)
    if isinstance(x, pd.DataFrame):
        attempt(lambda: x.set_axis([str(c) for c in x.columns], axis=1))
        attempt(lambda: x.set_axis([atom_twins(c)[-1] for c in x.columns], axis=1))
        attempt(lambda: x.iloc[:, ::-1])
        attempt(lambda: x.astype(object))
        attempt(lambda: x.astype(object).where(x.notna(), None))
        attempt(lambda: -x)
    if isinstance(x, (pd.Categorical, pd.CategoricalIndex)):
        attempt(lambda: x.reorder_categories(x.categories[::-1]))
        attempt(lambda: x.set_ordered(not x.ordered))
        attempt(lambda: x.add_categories(["zz"]))
        attempt(lambda: x.rename_categories([str(c) + "" if type(c) is not str else c + " "
                                             for c in x.categories]))
    if isinstance(x, pd.MultiIndex):
        attempt(lambda: x.set_names([str(n) for n in x.names]))
        attempt(lambda: x.to_flat_index())
    if isinstance(x, pd.api.extensions.ExtensionArray):
        attempt(lambda: np.asarray(x))
        attempt(lambda: pd.array(np.asarray(x, dtype=object), dtype=object))
    return out


@st.composite
def twin_pairs(draw, strategy):
    a = draw(strategy)
    if isinstance(a, (np.ndarray, np.generic)):
        b = draw(st.sampled_from(array_twins(a)))
    elif type(a).__module__.startswith("pandas"):
        b = draw(st.sampled_from(pandas_twins(a)))
    else:
        b = draw(twin(a))
    return a, b


# ---------------------------------------------------------------------------
# properties


def check_pair(a, b):
    if tokenize(a) == tokenize(b):
        assert type(a) is type(b), (a, b)
        assert same(a, b), (a, b)


@pure
@SETTINGS
@given(twin_pairs(builtins))
def test_builtins_equal_tokens_only_for_same_values(pair):
    check_pair(*pair)


@pure
@SETTINGS
@given(twin_pairs(arrays))
def test_numpy_equal_tokens_only_for_same_values(pair):
    check_pair(*pair)


@pure
@SETTINGS
@given(twin_pairs(pandas_objects))
def test_pandas_equal_tokens_only_for_same_values(pair):
    check_pair(*pair)


@pure
@SETTINGS
@given(anything, anything)
def test_mixed_equal_tokens_only_for_same_values(a, b):
    check_pair(a, b)


@pure
@SETTINGS
@given(anything)
def test_deterministic(x):
    assert tokenize(x) == tokenize(x)
    assert tokenize(x) == tokenize(copy.deepcopy(x))
    assert tokenize(x) == tokenize(Normalized(x))


@pure
@SETTINGS
@given(st.dictionaries(hashables, builtins, max_size=4))
def test_dict_and_set_order_do_not_matter(d):
    assert tokenize(d) == tokenize(dict(reversed(list(d.items()))))
    assert tokenize(set(d)) == tokenize(set(reversed(list(d))))
    od = OrderedDict(d)
    if len(od) > 1:
        assert tokenize(od) != tokenize(OrderedDict(reversed(list(od.items()))))


@pure
@pytest.mark.processes
def test_stable_across_processes():
    code = ("from distributed.tokenize import tokenize\n"
            "from tests.test_tokenize import PLAIN\n"
            "print(tokenize(PLAIN))")
    root = os.path.dirname(TESTS_DIR)
    env = child_env(PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, timeout=50,
                         check=True, capture_output=True, text=True).stdout
    assert out.strip() == tokenize(PLAIN)


PLAIN = [1, 1.5, -0.0, "a", b"b", None, True, {"a", "b", "c", 1}, frozenset({"x"}),
         {"k": [1, 2], "j": {3}}, OrderedDict(b=1, a=2), Counter("hello"),
         np.arange(5.0), np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
         pd.DataFrame({"a": [1, 2], 1: ["x", None]}), pd.Series([1.0, None], name="s")]


# ---------------------------------------------------------------------------
# the pairs of issue #8, one by one


class Model:
    def __init__(self, w):
        self.w = w

    def predict(self, x):
        return self.w * x


def _masked(mask):
    return np.ma.array([1, 2], mask=mask)


PAIRS = {
    "bound methods": (Model(2).predict, Model(10).predict),
    "Path methods": (pathlib.Path("/etc").exists, pathlib.Path("/x").exists),
    "builtin methods": ([1].append, [2].append),
    "partial": (functools.partial(int, base=2), functools.partial(int, base=8)),
    "set of int/str": ({1}, {"1"}),
    "frozenset": (frozenset({1}), frozenset({"1"})),
    "OrderedDict order": (OrderedDict(a=1, b=2), OrderedDict(b=2, a=1)),
    "dict/Counter": ({"a": 1}, Counter(a=1)),
    "dict/defaultdict": ({"a": 1}, defaultdict(int, a=1)),
    "list/deque": ([1], deque([1])),
    "1/1.0": (1, 1.0),
    "1/True": (1, True),
    "str/bytes": ("1", b"1"),
    "bytes/bytearray": (b"1", bytearray(b"1")),
    "0.0/-0.0": (0.0, -0.0),
    "None/nan": (None, math.nan),
    "str 'None'/None": ("None", None),
    "list/tuple": ([1], (1,)),
    "masked array mask": (_masked([0, 1]), _masked([1, 0])),
    "masked/plain array": (_masked([0, 0]), np.array([1, 2])),
    "masked fill_value": (np.ma.array([1], fill_value=1), np.ma.array([1], fill_value=2)),
    "structured field names": (np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
                               np.zeros(2, dtype=[("x", "i4"), ("b", "f4")])),
    "object array": (np.array([1], dtype=object), np.array(["1"], dtype=object)),
    "object array None/nan": (np.array([None], dtype=object),
                              np.array([math.nan], dtype=object)),
    "float array sign": (np.array([0.0]), np.array([-0.0])),
    "datetime units": (np.array([1], dtype="M8[s]"), np.array([1], dtype="M8[ms]")),
    "numpy scalars": (np.int64(1), np.int32(1)),
    "subarray dtypes": (np.dtype(("i4", (2,))), np.dtype(("f4", (2,)))),
    "nested field shapes": (np.zeros(1, dtype=[("a", "i4", (2,))]),
                            np.zeros(1, dtype=[("a", "i4", (1, 2))])),
    "numpy/python float": (np.float64(1.0), 1.0),
    "column labels": (pd.DataFrame({1: [1]}), pd.DataFrame({"1": [1]})),
    "Series names": (pd.Series([1], name="a"), pd.Series([1], name="b")),
    "Series name 1/'1'": (pd.Series([1], name=1), pd.Series([1], name="1")),
    "Index names": (pd.Index([1], name="a"), pd.Index([1], name="b")),
    "index labels": (pd.Series([1], index=[1]), pd.Series([1], index=["1"])),
    "categories": (pd.Categorical(["a"], categories=["a", "b"]),
                   pd.Categorical(["a"], categories=["a", "c"])),
    "ordered": (pd.Categorical(["a"], ordered=True), pd.Categorical(["a"])),
    "category Series": (pd.Series(["a"], dtype=pd.CategoricalDtype(["a", "b"])),
                        pd.Series(["a"], dtype=pd.CategoricalDtype(["a", "c"]))),
    "object column [1]/['1']": (pd.DataFrame({"a": pd.Series([1], dtype=object)}),
                                pd.DataFrame({"a": pd.Series(["1"], dtype=object)})),
    "object column None/nan": (pd.Series([None], dtype=object),
                               pd.Series([math.nan], dtype=object)),
    "float column 0.0/-0.0": (pd.DataFrame({"a": [0.0]}), pd.DataFrame({"a": [-0.0]})),
    "Int64/Int32": (pd.Series([1], dtype="Int64"), pd.Series([1], dtype="Int32")),
    "Int64/int64": (pd.Series([1], dtype="Int64"), pd.Series([1], dtype="int64")),
    "string/str": (pd.Series(["a"], dtype="string"), pd.Series(["a"], dtype="str")),
    "string NA/value": (pd.array(["a", None], dtype="string"),
                        pd.array(["a", "b"], dtype="string")),
    "MultiIndex names": (pd.MultiIndex.from_arrays([[1], [2]], names=["a", "b"]),
                         pd.MultiIndex.from_arrays([[1], [2]], names=["a", "c"])),
    "Index/RangeIndex": (pd.Index([0, 1]), pd.RangeIndex(2)),
    "sparse fill_value": (pd.arrays.SparseArray([0, 1], fill_value=0),
                          pd.arrays.SparseArray([0, 1], fill_value=1)),
    "sparse values": (pd.arrays.SparseArray([0, 1]), pd.arrays.SparseArray([0, 2])),
    "tz": (pd.Series(pd.date_range("2020", periods=1, tz="UTC")),
           pd.Series(pd.date_range("2020", periods=1, tz="Europe/Paris"))),
    "datetime unit": (pd.Series(np.array([1], dtype="M8[s]")),
                      pd.Series(np.array([1000], dtype="M8[ms]"))),
}


@pure
@pytest.mark.parametrize("a, b", list(PAIRS.values()), ids=list(PAIRS))
def test_issue_pairs_differ(a, b):
    assert tokenize(a) != tokenize(b)
    assert tokenize(a) == tokenize(copy.deepcopy(a))


@pure
def test_bound_method_same_object_same_token():
    m = Model(2)
    assert tokenize(m.predict) == tokenize(m.predict)
    assert tokenize(Model(2).predict) == tokenize(Model(2).predict)  # same type and content


@pure
def test_functions():
    def local(x):
        return x

    assert by_reference(Model) and by_reference(same)
    assert not by_reference(local) and not by_reference(lambda: 0)
    assert tokenize(same) == tokenize(same)
    assert tokenize(same) != tokenize(same_array)
    assert tokenize(lambda x: x + 1) != tokenize(lambda x: x + 2)

    def closure(n):
        return lambda x: x + n

    assert tokenize(closure(1)) != tokenize(closure(2))
    assert tokenize(closure(1)) == tokenize(closure(1))


@pure
def test_subclasses_use_pickle():
    class MyDict(dict):
        pass

    class MyList(list):
        pass

    assert tokenize(MyDict(a=1)) != tokenize({"a": 1})
    assert tokenize(MyList([1])) != tokenize([1])
    assert normalize_token(MyList([1]))[0] == "pickle"


@pure
def test_unpicklable_gets_random_token():
    import threading

    lock = threading.Lock()
    assert tokenize(lock) != tokenize(lock)


@pure
def test_hostile_objects_get_random_tokens():
    class Hostile:
        def __dask_tokenize__(self):
            raise ValueError("no")

    h = Hostile()
    assert tokenize(h) != tokenize(h)


@pure
def test_cycle_gets_random_token():
    a = [1]
    a.append(a)
    assert tokenize(a) != tokenize(a)


@pure
def test_big_values_hashed():
    assert tokenize("x" * 5000) != tokenize("x" * 5001)
    assert tokenize(b"x" * 5000) != tokenize("x" * 5000)
    assert tokenize(10 ** 5000) != tokenize(10 ** 5000 + 1)
    assert tokenize(10 ** 5000) == tokenize(10 ** 5000)


@pure
def test_empty_dtype_metadata_is_none():
    # numpy < 2.3 (Python 3.10's) deep-copies '<M8[ns]' with metadata {}
    dt = np.dtype("M8[ns]")
    assert tokenize(dt) == tokenize(np.dtype("M8[ns]", metadata={}))
    assert tokenize(dt) == tokenize(copy.deepcopy(dt))
    x = pd.Series([], dtype="datetime64[ns]").array
    assert tokenize(x) == tokenize(copy.deepcopy(x))
    assert tokenize(dt) != tokenize(np.dtype("M8[ns]", metadata={"a": 1}))


@pure
def test_array_layout_does_not_matter():
    x = np.arange(12.0).reshape(3, 4)
    assert tokenize(x) == tokenize(np.asfortranarray(x))
    assert tokenize(x[:, ::2]) == tokenize(x[:, ::2].copy())
    assert tokenize(x) != tokenize(x.reshape(4, 3))


@pure
def test_big_array_at_memory_speed():
    import time

    x = np.ones(32 * 2 ** 20 // 8)  # 32 MiB
    start = time.perf_counter()
    tokenize(x)
    assert time.perf_counter() - start < 0.5  # a pickle copy, or a per-element loop, is far slower


# ---------------------------------------------------------------------------
# end to end: pure keys on a real cluster (workers import this module)


def echo(x):
    return x


def test_map_bound_methods_of_different_objects(e):
    X = list(range(5))
    small = e.map(Model(2).predict, X)
    big = e.map(Model(10).predict, X)
    assert e.gather(small) == [2 * x for x in X]
    assert e.gather(big) == [10 * x for x in X]
    assert e.submit(Model(3).predict, 1).result() == 3
    assert e.submit(Model(4).predict, 1).result() == 4
    assert e.submit(pathlib.Path("/").exists).result() is True
    assert e.submit(pathlib.Path("/no/such/path").exists).result() is False


E2E = ["set of int/str", "OrderedDict order", "dict/Counter", "1/1.0", "None/nan",
       "masked array mask", "structured field names", "object array", "column labels",
       "Series names", "Index names", "categories", "ordered", "object column [1]/['1']",
       "object column None/nan", "float column 0.0/-0.0", "string/str"]


def test_submit_and_map_lookalikes(e):
    for name in E2E:
        a, b = PAIRS[name]
        fa, fb = e.submit(echo, a), e.submit(echo, b)
        assert fa.key != fb.key, name
        ra, rb = e.gather([fa, fb])
        assert same(ra, a) and same(rb, b), name
        ma, mb = e.map(echo, [a, b])
        assert (ma.key, mb.key) == (fa.key, fb.key), name  # map and submit agree
    # pure keys still share: the same call twice is one key, futures included
    assert e.submit(echo, {1}).key == e.submit(echo, {1}).key
    x = e.submit(echo, 1)
    y = e.submit(echo, 2)
    assert e.submit(echo, [x]).key == e.submit(echo, [x]).key != e.submit(echo, [y]).key
    assert e.submit(echo, [x]).result() == [1]


def test_scatter_lookalikes(e):
    fs = e.scatter([{1}, {"1"}])
    assert fs[0].key != fs[1].key
    assert same(e.gather(fs), [{1}, {"1"}])
    values = [v for name in E2E for v in PAIRS[name]]
    fs = e.scatter(values)
    assert len({f.key for f in fs}) == len(values)
    assert all(same(r, v) for r, v in zip(e.gather(fs), values))


def test_function_sent_by_value_follows_its_globals(e):
    # like a function of a script (__main__): pickled by value, globals included
    namespace = {}
    exec("def shifted(x):\n    return x + OFFSET\n", namespace)
    shifted = namespace["shifted"]
    namespace["OFFSET"] = 1
    first = e.submit(shifted, 1)
    assert first.result() == 2
    namespace["OFFSET"] = 10
    second = e.submit(shifted, 1)
    assert second.key != first.key
    assert second.result() == 11
    assert e.map(shifted, [1])[0].result() == 11
