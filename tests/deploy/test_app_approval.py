"""Sites run only bundles they approved (issue 15, attack 4): an operator that edits the client entry point
and re-signs is trusted by a site that trusts the operator's key (today's set-up) and refused, by Flower's
own SuperNode check, by a site that trusts only its own approval key."""

from __future__ import annotations

import hashlib
import json

import pytest
from flwr.supercore.fab import Fab
from flwr.superlink.servicer.control.control_handlers import _format_verification
from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities
from flwr.supernode.start_client_internal import _verify_fab

from fedtune.cli import main as fedtune
from fedtune.common.config import config_from_dict
from fedtune.deploy.app_approval import BundleRefused, review_bundle
from fedtune.deploy.app_registry import find_app, publish_app
from fedtune.deploy.bundle import init_deployment
from tests.conftest import SAMPLES

EVIL = '"""The client side."""\n\nimport fedtune_app.exfiltrate  # noqa\nfrom fedtune.client.deployment import app\n'


def _accepts(trusted_yaml, app) -> bool:
    fab = app.fab.read_bytes()
    fab_record = Fab(hashlib.sha256(fab).hexdigest(), fab, _format_verification(list(app.verifications)))
    return _verify_fab(fab_record, _try_obtain_trusted_entities(trusted_yaml))


@pytest.fixture
def deployment(tmp_path):
    cfg = config_from_dict(
        {
            "model": {"name": "tiny-llama"},
            "data": {"task": "question-answer", "path": str(SAMPLES / "medquad" / "medquad_sample.jsonl")},
            "partition": {"num_clients": 2},
        },
        "test",
        tmp_path,
    )
    return init_deployment(tmp_path / "fed", cfg, port=18321, site_ids=["north", "south"])


def _operator_edits_and_resigns(d, client_app_text: str):
    (d.app / "fedtune_app" / "client_app.py").write_text(client_app_text)
    pyproject = d.app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.0.0"', 'version = "1.0.1"'))
    return publish_app(d.app, d.operator / "signing.key", d.signing_key_id, d.registry)


def test_a_site_trusting_the_operators_key_runs_a_re_signed_edited_bundle(deployment):
    d = deployment
    edited = _operator_edits_and_resigns(d, EVIL)
    assert _accepts(d.site_dir("north") / "trusted_entities.yaml", edited), "the attack works against today's set-up"


def test_a_site_that_approves_runs_what_it_approved_and_refuses_an_edited_bundle(deployment, tmp_path, capsys):
    d = deployment
    site = tmp_path / "north-machine"
    assert fedtune(["site", "init", str(site), "--name", "north"]) == 0
    trusted = site / "trusted_entities.yaml"
    original = find_app(d.registry, "@fedtune/fedtune-app", "1.0.0")
    assert not _accepts(trusted, original), "signed by the operator only: not yet approved"

    assert fedtune(["site", "approve", str(original.fab), "--dir", str(site)]) == 0
    out = capsys.readouterr().out
    assert "fedtune's entry points only" in out and "privacy.epsilon" in out
    (approval,) = (site / "approvals").glob("*.approval.json")
    assert fedtune(["deploy", "add-approval", str(d.root), str(approval)]) == 0
    assert _accepts(trusted, find_app(d.registry, "@fedtune/fedtune-app", "1.0.0"))

    edited = _operator_edits_and_resigns(d, EVIL)
    assert not _accepts(trusted, edited), "re-signed by the operator, not approved by the site"
    capsys.readouterr()
    assert fedtune(["site", "approve", str(edited.fab), "--dir", str(site)]) == 2
    assert "client_app.py is not fedtune's entry point" in capsys.readouterr().err
    # The old approval moved onto the new bundle does not pass either: the signature covers the digest.
    moved = json.loads(approval.read_text())
    moved.pop("fab_sha256")
    forged = find_app(d.registry, "@fedtune/fedtune-app", "1.0.1")
    assert not _accepts(trusted, type(forged)(forged.app_id, forged.version, forged.fab, (moved,)))


def test_review_refuses_extra_files_and_another_entry_point(deployment):
    import io
    import zipfile

    fab = find_app(deployment.registry, "@fedtune/fedtune-app", "1.0.0").fab.read_bytes()
    assert review_bundle(fab).app_id == "@fedtune/fedtune-app"

    def rebuilt(change, extra: bool = False) -> bytes:
        src = zipfile.ZipFile(io.BytesIO(fab))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as out:
            for name in src.namelist():
                out.writestr(name, change(name, src.read(name)))
            if extra:
                out.writestr("fedtune_app/exfiltrate.py", b"import os\n")
        return buf.getvalue()

    with pytest.raises(BundleRefused, match="carries files of its own"):
        review_bundle(rebuilt(lambda name, data: data, extra=True))
    with pytest.raises(BundleRefused, match="client entry point is 'evil:app'"):
        review_bundle(
            rebuilt(
                lambda name, data: data.replace(b"fedtune_app.client_app:app", b"evil:app")
                if name == "pyproject.toml"
                else data
            )
        )
