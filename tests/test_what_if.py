"""The simulation's what-ifs: late joiners hidden until their round, slow sites' replies held back."""

from __future__ import annotations

from types import SimpleNamespace

from fedtune.what_if import SlowRepliesGrid, late_joiners


def test_late_joiners_are_the_highest_node_ids_hidden_until_their_round():
    available = late_joiners(2, join_round=3)
    nodes = [40, 10, 30, 20]
    assert available(nodes, 0) == [10, 20]
    assert available(nodes, 2) == [10, 20]
    assert available(nodes, 3) == nodes
    assert late_joiners(0, 3)(nodes, 1) == nodes


def _reply(src: int, request_id: str, kind: str = "train"):
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=src, reply_to_message_id=request_id, message_type=kind))


class FakeGrid:
    """Flower's Grid as far as SlowRepliesGrid uses it: each reply is pulled once."""

    def __init__(self, replies):
        self.replies = {r.metadata.reply_to_message_id: r for r in replies}
        self.asked: list[list[str]] = []

    def get_node_ids(self):
        return [3, 1, 2]

    def pull_messages(self, ids):
        self.asked.append(list(ids))
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def test_a_slow_sites_training_reply_is_held_back_until_its_delay_has_passed(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("fedtune.what_if.time.monotonic", lambda: clock[0])
    fake = FakeGrid([_reply(1, "a"), _reply(2, "b"), _reply(1, "c", kind="evaluate")])
    grid = SlowRepliesGrid(fake, count=1, delay_s=30)  # type: ignore[arg-type]
    first = grid.pull_messages(["a", "b", "c"])
    # node 1 (the lowest id) is slow: its training reply waits, its evaluation reply does not
    assert sorted(r.metadata.reply_to_message_id for r in first) == ["b", "c"]
    clock[0] = 129.0
    assert list(grid.pull_messages(["a"])) == []
    assert fake.asked[-1] == []  # a held reply is not asked of Flower again (it would answer with an error)
    clock[0] = 130.5
    assert [r.metadata.reply_to_message_id for r in grid.pull_messages(["a"])] == ["a"]
    assert list(grid.pull_messages(["a"])) == []
