"""node/supervisor.py: restart with a bounded backoff, hung workers, draining."""

from __future__ import annotations

from threatgate.node.supervisor import Supervisor, WorkerState


def test_backoff_doubles_and_is_capped() -> None:
    sup = Supervisor(1, base=0.5, cap=4.0)
    now = 0.0
    delays = []
    for _ in range(6):
        sup.spawned(0, 100, now)
        out = sup.exited(0, now)
        assert out.restart_in is not None
        delays.append(out.restart_in)
        assert sup.due(now) == [] or out.restart_in == 0
        now += out.restart_in
        assert sup.due(now) == [0]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert sup.workers[0].restarts == 6


def test_a_worker_ready_long_enough_starts_over_at_the_base_delay() -> None:
    sup = Supervisor(1, base=0.5, cap=30.0, reset_after=60.0)
    sup.spawned(0, 1, 0.0)
    assert sup.exited(0, 0.0).restart_in == 0.5
    sup.spawned(0, 2, 1.0)
    sup.ready(0, 1.0)
    assert sup.exited(0, 10.0).restart_in == 1.0  # ready only 9 s: still in a row
    sup.spawned(0, 3, 11.0)
    sup.ready(0, 11.0)
    out = sup.exited(0, 80.0)  # ready 69 s
    assert out.restart_in == 0.5 and out.was_ready


def test_silent_workers_are_hung() -> None:
    sup = Supervisor(2, hung_after=10.0)
    sup.spawned(0, 1, 0.0)
    sup.spawned(1, 2, 0.0)
    sup.ready(0, 1.0)
    sup.heard(1, 5.0)
    assert sup.hung(10.5) == []
    assert sup.hung(11.0) == [0]
    assert sup.hung(15.0) == [0, 1]


def test_draining_starts_nothing_again() -> None:
    sup = Supervisor(2)
    for w in sup.start():
        sup.spawned(w, w + 1, 0.0)
    sup.drain()
    out = sup.exited(0, 1.0)
    assert out.restart_in is None
    assert sup.due(100.0) == []
    assert sup.workers[0].state is WorkerState.STOPPED
    assert sup.counts() == {"starting": 1, "ready": 0, "backoff": 0, "stopped": 1}


def test_a_worker_not_ready_within_the_start_timeout_is_hung_though_it_reports() -> None:
    sup = Supervisor(1, hung_after=10.0, start_timeout=30.0)
    sup.spawned(0, 1, 0.0)
    for t in range(1, 30):
        sup.heard(0, float(t))  # it sends its reports, but never "ready" (its stores failed to map)
        assert sup.hung(float(t)) == []
    assert sup.hung(30.0) == [0]
    sup.ready(0, 30.0)
    assert sup.hung(35.0) == []
