"""A site runs only the app bundles it reviewed and signed itself, not whatever the operator signs.

The operator's signature says who built a bundle, not that a site agreed to run it: an operator
that edits the client entry point (to skip DP, secure aggregation or ``policy.toml``, or to read
the data) and re-signs is trusted by every site that trusts its key. So a site trusts its own
approval key instead (``trusted_entities.yaml`` lists only it; Flower's SuperNode runs a bundle
when any trusted key signed it), reviews each bundle (:func:`review_bundle`: nothing but
fedtune's own entry points, the config printed for reading) and signs it
(``fedtune site approve``); the operator adds that signature to the registry
(``fedtune deploy add-approval``). A bundle changed afterwards carries no valid approval and
every site refuses it before anything runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.atomic_files import atomic_write_bytes
from fedtune.deploy.app_registry import RegistryError, load_signing_key, sign_fab
from fedtune.deploy.bundle import APP_PACKAGE, CLIENT_COMPONENT
from fedtune.deploy.credentials import make_signing_key, trusted_entities_yaml

APPROVAL_KEY = "approval.key"
TRUSTED_ENTITIES = "trusted_entities.yaml"
_FLOWER_FILES = {"pyproject.toml", ".info/CONTENT"}


class BundleRefused(ValueError):
    """A bundle this site will not approve; the message says what it holds that it should not."""


@dataclass(frozen=True)
class BundleReview:
    """What a site reads before approving: the bundle's digest, app id and the federation's config."""

    sha256: str
    app_id: str
    version: str
    config: dict


def review_bundle(fab: bytes) -> BundleReview:
    """The bundle's contents, provided it runs nothing on the site but fedtune's installed code."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        files = {name: archive.read(name) for name in archive.namelist()}
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BundleRefused(f"not a Flower app bundle: {exc}") from exc
    extra = sorted(set(files) - set(APP_PACKAGE) - _FLOWER_FILES)
    if extra:
        raise BundleRefused(f"the bundle carries files of its own: {extra}")
    for name, text in APP_PACKAGE.items():
        if files.get(name, b"").decode(errors="replace") != text:
            raise BundleRefused(f"{name} is not fedtune's entry point: the bundle would run other code on this site")
    try:
        meta = tomllib.loads(files["pyproject.toml"].decode())
        component = meta["tool"]["flwr"]["app"]["components"]["clientapp"]
        app_id = f"@{meta['tool']['flwr']['app']['publisher']}/{meta['project']['name']}"
        config = json.loads(meta["tool"]["flwr"]["app"]["config"]["fedtune-config"])
        version = str(meta["project"]["version"])
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise BundleRefused(f"pyproject.toml is not fedtune's: {exc}") from exc
    if component != CLIENT_COMPONENT:
        raise BundleRefused(f"the client entry point is {component!r}, not fedtune's {CLIENT_COMPONENT!r}")
    return BundleReview(hashlib.sha256(fab).hexdigest(), app_id, version, config)


def make_approval_key(directory: Path, site: str) -> str:
    """This site's approval key (``approval.key``, private) and ``trusted_entities.yaml`` naming only it."""
    directory = Path(directory)
    key_id, public = make_signing_key(directory, APPROVAL_KEY, f"{site}-approval")
    text = trusted_entities_yaml(key_id, public).replace(
        "signed by the federation operator", f"approved by {site} itself (`fedtune site approve`)"
    )
    atomic_write_bytes(directory / TRUSTED_ENTITIES, text.encode())
    atomic_write_bytes(directory / (APPROVAL_KEY + ".id"), (key_id + "\n").encode())
    return key_id


def approve_bundle(fab: bytes, directory: Path) -> dict:
    """This site's signature on ``fab`` (after :func:`review_bundle`), in the registry's verification form."""
    review_bundle(fab)
    directory = Path(directory)
    try:
        key_id = (directory / (APPROVAL_KEY + ".id")).read_text().strip()
    except FileNotFoundError as exc:
        raise RegistryError(f"{directory}: no approval key; run `fedtune site init` there first") from exc
    return sign_fab(fab, load_signing_key(directory / APPROVAL_KEY), key_id)


def add_approval(fab_path: Path, verification: dict) -> int:
    """Add a site's approval to the signatures the registry serves with ``fab_path``; returns their number."""
    fab_path = Path(fab_path)
    path = fab_path.with_name(fab_path.name[: -len(".fab")] + ".verifications.json")
    current = json.loads(path.read_text()) if path.exists() else []
    if not {"public_key_id", "signature", "signed_at"} <= set(verification):
        raise RegistryError("an approval needs public_key_id, signature and signed_at (from `fedtune site approve`)")
    current = [v for v in current if v.get("public_key_id") != verification["public_key_id"]] + [verification]
    atomic_write_bytes(path, json.dumps(current, indent=1).encode())
    return len(current)
