"""The operator's app registry: signed Flower app bundles (FABs) for sites that run only signed code.

Flower 1.41 attaches signatures to an app only when the SuperLink fetches it by name
(``flwr run @publisher/app==version``): it asks a Hub-compatible endpoint
(``FLWR_SUPERGRID_API_URL``, ``POST /hub/fetch-fab``) for a download link and the app's
verifications, and every SuperNode started with ``--trusted-entities`` checks an Ed25519
signature over ``signed_at (8 bytes, big-endian) || sha256(FAB)`` before it runs anything.
A FAB sent from a local folder (``flwr run DIR``) carries no signature, so such sites refuse it.

This registry holds no secret. The operator signs offline (``fedtune deploy sign``) and the
registry only serves the FAB and its signatures; a tampered FAB, or one signed by another
key, fails every site's check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import tomllib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedtune.common.atomic_files import atomic_write_bytes

log = logging.getLogger("fedtune.deploy.registry")

API_PREFIX = "/v1"


class RegistryError(RuntimeError):
    """An app cannot be signed or served; the message says which file and what to do."""


@dataclass(frozen=True)
class PublishedApp:
    """One signed bundle in the registry folder."""

    app_id: str  # "@publisher/name", what `flwr run` names
    version: str
    fab: Path
    verifications: tuple[dict, ...]

    @property
    def spec(self) -> str:
        return f"{self.app_id}=={self.version}"


def signed_message(fab: bytes, signed_at: int) -> bytes:
    """What Flower's SuperNode verifies (``flwr.supercore.primitives.asymmetric_ed25519``)."""
    return signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()


def sign_fab(fab: bytes, key: ed25519.Ed25519PrivateKey, key_id: str, signed_at: int | None = None) -> dict:
    """One entry of the Hub's ``verifications`` list: key id, base64url signature, timestamp."""
    signed_at = int(time.time()) if signed_at is None else signed_at
    signature = key.sign(signed_message(fab, signed_at))
    return {
        "public_key_id": key_id,
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(),
        "signed_at": signed_at,
    }


def app_identity(app_dir: Path) -> tuple[str, str]:
    """``(@publisher/name, version)`` from the app's pyproject, as the SuperLink derives them."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        meta = tomllib.loads(path.read_text())
        return f"@{meta['tool']['flwr']['app']['publisher']}/{meta['project']['name']}", str(meta["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(
            f"{path}: not a Flower app pyproject ([project] name/version and "
            f"[tool.flwr.app] publisher are needed): {exc}"
        ) from exc


def _stem(app_id: str, version: str) -> str:
    publisher, name = app_id.lstrip("@").split("/", 1)
    return f"{publisher}__{name}__{version}"


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: cannot read the operator's signing key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise RegistryError(f"{path}: the signing key must be Ed25519 (OpenSSH format), got {type(key).__name__}")
    return key


def publish_app(app_dir: Path, key_path: Path, key_id: str, registry: Path) -> PublishedApp:
    """Build the FAB exactly as ``flwr build`` does, sign it, and store both in ``registry``."""
    from flwr.cli.build import build_fab_from_disk

    app_id, version = app_identity(app_dir)
    fab = build_fab_from_disk(Path(app_dir))
    verification = sign_fab(fab, load_signing_key(key_path), key_id)
    stem = _stem(app_id, version)
    registry.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(registry / f"{stem}.fab", fab)
    atomic_write_bytes(registry / f"{stem}.verifications.json", json.dumps([verification], indent=1).encode())
    log.info("signed %s==%s (sha256 %s) with %s", app_id, version, hashlib.sha256(fab).hexdigest()[:16], key_id)
    return PublishedApp(app_id, version, registry / f"{stem}.fab", (verification,))


def find_app(registry: Path, app_id: str, version: str | None) -> PublishedApp | None:
    """The stored bundle for ``app_id`` at ``version`` (the newest stored one when no version is given)."""
    if version is None:
        candidates = sorted(registry.glob(f"{_stem(app_id, '*')}.fab"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            return None
        version = candidates[-1].name[: -len(".fab")].rsplit("__", 1)[1]
    fab = registry / f"{_stem(app_id, version)}.fab"
    if not fab.exists():
        return None
    signatures = fab.with_name(fab.name[: -len(".fab")] + ".verifications.json")
    verifications = tuple(json.loads(signatures.read_text())) if signatures.exists() else ()
    return PublishedApp(app_id, version, fab, verifications)


class _Handler(BaseHTTPRequestHandler):
    registry: Path
    base_url: str

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != f"{API_PREFIX}/hub/fetch-fab":
            return self._json(404, {"detail": f"unknown endpoint {self.path}"})
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            app = find_app(self.registry, str(request["app_id"]), request.get("app_version"))
        except (ValueError, KeyError) as exc:
            return self._json(400, {"detail": f"bad request: {exc}"})
        if app is None:
            return self._json(
                404,
                {
                    "detail": f"{request['app_id']} {request.get('app_version') or ''} is not "
                    "published; run `fedtune deploy sign`"
                },
            )
        log.info("SuperLink fetched %s (%d signature(s))", app.spec, len(app.verifications))
        body: dict[str, object] = {"fab_url": f"{self.base_url}/fabs/{app.fab.name}"}
        if app.verifications:
            body["verifications"] = list(app.verifications)
        return self._json(200, body)

    def do_GET(self) -> None:  # noqa: N802
        name = self.path.removeprefix("/fabs/")
        path = self.registry / name
        if not self.path.startswith("/fabs/") or "/" in name or not name.endswith(".fab") or not path.exists():
            return self._json(404, {"detail": "not found"})
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("registry: " + fmt, *args)


class AppRegistry:
    """A Hub-compatible endpoint for the SuperLink, on ``host:port`` (loopback by default)."""

    def __init__(self, registry: Path, host: str = "127.0.0.1", port: int = 0):
        root = Path(registry)

        class RegistryHandler(_Handler):
            """This registry's handler: http.server makes one per request, from the class alone."""

            registry = root

        self.server = ThreadingHTTPServer((host, port), RegistryHandler)
        RegistryHandler.base_url = f"http://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    @property
    def api_url(self) -> str:
        """The value of ``FLWR_SUPERGRID_API_URL`` for the SuperLink."""
        host, port = self.server.server_address[:2]
        if not isinstance(host, str):  # typeshed allows bytes; an AF_INET socket names its host in a str
            host = host.decode()
        return f"http://{host}:{port}{API_PREFIX}"

    def start(self) -> AppRegistry:
        self._thread = threading.Thread(target=self.server.serve_forever, name="app-registry", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
