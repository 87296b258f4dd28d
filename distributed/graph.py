"""Task-graph helpers, pure functions: dask's graph format without dask.

A graph is a dict ``{key: value}``; a *task* is a tuple whose first element
is callable, ``(add, 'x', 1)``; its arguments may be keys of the graph,
nested tasks, lists of those, or literals::

    >>> from operator import add
    >>> dsk = {'x': 1, 'y': (add, 'x', 10)}
    >>> get_dependencies(dsk, 'y')
    {'x'}
    >>> execute_task(dsk['y'], {'x': 1})
    11
"""

__all__ = [
    "TaskRef",
    "substitute_refs",
    "istask",
    "get_dependencies",
    "execute_task",
    "substitute",
    "toposort",
    "find_cycle",
    "CycleError",
]

_NO_KEY = object()  # get_dependencies' default: ``None`` is a valid key


class TaskRef:
    """Stands for the value of ``key`` in the arguments of a submitted task.

    The executor puts one wherever a Future was passed; the worker swaps it
    for the data.  Unlike a bare key, it cannot be confused with a string
    argument that happens to equal a key.
    """

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return (TaskRef, (self.key,))

    def __eq__(self, other):
        return type(other) is TaskRef and other.key == self.key

    def __hash__(self):
        return hash((TaskRef, self.key))

    def __repr__(self):
        return "TaskRef(%r)" % (self.key,)


def substitute_refs(obj, data):
    """Replace every :class:`TaskRef` in ``obj`` (lists, tuples, dicts, sets)."""
    t = type(obj)
    if t is TaskRef:
        return data[obj.key]
    if t is list:
        return [substitute_refs(o, data) for o in obj]
    if t is tuple:
        return tuple(substitute_refs(o, data) for o in obj)
    if t is dict:
        return {k: substitute_refs(v, data) for k, v in obj.items()}
    if t is set or t is frozenset:
        return t(substitute_refs(o, data) for o in obj)
    return obj


def istask(x):
    return type(x) is tuple and bool(x) and callable(x[0])


def _is_node(x):
    """A task of dask's newer graph format (``dask._task_spec.Task`` etc.)."""
    return type(x).__module__ == "dask._task_spec" and hasattr(x, "dependencies")


def _is_key(x, keys):
    try:
        return x in keys
    except TypeError:  # unhashable
        return False


def get_dependencies(dsk, key=_NO_KEY, task=None):
    """The keys of ``dsk`` that ``dsk[key]`` (or ``task``) refers to."""
    if key is not _NO_KEY:
        task = dsk[key]
    if _is_node(task):
        return set(task.dependencies)
    deps = set()
    stack = [task]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is tuple and x and callable(x[0]):
            stack.extend(x[1:])
        elif t is list or t is tuple:
            if t is tuple and _is_key(x, dsk):
                deps.add(x)
            else:
                stack.extend(x)
        elif t is dict:
            stack.extend(x.values())
        elif _is_key(x, dsk):
            deps.add(x)
    return deps


def execute_task(task, data):
    """Evaluate ``task``, reading the keys it names from ``data``."""
    if _is_node(task):
        return task(data)
    t = type(task)
    if t is tuple and task and callable(task[0]):
        func = task[0]
        return func(*[execute_task(a, data) for a in task[1:]])
    if t is list:
        return [execute_task(a, data) for a in task]
    if t is dict:
        return {k: execute_task(v, data) for k, v in task.items()}
    if _is_key(task, data):
        return data[task]
    if t is tuple:
        return tuple(execute_task(a, data) for a in task)
    return task


def substitute(obj, data, keys):
    """Replace every part of ``obj`` that is one of ``keys`` with ``data[key]``.

    Looks inside lists, tuples and dicts (values), as the worker's
    ``compute`` does with its ``args`` and ``kwargs``::

        >>> substitute(['x', ('y', 1), {'k': 'x'}], {'x': 10}, {'x'})
        [10, ('y', 1), {'k': 10}]
    """
    if _is_key(obj, keys):
        return data[obj]
    t = type(obj)
    if t is list:
        return [substitute(o, data, keys) for o in obj]
    if t is tuple:
        return tuple(substitute(o, data, keys) for o in obj)
    if t is dict:
        return {k: substitute(v, data, keys) for k, v in obj.items()}
    return obj


class CycleError(ValueError):
    """The graph has a cycle: no order can compute it.  ``cycle`` is
    ``[a, b, ..., a]``."""

    def __init__(self, cycle):
        super().__init__("the graph has a cycle: %s" % _format_cycle(cycle))
        self.cycle = cycle


def toposort(dsk, dependencies=None):
    """Keys of ``dsk`` in an order where dependencies come first.

    ``dependencies`` (``{key: keys}``) saves computing them again; keys
    outside ``dsk`` are ignored.  Iterative, O(V + E); raises
    :class:`CycleError` naming a cycle::

        >>> toposort({'a': 1, 'b': (str, 'a')})
        ['a', 'b']
    """
    if dependencies is None:
        dependencies = {k: get_dependencies(dsk, k) for k in dsk}
    order = []
    done = set()
    for root in dsk:
        if root in done:
            continue
        first = dependencies.get(root)
        if not first:  # the common leaf: no walk needed
            done.add(root)
            order.append(root)
            continue
        # depth first; ``path`` is the chain of keys being expanded
        path, on_path = [root], {root}
        iters = [iter(first)]
        while iters:
            for d in iters[-1]:
                if d in done or d not in dsk:
                    continue
                if d in on_path:
                    cycle = path[path.index(d):] + [d]
                    raise CycleError(cycle)
                path.append(d)
                on_path.add(d)
                iters.append(iter(dependencies.get(d, ())))
                break
            else:
                k = path.pop()
                on_path.discard(k)
                iters.pop()
                done.add(k)
                order.append(k)
    return order


def find_cycle(dependencies):
    """A cycle of ``{key: keys}`` as ``[a, b, a]``, or ``None`` if there is none."""
    try:
        toposort(dependencies, dependencies)
    except CycleError as e:
        return e.cycle
    return None


def _format_cycle(cycle, limit=10):
    names = [k if type(k) is str else repr(k) for k in cycle]
    if len(names) > limit:
        names = names[:limit // 2] + ["... (%d keys) ..." % (len(names) - limit)] \
            + names[-(limit // 2):]
    return " -> ".join(names)
