"""The flight recorder, the hang watchdog and the hang report, on hand-built records and a fake clock."""

import json

import pytest
from moetron.comm.recorder import FlightRecorder

from moetron.monitor import hang
from moetron.monitor.watchdog import EXIT_HANG, HangWatchdog, stuck_flight


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_recorder_keeps_the_last_flights_and_every_open_one():
    clock = Clock()
    flight = FlightRecorder(rank=3, capacity=4, clock=clock)
    waiting = flight.issue("recv", peer=2, what="act stage 1", nbytes=64, micro_batch=5)
    for i in range(6):
        clock.now += 1
        with flight.op("all_reduce", what=f"sum {i}", nbytes=8):
            clock.now += 0.5
    record = flight.snapshot()
    whats = [f["what"] for f in record["flights"]]
    assert whats == ["act stage 1", "sum 2", "sum 3", "sum 4", "sum 5"]  # the open receive outlives the ring
    assert record["flights"][0]["completed"] is None and record["flights"][0]["ranks"] == [2]
    assert record["flights"][-1]["completed"] == clock.now and record["last_activity"] == clock.now
    clock.now += 7
    assert flight.idle_seconds() == 7
    flight.done(waiting)
    assert flight.idle_seconds() == 0 and all(f["completed"] for f in flight.snapshot()["flights"])


def test_the_stuck_flight_is_the_one_waited_for_not_one_posted_ahead():
    clock = Clock()
    flight = FlightRecorder(rank=0, clock=clock)
    flight.issue("broadcast", what="input shapes")  # async, waited for later
    clock.now += 1
    dispatch = flight.issue("all_to_all", what="dispatch")
    clock.now += 1
    flight.issue("recv", peer=1, what="act stage 1")  # posted ahead
    assert stuck_flight(flight.snapshot())["what"] == "input shapes"  # nothing waited for: the oldest open
    flight.wait(dispatch)
    assert stuck_flight(flight.snapshot())["what"] == "dispatch"


def test_context_labels_the_collectives_of_its_thread():
    flight = FlightRecorder(rank=0)
    with flight.context(micro_batch=3):
        with flight.context(layer=2):
            inner = flight.issue("all_to_all", what="dispatch")
        outer = flight.issue("all_to_all", what="combine")
    after = flight.issue("all_reduce")
    assert (inner.micro_batch, inner.layer) == (3, 2)
    assert (outer.micro_batch, outer.layer) == (3, None)
    assert (after.micro_batch, after.layer) == (None, None)


def test_watchdog_writes_the_record_and_exits_when_nothing_progresses(tmp_path):
    clock, exits = Clock(), []
    flight = FlightRecorder(rank=1, clock=clock)
    flight.beat(7)
    flight.issue("all_reduce", what="loss sums", nbytes=24)
    dog = HangWatchdog(flight, timeout=0.5, run_dir=tmp_path, world=4, incarnation="x", exit=exits.append)
    dog.start()
    clock.now += 0.4
    dog._thread.join(0.3)  # checks every 0.05 s: not idle long enough yet
    assert dog._thread.is_alive() and not exits
    clock.now += 0.2
    dog._thread.join(5)
    assert exits == [EXIT_HANG]
    record = json.loads((tmp_path / "hang" / "rank_1.json").read_text())
    assert record["rank"] == 1 and record["step"] == 7 and record["world"] == 4 and record["incarnation"] == "x"
    assert record["flights"][-1]["what"] == "loss sums" and record["flights"][-1]["completed"] is None


def flight(kind, what, group, ranks, issued, completed=None):
    return dict(seq=0, kind=kind, group=group, ranks=ranks, what=what, bytes=8, issued=issued,
                completed=completed, micro_batch=None, layer=None)


def rank_record(rank, last, flights, world=4, incarnation="b", written=2000.0):
    return dict(rank=rank, step=5, last_activity=last, flights=flights, world=world, incarnation=incarnation,
                written=written, timeout=20, reason="")


def write(run_dir, records):
    (run_dir / "hang").mkdir(parents=True, exist_ok=True)
    for r in records:
        (run_dir / "hang" / f"rank_{r['rank']}.json").write_text(json.dumps(r))


def test_report_names_the_rank_without_a_record_and_what_its_peers_wait_for(tmp_path, capsys):
    # rank 2 stopped: 0 and 3 wait in the step's all-reduce over the world, 1 (its pipeline peer) for its activation
    world = [0, 1, 2, 3]
    records = [
        rank_record(0, 1950.0, [flight("all_reduce", "grad norm", "world", world, 1950.0)]),
        rank_record(1, 1940.0, [flight("recv", "act stage 1", "pp peer 2", [2], 1939.0)]),
        rank_record(3, 1951.0, [flight("all_reduce", "grad norm", "world", world, 1951.0)]),
        # an older launch's record of rank 2 is ignored
        rank_record(2, 100.0, [flight("barrier", "", "world", world, 100.0)], incarnation="a", written=120.0),
    ]
    write(tmp_path, records)
    assert hang.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stalled: rank 2 (wrote no flight record" in out
    assert 'stalled: rank 2 (wrote no flight record: stopped or dead), in all_reduce "grad norm" on world' in out
    assert 'Waiting for it: rank 0 in all_reduce "grad norm" on world (ranks 0,1,2,3); rank 1 in recv "act stage 1" ' \
           'on pp peer 2; rank 3 in all_reduce' in out


def test_report_names_the_rank_whose_progress_stopped_first(tmp_path):
    # every rank wrote one: rank 1 stopped progressing first (stuck in its own work), the others wait on it
    world = [0, 1, 2, 3]
    records = [rank_record(r, 1950.0 + r, [flight("all_reduce", "loss sums", "world", world, 1950.0 + r)])
               for r in (0, 2, 3)]
    records.append(rank_record(1, 1900.0, [flight("all_to_all", "dispatch", "ep", [1, 3], 1899.0, 1900.0)]))
    write(tmp_path, records)
    diagnosis = hang.diagnose(hang.load(tmp_path))
    assert diagnosis.stalled == [1] and not diagnosis.missing
    assert diagnosis.collective["what"] == "dispatch"


@pytest.mark.parametrize("make", ["nothing", "empty hang dir"])
def test_report_on_a_run_dir_without_records_is_one_paragraph_and_exit_2(tmp_path, capsys, make):
    run_dir = tmp_path / "run"
    if make == "empty hang dir":
        (run_dir / "hang").mkdir(parents=True)
    assert hang.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetron: error: Invalid value for RUN_DIR") and err.count("\n") == 1
