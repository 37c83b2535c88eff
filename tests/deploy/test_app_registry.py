"""Signed app bundles: our signatures pass Flower's own SuperNode check, tampering fails it,
and the registry answers the SuperLink's Hub requests the way Flower's client expects."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.fab import Fab
from flwr.supercore.utils import request_download_link
from flwr.superlink.servicer.control.control_handlers import _format_verification
from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities
from flwr.supernode.start_client_internal import _verify_fab

from fedtune.cli import main as fedtune
from fedtune.common.config import config_from_dict
from fedtune.deploy.app_registry import AppRegistry, find_app, publish_app, sign_fab
from fedtune.deploy.bundle import init_deployment
from fedtune.deploy.commands import run_command, supernode_command
from fedtune.deploy.layout import load_deployment
from tests.conftest import SAMPLES


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signed")
    cfg = config_from_dict(
        {
            "model": {"name": "tiny-llama"},
            "data": {"task": "question-answer", "path": str(SAMPLES / "medquad" / "medquad_sample.jsonl")},
            "partition": {"num_clients": 2},
        },
        "test",
        tmp,
    )
    return init_deployment(tmp / "fed", cfg, port=18123, site_ids=["north", "south"])


def _site_accepts(d, site: str, fab: bytes, verifications: list[dict]) -> bool:
    trusted = _try_obtain_trusted_entities(d.site_dir(site) / "trusted_entities.yaml")
    return _verify_fab(Fab(hashlib.sha256(fab).hexdigest(), fab, _format_verification(verifications)), trusted)


def test_the_bundle_signed_at_init_passes_flowers_supernode_check(deployment):
    d = deployment
    app = find_app(d.registry, "@fedtune/fedtune-app", "1.0.0")
    assert app is not None and len(app.verifications) == 1
    assert _site_accepts(d, "north", app.fab.read_bytes(), list(app.verifications))
    assert "--trusted-entities" in supernode_command(d, "south"), "sites require signed apps by default"
    assert run_command(d)[2] == "@fedtune/fedtune-app==1.0.0"


def test_a_tampered_bundle_or_a_foreign_signature_is_rejected(deployment):
    d = deployment
    app = find_app(d.registry, "@fedtune/fedtune-app", None)
    fab = bytearray(app.fab.read_bytes())
    fab[len(fab) // 2] ^= 1
    assert not _site_accepts(d, "north", bytes(fab), list(app.verifications))
    impostor = sign_fab(app.fab.read_bytes(), ed25519.Ed25519PrivateKey.generate(), d.signing_key_id)
    assert not _site_accepts(d, "north", app.fab.read_bytes(), [impostor])


def test_resigning_after_an_edit_publishes_the_new_bundle(deployment):
    d = deployment
    before = find_app(d.registry, "@fedtune/fedtune-app", "1.0.0").fab.read_bytes()
    pyproject = d.app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.0.0"', 'version = "1.0.1"'))
    app = publish_app(d.app, d.operator / "signing.key", d.signing_key_id, d.registry)
    assert app.spec == "@fedtune/fedtune-app==1.0.1" and app.fab.read_bytes() != before
    assert _site_accepts(d, "south", app.fab.read_bytes(), list(app.verifications))
    assert find_app(d.registry, "@fedtune/fedtune-app", None).version == "1.0.1"
    assert load_deployment(d.root) == d


def test_the_registry_answers_the_superlinks_hub_requests(deployment):
    d = deployment
    registry = AppRegistry(d.registry).start()
    try:
        url, verifications, _ = request_download_link(
            "@fedtune/fedtune-app", "1.0.0", f"{registry.api_url}/hub/fetch-fab", "fab_url"
        )
        fab = requests.get(url, timeout=10).content
        assert fab == find_app(d.registry, "@fedtune/fedtune-app", "1.0.0").fab.read_bytes()
        assert _site_accepts(d, "south", fab, verifications)
        with pytest.raises(ValueError, match="not"):
            request_download_link("@fedtune/other-app", "1.0.0", f"{registry.api_url}/hub/fetch-fab", "fab_url")
        assert requests.get(url.replace(".fab", ".verifications.json"), timeout=10).status_code == 404
    finally:
        registry.close()


def test_sign_names_the_folder_when_it_is_not_a_deployment(tmp_path: Path, capsys):
    assert fedtune(["deploy", "sign", str(tmp_path)]) == 2
    assert f"{tmp_path}/deployment.json not found" in capsys.readouterr().err
