"""The stream model replays an enqueue order on one in-order compute queue and one in-order communication
queue; checked against timelines worked out by hand (1 byte/s links, no latency)."""

import pytest
from moetron.comm.link_model import LinkModel
from moetron.comm.stream_model import StreamRecorder, crossings, replay

# Inter-node bandwidth 1 byte/s: a transfer of n inter-node bytes takes n seconds.
LINK = LinkModel(ranks_per_node=1, intra_gbps=1e-9, inter_gbps=1e-9, latency_s=0.0)


def record(order):
    """order: ("k", side, seconds) | ("i", side, name, seconds) | ("w", side, name)."""
    streams = StreamRecorder(LINK)
    ids = {}
    for item in order:
        streams.side = item[1]
        if item[0] == "k":
            streams.kernel(item[2])
        elif item[0] == "i":
            ids[item[2]] = streams.issue(item[2])
            streams.hop(ids[item[2]], 0, int(item[3]))
        else:
            streams.wait(ids[item[2]])
    return streams


def test_overlapped_order_hides_the_transfers():
    # B: 2 s, issue x (3 s); F: 3 s, issue y (2 s); B waits x (done at 5: no stall), 2 s; F waits y (done at
    # max(5, 5) + 2 = 7, stream at 7): no stall, 1 s. Compute 8 s, comm 5 s, makespan 8 s: all hidden.
    streams = record([("k", "B", 2), ("i", "B", "x", 3), ("k", "F", 3), ("i", "F", "y", 2), ("w", "B", "x"),
                      ("k", "B", 2), ("w", "F", "y"), ("k", "F", 1)])
    result = replay(streams.events, streams)
    assert (result.compute, result.comm, result.makespan) == (8, 5, 8)
    assert result.efficiency == pytest.approx(1.0) and result.stalls == []


def test_a_wait_enqueued_before_the_other_sides_compute_serializes_it():
    # F issues y (4 s) at 1 and enqueues its wait at once; B's 3 s queue behind it: B starts at 5, not 1.
    streams = record([("k", "F", 1), ("i", "F", "y", 4), ("w", "F", "y"), ("k", "B", 3), ("k", "F", 1)])
    result = replay(streams.events, streams)
    assert result.makespan == 9 and result.efficiency == pytest.approx((5 + 4 - 9) / 4)
    crossed = crossings(streams.events, streams)
    assert [(c.side, c.what, c.next_side, c.seconds) for c in crossed] == [("F", "y", "B", 4)]
    # The same work with B enqueued before F's wait: B hides 3 of the 4 s, and nothing crosses.
    fixed = record([("k", "F", 1), ("i", "F", "y", 4), ("k", "B", 3), ("w", "F", "y"), ("k", "F", 1)])
    assert replay(fixed.events, fixed).makespan == 6 and crossings(fixed.events, fixed) == []


def test_transfers_queue_on_the_communication_stream_and_wait_for_their_input():
    # x is issued at 1 (after the 1 s kernel) and takes 2 s; y is issued at 1 too but starts when x is done.
    streams = record([("k", "F", 1), ("i", "F", "x", 2), ("i", "B", "y", 2), ("w", "B", "y"), ("k", "B", 1)])
    result = replay(streams.events, streams)
    assert result.makespan == 6 and [s.seconds for s in result.stalls] == [4]


def test_a_transfer_is_its_hops_in_sequence_and_segments_are_bounded_by_marks():
    streams = StreamRecorder(LINK)
    streams.mark("pair start")
    t = streams.issue("dispatch")
    streams.hop(t, 0, 2)
    streams.hop(t, 0, 3)
    streams.wait(t)
    streams.mark("pair end")
    streams.kernel(7.0)  # outside the segment
    assert streams.transfer_seconds(t) == 5
    result = replay(streams.segment("pair"), streams)
    assert (result.compute, result.comm, result.makespan) == (0, 5, 5)
    with pytest.raises(ValueError, match="no segment"):
        streams.segment("other")
