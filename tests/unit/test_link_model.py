"""The link model's timing: latency + bytes / bandwidth per link kind, full duplex, FIFO queues per link, and
handles that wait (sleep) until the deadline. Deterministic: a fake clock and a fake sleep."""

import time

import pytest
from moetron.comm.link_model import GB, LinkModel, TimedWork


class FakeClock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


class FakeWork:
    def __init__(self, clock, finishes_at):
        self.clock, self.finishes_at, self.waited = clock, finishes_at, False

    def wait(self):
        self.waited = True
        self.clock.now = max(self.clock.now, self.finishes_at)

    def is_completed(self):
        return self.clock.now >= self.finishes_at


def model(**kw):
    clock = FakeClock()
    return LinkModel(ranks_per_node=2, clock=clock, sleep=clock.sleep, **kw), clock


def test_defaults_follow_spec_ratio():
    m, _ = model()
    assert m.bandwidth["intra"] / m.bandwidth["inter"] == pytest.approx(160 / 50)
    scaled, _ = model(scale=1e-3)
    assert scaled.bandwidth["inter"] == pytest.approx(50 * GB * 1e-3)


def test_transfer_time_is_latency_plus_slower_link():
    m, _ = model(latency_s=1e-3, scale=1e-6)  # 160 kB/s intra, 50 kB/s inter
    assert m.transfer_time(160_000, 0) == pytest.approx(1.001)
    assert m.transfer_time(0, 50_000) == pytest.approx(1.001)
    assert m.transfer_time(160_000, 100_000) == pytest.approx(2.001)  # links run in parallel
    assert m.transfer_time(0, 0) == pytest.approx(1e-3)


def test_peer_bytes_splits_by_node_and_takes_duplex_max():
    m, _ = model()
    # global ranks 0..3, nodes {0,1} {2,3}; I am rank 1 (index 1)
    intra, inter = m.peer_bytes([0, 1, 2, 3], 1, send_splits=[2, 5, 3, 1], recv_splits=[4, 7, 1, 1], row_bytes=10)
    assert (intra, inter) == (40, 40)  # intra: send 20 / recv 40; inter: send 40 / recv 20; self free
    # a rail group (one member per node): every peer is remote
    assert m.peer_bytes([1, 3], 0, [1, 2], [3, 4], 8) == (0, 32)


def test_issue_queues_on_busy_links_and_accounts():
    m, clock = model(latency_s=0.5, scale=1e-6)
    first = m.issue(0, 50_000)  # inter link busy [0, 1]
    second = m.issue(0, 50_000)  # queued behind it: [1, 2]
    intra = m.issue(160_000, 0)  # the intra link is free: [0, 1]
    assert (first, second, intra) == pytest.approx((1.5, 2.5, 1.5))
    clock.now = 10.0
    assert m.issue(0, 50_000) == pytest.approx(11.5)  # idle again
    assert m.transfers == 4 and m.modelled_s == pytest.approx(4 * 1.5)
    m.reset()
    assert m.transfers == 0 and m.issue(0, 50_000, now=0.0) == pytest.approx(1.5)


def test_timed_work_waits_for_work_then_sleeps_to_deadline():
    m, clock = model()
    fast = FakeWork(clock, finishes_at=0.2)
    handle = m.delay(fast, deadline=1.0)
    assert not handle.is_completed()
    handle.wait()
    assert fast.waited and clock.now == pytest.approx(1.0) and clock.slept == [pytest.approx(0.8)]
    slow = FakeWork(clock, finishes_at=3.0)  # the real transfer is slower than the model: no extra sleep
    m.delay(slow, deadline=2.0).wait()
    assert clock.now == pytest.approx(3.0) and len(clock.slept) == 1


def test_timed_work_real_clock_sleeps_not_spins():
    deadline = time.monotonic() + 0.05
    start_cpu, start = time.process_time(), time.monotonic()
    TimedWork(None, deadline).wait()
    assert time.monotonic() >= deadline
    assert time.process_time() - start_cpu < 0.5 * (time.monotonic() - start) + 0.01


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="scale"):
        LinkModel(ranks_per_node=2, scale=0)
    with pytest.raises(ValueError, match="latency"):
        LinkModel(ranks_per_node=2, latency_s=-1)
