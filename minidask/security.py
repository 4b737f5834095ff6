"""Security: optional TLS for every connection of a cluster.

Every minidask connection already proves the cluster secret before any
message is read (see ``comm.py``); that keeps strangers out, but the
traffic itself travels in the clear, which is fine on one machine and not
across a network you do not trust. With TLS, addresses start with
``tls://`` and every connection is encrypted, with both ends showing a
certificate signed by the cluster's certificate authority.

Certificates come from files (config ``comm.tls.ca-file``, ``cert`` and
``key``, or the ``--tls-*`` options of the command line), or, for a local
cluster, from :meth:`Security.temporary`, which makes a throwaway
self-signed set in a private folder: ``LocalCluster(security=True)``.
"""

import atexit
import datetime
import shutil
import ssl
import tempfile
from pathlib import Path

from minidask import config


class Security:
    """Where a cluster's TLS certificates are; empty means plain TCP."""

    def __init__(self, tls_ca_file=None, tls_cert=None, tls_key=None):
        given = [tls_ca_file, tls_cert, tls_key]
        if any(given) and not all(given):
            raise ValueError(
                "TLS needs all three of a CA file, a certificate and its "
                "key (comm.tls.ca-file, comm.tls.cert, comm.tls.key); got "
                f"ca-file={tls_ca_file!r}, cert={tls_cert!r}, "
                f"key={tls_key!r}")
        self.tls_ca_file = tls_ca_file
        self.tls_cert = tls_cert
        self.tls_key = tls_key

    def __repr__(self):
        if not self.tls:
            return "Security(plain TCP)"
        return f"Security(tls_cert={self.tls_cert!r})"

    @property
    def tls(self):
        return bool(self.tls_cert)

    @property
    def scheme(self):
        return "tls" if self.tls else "tcp"

    @classmethod
    def from_config(cls):
        return cls(config.get("comm.tls.ca-file", None),
                   config.get("comm.tls.cert", None),
                   config.get("comm.tls.key", None))

    @classmethod
    def temporary(cls):
        """A self-signed certificate, its own authority, for this cluster.

        The files live in a folder only this user can read, removed when
        the process exits.
        """
        folder = Path(tempfile.mkdtemp(prefix="minidask-tls-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        cert, key = _self_signed()
        (folder / "cert.pem").write_bytes(cert)
        key_path = folder / "key.pem"
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        path = str(folder / "cert.pem")
        return cls(path, path, str(key_path))

    def context(self, server_side):
        """An SSL context that shows our certificate and checks the peer's."""
        purpose = (ssl.Purpose.CLIENT_AUTH if server_side
                   else ssl.Purpose.SERVER_AUTH)
        ctx = ssl.create_default_context(purpose, cafile=self.tls_ca_file)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        # Peers are reached by IP address and port, not by a host name
        # printed in the certificate: the cluster's own CA vouches for them.
        ctx.check_hostname = False
        return ctx

    def cli_args(self):
        """Command-line options that give a child process the same TLS."""
        if not self.tls:
            return []
        return ["--tls-ca-file", self.tls_ca_file, "--tls-cert",
                self.tls_cert, "--tls-key", self.tls_key]


def _self_signed():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         "minidask temporary cluster")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                       critical=True)
        .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
