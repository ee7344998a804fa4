"""offload.cpu.team: fork-join over helper threads that sleep between calls."""
import os
import threading

import pytest

from offload.cpu import team as team_mod


def test_team_propagates_helper_errors_and_stays_usable():
    team = team_mod.Team(2)
    seen = []

    def job(j):
        if j == 1:
            raise ZeroDivisionError("in helper")
        seen.append((j, threading.current_thread().name))

    with pytest.raises(ZeroDivisionError, match="in helper"):
        team.run(job, [(0,), (1,)])
    team.run(lambda j: seen.append((j, threading.current_thread().name)), [(0,), (1,)])
    names = {j: name for j, name in seen}
    assert names[0] == threading.current_thread().name  # chunk 0 runs inline
    assert names[1].startswith("offload-cold-")


def test_team_does_not_wait_for_idle_helper():
    team = team_mod.Team(2)
    release = threading.Event()
    ran = []

    def job(j):
        if j == 1:
            release.wait(10)  # a helper that is slow to get going
        ran.append(j)
        return j

    # the caller is told helper 1 cannot matter: run returns without it
    assert team.run(job, [(0,), (1,)], idle=lambda j: True) == [0, None]
    assert ran == [0]
    release.set()
    # the next run first joins the stale job, then runs normally
    assert team.run(job, [(0,), (1,)]) == [0, 1]
    assert sorted(ran) == [0, 0, 1, 1]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
def test_helpers_kept_off_the_callers_cpu(monkeypatch):
    team = team_mod.Team(2)
    if not team._cpus:
        pytest.skip("sched_getcpu unavailable")
    cpus = set(team._cpus)
    cpu = min(cpus)
    monkeypatch.setattr(team, "_getcpu", lambda: cpu)
    helper = team._helpers[0]
    team.run(lambda j: j, [(0,), (1,)])
    assert os.sched_getaffinity(helper.tid) == cpus - {cpu}
    monkeypatch.setattr(team_mod, "PLACE_HELPERS", False)
    team.run(lambda j: j, [(0,), (1,)])
    assert os.sched_getaffinity(helper.tid) == cpus  # switched off: every CPU again
