"""Running Dask's task graphs on minidask: ``Client.get``.

Dask collections (``dask.delayed``, ``dask.array``, ...) describe their
work as a *task graph*, a mapping of keys to tasks, and hand it to a
scheduler function: ``dask.compute(x, scheduler=client.get)`` makes that
function minidask's. Each of Dask's tasks becomes one minidask task whose
function runs the Dask task with its dependencies' values; keys keep
their Dask names, so the dashboard shows Dask's task names.

Dask is needed only here, and only when it is used: minidask imports and
runs without it.
"""

from minidask.task import Ref


def run_node(node, inputs):
    """Run one of Dask's tasks, on a worker, given its inputs by key."""
    return node(inputs)


def _group(key):
    name = key[0] if isinstance(key, tuple) else key
    return str(name).rsplit("-", 1)[0]


def graph_to_tasks(graph, make_task):
    """Turn a Dask graph into minidask tasks via ``make_task``.

    ``make_task(func, args, key, group, priority)`` returns the task dict a
    client sends to the scheduler.
    """
    try:
        from dask._task_spec import convert_legacy_graph
        from dask.order import order
    except ImportError as exc:
        raise ImportError(
            "Client.get runs Dask task graphs and needs dask itself: "
            "pip install dask") from exc
    if hasattr(graph, "__dask_graph__"):
        graph = graph.__dask_graph__()
    nodes = convert_legacy_graph(dict(graph))
    priorities = order(nodes)
    tasks = {}
    for key, node in nodes.items():
        inputs = {dep: Ref(dep) for dep in node.dependencies}
        tasks[key] = make_task(run_node, (node, inputs), key, _group(key),
                               priorities.get(key, 0))
    return tasks


def flatten_keys(keys):
    """Every key inside Dask's nested lists of keys."""
    if isinstance(keys, list):
        for item in keys:
            yield from flatten_keys(item)
    else:
        yield keys


def pack(keys, values):
    """Dask's nested lists of keys, with each key replaced by its value."""
    if isinstance(keys, list):
        return [pack(k, values) for k in keys]
    return values[keys]
