"""A site's record of the runs a server said had ended: kept across restarts, the first word stands,
and an unreadable record refuses training rather than guess."""

from __future__ import annotations

import pytest

from fedtune.client.ended_runs import EndedRuns, EndedRunsUnreadable


def test_an_ended_run_is_remembered_once_and_other_runs_go_on(tmp_path):
    runs = EndedRuns(tmp_path / "ended_runs.json")
    assert runs.why_ended("run-1") is None
    assert runs.record("run-1", 4, "stopped early at round 4: ...")
    assert not runs.record("run-1", 9, "again"), "a second word must not move the end"
    again = EndedRuns(tmp_path / "ended_runs.json")  # the site restarted
    assert again.why_ended("run-1") == (
        "run 'run-1' ended after round 4 (stopped early at round 4: ...): this site trains no more for it"
    )
    assert again.why_ended("run-2") is None


def test_an_unreadable_record_refuses_every_run(tmp_path):
    path = tmp_path / "ended_runs.json"
    path.write_text("{not json")
    with pytest.raises(EndedRunsUnreadable, match="trains for no run until its operator restores or removes"):
        EndedRuns(path).why_ended("run-1")
