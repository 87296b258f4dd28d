"""A task's traceback in the client shows the user's own source.

A function defined in a script or a notebook cell is pickled by value, and
cloudpickle names the file of its code ``<dynamic-code>``; we keep the real
file name (``distributed.protocol._reduce_code``), so the client, which has
the source (the script, or IPython's cache of its cells), shows the line.
The notebook side runs in a real kernel: tests/test_notebooks.py.
"""

import linecache
import os
import sys
import textwrap
import traceback

import pytest

from distributed.process import Process
from distributed.protocol import deserialize, from_blob, serialize, to_blob
from distributed.tokenize import tokenize
from distributed.utils_test import child_env

SCRIPT = '''\
import traceback

from distributed import Executor


def divide(x):
    return 1 / x  # line 7


def outer(n):
    check = lambda v: [][v]  # line 11
    return check(n)


class Model:
    def fit(self, x):
        raise ValueError("cannot fit %s" % x)  # line 17


if __name__ == "__main__":
    with Executor(n_workers=1, timeout=60) as e:
        for func, arg in [(divide, 0), (outer, 3), (Model().fit, 1)]:
            future = e.submit(func, arg)
            try:
                future.result()
            except Exception as error:
                remote = "".join(traceback.format_exception(error))
                print(remote)
            print("".join(traceback.format_tb(future.traceback())))
            try:
                func(arg)
            except Exception as error:  # the same frame, formatted here
                local = traceback.format_tb(error.__traceback__)[-1]
            print("LIKE A LOCAL ERROR:", local in remote, repr(local))
            print("END OF CASE", flush=True)
        import dask
        try:  # a dask graph, run by the executor as dask's scheduler
            dask.delayed(divide)(0).compute()
        except Exception as error:
            print("".join(traceback.format_exception(error)))
        print("END OF CASE", flush=True)
'''


@pytest.mark.processes
def test_script_tracebacks_show_the_script_lines(tmp_path):
    path = tmp_path / "my_script.py"
    path.write_text(SCRIPT)
    p = Process([sys.executable, str(path)], env=child_env(), cwd=str(tmp_path))
    try:
        assert p.wait(120) == 0, p.tail(60)
        out = p.read()
    finally:
        p.stop()
    cases = out.split("END OF CASE")
    assert len(cases) == 5, out  # four cases, then what follows the last
    expected = [
        (7, "divide", "return 1 / x  # line 7", "ZeroDivisionError: division by zero"),
        (11, "<lambda>", "check = lambda v: [][v]  # line 11",
         "IndexError: list index out of range"),
        (17, "fit", 'raise ValueError("cannot fit %s" % x)  # line 17',
         "ValueError: cannot fit 1"),
    ]
    for text, (line, name, source, error) in zip(cases, expected):
        frame = 'File "%s", line %d, in %s\n    %s' % (path, line, name, source)
        # once re-raised (format_exception), once from future.traceback()
        assert text.count(frame) == 2, text
        assert error in text, text
        assert "<dynamic-code>" not in text, text
        # with the columns of the failing expression (Python >= 3.11's ^^^)
        assert "LIKE A LOCAL ERROR: True" in text, text
    frame = 'File "%s", line 7, in divide\n    return 1 / x  # line 7' % path
    assert frame in cases[3] and "ZeroDivisionError" in cases[3], cases[3]
    # the lambda's frame comes after the frame of the function that called it
    assert cases[1].index("line 12, in outer") < cases[1].index("line 11, in <lambda>")


@pytest.mark.pure
def test_code_keeps_its_file_name_through_a_pickle():
    """Nested code (a lambda, a method of a class made in a function) too,
    through both ways a function travels (a blob, a message)."""
    def make():
        class Local:
            def method(self):
                return lambda: 1
        return Local, lambda x: x + 1

    Local, f = make()
    for loaded in [from_blob(to_blob((Local, f))), deserialize(*serialize((Local, f)))]:
        L2, f2 = loaded
        assert f2(1) == 2
        for code in [f2.__code__, L2.method.__code__, L2().method().__code__]:
            assert code.co_filename == __file__
        assert f2.__code__.co_firstlineno == f.__code__.co_firstlineno


