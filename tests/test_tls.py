"""TLS: an encrypted cluster, and plain peers that cannot talk to it."""

import pytest

from minidask import Client, CommError, LocalCluster
from minidask.comm import connect, parse_address
from minidask.loop import sync
from minidask.security import Security


def inc(x):
    return x + 1


@pytest.fixture(scope="module")
def tls_cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, security=True,
                      dashboard_address=None) as cluster:
        yield cluster


def test_a_tls_cluster_computes(tls_cluster):
    assert tls_cluster.scheduler_address.startswith("tls://")
    with Client(tls_cluster) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        assert all(a.startswith("tls://") for a in workers)
        x = client.submit(inc, 1, workers=[sorted(workers)[0]])
        y = client.submit(inc, x, workers=[sorted(workers)[1]])
        assert y.result(timeout=30) == 3


def test_a_plain_tcp_peer_cannot_talk_to_it(tls_cluster):
    _, host, port = parse_address(tls_cluster.scheduler_address)
    with pytest.raises(CommError, match="does it use TLS"):
        sync(connect(f"tcp://{host}:{port}", tls_cluster.secret, timeout=10))


def test_a_peer_with_another_certificate_is_refused(tls_cluster):
    stranger = Security.temporary()
    with pytest.raises((CommError, OSError)):
        sync(connect(tls_cluster.scheduler_address, tls_cluster.secret,
                     timeout=3, security=stranger))


def test_tls_address_without_certificates_says_what_to_set(tls_cluster):
    with pytest.raises(ValueError, match="comm.tls.ca-file"):
        sync(connect(tls_cluster.scheduler_address, tls_cluster.secret,
                     timeout=3))


def test_security_needs_all_three_files():
    with pytest.raises(ValueError, match="all three"):
        Security(tls_cert="cert.pem")
