"""How a round's replies are classified: who can contribute, and when every site refused."""

from __future__ import annotations

import numpy as np

from common.secure_aggregation.protocol import Advertisement
from server.federation import RoundReplies

AD = Advertisement(b"c" * 32, b"s" * 32, 10)


def test_a_site_that_trained_for_secure_aggregation_counts_as_a_contributor():
    got = RoundReplies(advertised={7: ("site-0", AD)}, refused={"site-1": "budget", "site-2": "policy"})
    assert got.contributors == 1
    assert not got.every_site_refused, "one site trained: the federation must not stop"


def test_every_site_refused_only_when_nobody_contributed_or_failed():
    assert RoundReplies(refused={"site-0": "budget"}).every_site_refused
    assert not RoundReplies(refused={"site-0": "budget"}, failed={"node-3": "timeout"}).every_site_refused
    plain = RoundReplies(updates={"site-0": ({"w": np.zeros(2)}, 5.0)}, refused={"site-1": "budget"})
    assert plain.contributors == 1 and not plain.every_site_refused
    assert not RoundReplies().every_site_refused