def _failing_chain(d):
    return _fail_in_a_call(d) + (
        1)


def _fail_in_a_call(d):
    return d["key"] * 2


@pytest.mark.pure
def test_rebuilt_traceback_formats_like_the_original():
    """Files, lines, functions, and the columns of each failing expression
    (tblib alone puts those of its stub), even after dask.multiprocessing
    put tblib's own traceback pickling in copyreg."""
    pytest.importorskip("dask.multiprocessing")
    try:
        _failing_chain({})
    except KeyError as e:
        tb = e.__traceback__
    original = traceback.format_tb(tb)
    assert "_failing_chain" in original[-2] and "_fail_in_a_call" in original[-1]
    for rebuilt in [from_blob(to_blob(tb)), deserialize(*serialize(tb))]:
        assert traceback.format_tb(rebuilt) == original
        # IPython >= 9 names a frame by its code's qualified name, and finds
        # the function in the source by its first line (its lines were off
        # by one when that was the failing line)
        assert [getattr(f.f_code, "co_qualname", f.f_code.co_name) for f, _ in
                traceback.walk_tb(rebuilt)][-2:] == ["_failing_chain", "_fail_in_a_call"]
        if sys.version_info >= (3, 11):
            assert ([(f.f_code.co_firstlineno, n) for f, n in traceback.walk_tb(rebuilt)]
                    == [(f.f_code.co_firstlineno, n) for f, n in traceback.walk_tb(tb)])
    if sys.version_info >= (3, 11):
        assert original[-1].rstrip().endswith('return d["key"] * 2\n           ~^^^^^^^')


@pytest.mark.pure
def test_blob_of_a_function_loads_with_plain_pickle():
    """A blob is plain pickle data (``pickle.loads``), our own reducers included."""
    import pickle

    g = eval("lambda x: x * 3")  # not importable: pickled by value
    assert pickle.loads(to_blob(g))(2) == 6


def _cell_function(source, filename):
    """Compile ``source`` as IPython compiles a cell: a made-up file name
    whose lines are in ``linecache`` only; return its function ``f``."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["f"]


@pytest.mark.pure
def test_keys_do_not_depend_on_the_file_name():
    """The same function from two cells (two file names) has one token, and
    the pickles that travel differ only by the file name."""
    source = "def f(x):\n    return x + 1\n"
    f1, f2 = (_cell_function(source, "<ipython-input-%d-abc>" % i) for i in (1, 2))
    try:
        assert tokenize(f1, 1) == tokenize(f2, 1)
        assert to_blob(f1) != to_blob(f2)
        assert to_blob(f1).replace(b"input-1", b"input-2") == to_blob(f2)
    finally:
        for i in (1, 2):
            linecache.cache.pop("<ipython-input-%d-abc>" % i, None)


@pytest.mark.processes
def test_cell_like_function_shows_its_cell_line(e):
    """A file the workers do not have (a notebook cell): the line comes from
    the client's ``linecache``."""
    filename = "<ipython-input-7-%s>" % os.urandom(4).hex()
    source = textwrap.dedent("""\
        import math

        def f(x):
            y = x - 1
            return math.sqrt(-y)  # the cell's line
        """)
    try:
        f = _cell_function(source, filename)
        future = e.submit(f, 5)
        with pytest.raises(ValueError) as info:
            future.result()
        text = "".join(traceback.format_exception(info.value))
        assert ('File "%s", line 5, in f\n    return math.sqrt(-y)  # the cell\'s line'
                % filename) in text, text
        assert "<dynamic-code>" not in text
    finally:
        linecache.cache.pop(filename, None)
