"""`fogwhisk provision DEVICE_ID --certs DIR`: what an operator does per device, in one step.

1. A client certificate whose CN is the device id, signed by the CA that
   `scripts/make-certs DIR` made (kept when it exists, as make-certs does): the
   gateway's `use_identity_as_username` turns the CN into the MQTT username.
2. The ACL: `devices.acl` confines every device through `pattern` lines on
   `%u`, so a new id needs no entry; this checks that the ACL file really has
   those patterns and that the id is no `user` of it (a device named `gateway`
   would get the gateway's rights). Without the patterns it writes the entry.
3. A bundle to copy onto the device (`--out`, default `./provision/<id>`):
   `ca.pem`, `<id>.pem`, `<id>.key` (0600) and `agent.toml`, whose TLS paths are
   relative to itself (the agent reads them so): `fogwhisk run -c agent.toml`.

Exit 0 when the bundle is ready, 2 on a bad id or missing CA, 1 otherwise.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import resources

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DAYS = 825  # as scripts/make-certs (CERT_DAYS)
DEVICE_ID = re.compile(r"[A-Za-z0-9._-]+")  # one topic level, a CN make-certs accepts
RESERVED = frozenset({"server", "ca"})  # make-certs' own files
PATTERNS = ("pattern write fog/%u/#", "pattern read fog/%u/models/+/deploy",
            "pattern read fog/_artifacts/#")


class ProvisionError(Exception):
    """Raised when the device cannot be provisioned; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def main(device: str, certs: Path, *, gateway: str, out: Path | None, acl: Path | None,
         local: str, data_dir: str, prefix: str = "fog", stdout: TextIO = sys.stdout) -> int:
    try:
        bundle = provision(device, certs, gateway=gateway, out=out, acl=acl, local=local,
                           data_dir=data_dir, prefix=prefix, stdout=stdout)
    except ProvisionError as exc:
        print(f"fogwhisk provision: {exc}", file=sys.stderr)
        return exc.code
    print(f"provision: ready: copy {bundle}/ to the device (e.g. /etc/fogwhisk/) and run "
          f"`fogwhisk run -c agent.toml` there", file=stdout)
    return EXIT_OK


def provision(device: str, certs: Path, *, gateway: str, out: Path | None, acl: Path | None,
              local: str, data_dir: str, prefix: str = "fog",
              stdout: TextIO = sys.stdout) -> Path:
    """Certificate, ACL check and bundle for `device`; the bundle's directory."""
    host, port = _gateway(gateway)
    acl_path = acl or resources.path("broker-config", "devices.acl")
    acl_text = acl_path.read_text()
    _check_id(device, acl_text, acl_path)
    cert_path, key_path = _issue(device, certs, stdout)
    _check_server_name(certs / "server.pem", host, stdout)
    bundle = out or Path("provision") / device
    bundle.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(certs / "ca.pem", bundle / "ca.pem")
    shutil.copyfile(cert_path, bundle / f"{device}.pem")
    _write_private(bundle / f"{device}.key", key_path.read_bytes())
    missing = [p for p in PATTERNS if p not in {ln.strip() for ln in acl_text.splitlines()}]
    if not missing:
        print(f"provision: ACL: {acl_path} covers {device} by pattern "
              f"(write {prefix}/{device}/#, read {prefix}/{device}/models/+/deploy): "
              f"nothing to add", file=stdout)
    else:
        entry = "\n".join([f"user {device}", f"topic write {prefix}/{device}/#",
                           f"topic read {prefix}/{device}/models/+/deploy",
                           f"topic read {prefix}/_artifacts/#"]) + "\n"
        (bundle / "acl-entry").write_text(entry)
        print(f"provision: ACL: {acl_path} lacks {', '.join(missing)}; append "
              f"{bundle / 'acl-entry'} to it and reload Mosquitto (SIGHUP):\n{entry}",
              file=stdout, end="")
    config = bundle / "agent.toml"
    if config.exists():
        print(f"provision: {config} exists: kept", file=stdout)
    else:
        config.write_text(_snippet(device, host, port, local, data_dir))
        os.chmod(config, 0o640)
        print(f"provision: config -> {config}", file=stdout)
    return bundle


def _gateway(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ProvisionError(f"--gateway {text!r}: expected HOST:PORT, e.g. gateway.local:8883",
                             EXIT_USAGE)
    return host.strip("[]"), int(port)


def _check_id(device: str, acl_text: str, acl_path: Path) -> None:
    if not DEVICE_ID.fullmatch(device) or device.startswith("_") or device in RESERVED:
        raise ProvisionError(f"bad device id {device!r}: letters, digits, '.', '_', '-'; "
                             "not starting with '_'; not 'server' or 'ca'", EXIT_USAGE)
    users = {ln.split()[1] for ln in acl_text.splitlines()
             if ln.strip().startswith("user ") and len(ln.split()) == 2}
    if device in users:
        raise ProvisionError(f"device id {device!r} is a user of {acl_path} with its own "
                             "rights (the gateway, operators): pick another id", EXIT_USAGE)


def _issue(device: str, certs: Path, stdout: TextIO) -> tuple[Path, Path]:
    """`certs/<device>.pem` and `.key`, signed by `certs/ca.pem`; existing ones are kept."""
    cert_path, key_path = certs / f"{device}.pem", certs / f"{device}.key"
    ca_pem, ca_key = certs / "ca.pem", certs / "ca.key"
    if not ca_pem.is_file() or not ca_key.is_file():
        raise ProvisionError(f"no CA in {certs} (ca.pem and ca.key): make it with "
                             f"`scripts/make-certs {certs}`", EXIT_USAGE)
    if cert_path.is_file() and key_path.is_file():
        print(f"provision: certificate {cert_path} exists: kept", file=stdout)
        return cert_path, key_path
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{ca_key}: not the EC key scripts/make-certs makes")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=int(os.environ.get("CERT_DAYS", DAYS))))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_path, 0o644)  # certificates are public, as make-certs leaves them
    print(f"provision: certificate CN={device} -> {cert_path}", file=stdout)
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # also when the file was there with wider rights


def _check_server_name(server_pem: Path, host: str, stdout: TextIO) -> None:
    """Warn when the gateway's certificate (if it is in DIR) does not name `host`."""
    if not server_pem.is_file():
        return
    cert = x509.load_pem_x509_certificate(server_pem.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    try:
        wanted = str(ipaddress.ip_address(host))
    except ValueError:
        wanted = host
    if wanted not in names:
        print(f"provision: warning: {server_pem} is valid for {', '.join(names)}, not "
              f"{host}: the device will refuse the gateway (make it with "
              f'CERT_SERVER_NAMES="{host}" scripts/make-certs)', file=stdout)


def _snippet(device: str, host: str, port: int, local: str, data_dir: str) -> str:
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address in a URL
    return f"""\
# fogwhisk device {device}, made by `fogwhisk provision`. TLS paths are relative to
# this file: keep it beside ca.pem, {device}.pem and {device}.key.
[device]
id = "{device}"
data_dir = "{data_dir}"

[local]                            # the device's own sensor bus (broker-config/edge.conf)
url = "{local}"

[uplink]                           # the gateway's device listener (gateway.conf, mTLS)
url = "mqtts://{host}:{port}"
ca = "ca.pem"
cert = "{device}.pem"
key = "{device}.key"

[[pipeline]]
name = "relay"
trigger = "sensors/#"
steps = [{{ action = "forward" }}]   # to fog/{device}/sensors/..., the gateway relays it on
"""
