"""Key material for a Flower 1.41 deployment, made with ``cryptography`` only.

- a CA (EC P-256) whose certificate every site pins, and the SuperLink's TLS certificate
  signed by it (with the SuperLink's DNS name and IP in the SAN: Flower's own helper
  process connects to the SuperLink by IP);
- one authentication key pair per site (ECDSA P-384 in OpenSSH format, what
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` take);
- the operator's app-signing key (Ed25519, OpenSSH) and the ``--trusted-entities`` YAML
  that lists its public half for the sites.

Private keys are written with mode 0600 and never leave the folder of their owner.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=825)


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _pkcs8(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _openssh_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def _openssh_public(key, comment: str) -> bytes:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" {comment}\n".encode()


def make_ca(
    directory: Path, name: str = "fedtune federation CA"
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca.key", _pkcs8(key), private=True)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_certificate(
    directory: Path, ca_key, ca_cert: x509.Certificate, host: str, aliases: tuple[str, ...] = ()
) -> None:
    """``superlink.crt``/``.key`` for ``host`` (a DNS name or IP), plus localhost, 127.0.0.1 and
    ``aliases`` (DNS names the SuperLink also answers to, such as its compose service name)."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    names += [x509.DNSName(alias) for alias in aliases if alias not in (host, "localhost")]
    try:
        ip = ipaddress.ip_address(host)
        if ip != ipaddress.ip_address("127.0.0.1"):
            names.append(x509.IPAddress(ip))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / "superlink.key", _pkcs8(key), private=True)
    _write(directory / "superlink.crt", cert.public_bytes(serialization.Encoding.PEM))


def make_site_auth_key(directory: Path, site_id: str) -> Path:
    """``auth`` (private, stays on the site) and ``auth.pub`` (goes to the operator to register)."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(directory / "auth", _openssh_private(key), private=True)
    return _write(directory / "auth.pub", _openssh_public(key, f"{site_id}@fedtune"))


def read_auth_public_key(path: Path) -> bytes:
    """A site's ``auth.pub`` as the operator received it; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: site public key not found") from exc
    if not data.startswith(b"ecdsa-sha2-nistp384 ") or b"PRIVATE" in data:
        raise ValueError(
            f"{path}: expected a site's Flower public key (auth.pub, 'ecdsa-sha2-nistp384 ...', from `fedtune site "
            "init`); never send or accept a private key"
        )
    serialization.load_ssh_public_key(data.split(b"\n")[0])  # raises ValueError when malformed
    return data


def make_signing_key(directory: Path, name: str = "signing.key", comment: str = "fedtune-operator") -> tuple[str, str]:
    """An Ed25519 app-signing key (the operator's, or a site's approval key); returns (key id, public key
    line) for trusted entities."""
    key = ed25519.Ed25519PrivateKey.generate()
    _write(directory / name, _openssh_private(key), private=True)
    public = _openssh_public(key, comment).decode().strip()
    _write(directory / (name.removesuffix(".key") + ".pub"), (public + "\n").encode())
    key_id = f"fpk_{uuid.uuid4()}"
    return key_id, public


def trusted_entities_yaml(key_id: str, public: str) -> str:
    return f"# App bundles this site will run: signed by the federation operator.\n{key_id}: '{public}'\n"
