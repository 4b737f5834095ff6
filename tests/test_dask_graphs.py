"""Dask's own collections, computed on a minidask cluster via Client.get."""

import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
np = pytest.importorskip("numpy")


def double(x):
    return 2 * x


def test_delayed_graph_matches_dasks_scheduler(client):
    from dask import delayed
    parts = [delayed(double)(i) for i in range(10)]
    total = delayed(sum)(parts)
    ours = dask.compute(total, parts[3], scheduler=client.get)
    theirs = dask.compute(total, parts[3], scheduler="sync")
    assert ours == theirs == (90, 6)


def test_array_computation_matches_dasks_scheduler(client):
    x = da.random.default_rng(42).random((300, 300), chunks=100)
    expr = (x @ x.T).mean(axis=0)[:7]
    ours = expr.compute(scheduler=client.get)
    theirs = expr.compute(scheduler="sync")
    np.testing.assert_allclose(ours, theirs)


def test_nested_keys_come_back_in_shape(client):
    x = da.arange(12, chunks=4)
    graph = dict((x + 1).__dask_graph__())
    keys = (x + 1).__dask_keys__()
    result = client.get(graph, keys)
    assert [list(chunk) for chunk in result] == [
        [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]


def test_graph_results_are_released_afterwards(client):
    from helpers import wait_until
    x = da.ones(1000, chunks=100).sum()
    assert x.compute(scheduler=client.get) == 1000
    wait_until(lambda: client.run_on_scheduler(
        lambda dask_scheduler: len(dask_scheduler.tasks)) == 0)
