"""metrics.jsonl / events.jsonl: strict JSON (no bare NaN), a torn last line dropped and repaired before the
next append (files rewritten atomically), a damaged line elsewhere named, and the report drawn from them."""

import json
import math

import pytest

from moetron.config import ConfigError
from moetron.report import main as report_main
from moetron.train.logs import EventLog, JsonLines, number


def strict_lines(path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"bare {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_non_finite_values_are_written_as_strings(tmp_path):
    log = JsonLines(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "max_vio_layers": [1.5, -math.inf]})
    (record,) = strict_lines(tmp_path / "metrics.jsonl")
    assert record == {"step": 1, "loss": "nan", "grad_norm": "inf", "max_vio_layers": [1.5, "-inf"]}
    assert math.isnan(number(record["loss"])) and number(record["grad_norm"]) == math.inf
    assert math.isnan(number(float("nan")))  # a legacy bare NaN (json.loads accepts it) is a number too
    assert number("text") is None and number(True) is None


@pytest.mark.parametrize("torn", ['{"step": 4, "lo', '{"step": 4, "loss": 1.0}'], ids=["cut mid-record", "no newline"])
def test_torn_last_line_is_dropped_then_repaired_before_appending(tmp_path, torn):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    for step in (1, 2, 3):
        log.event("checkpoint", step)
    with open(path, "a") as f:
        f.write(torn)  # the process was killed inside write()
    assert [r["step"] for r in EventLog(path).read()] == [1, 2, 3]
    resumed = EventLog(path)
    resumed.event("resume", 3)
    assert [(r["event"], r["step"]) for r in strict_lines(path)] == [("checkpoint", 1), ("checkpoint", 2),
                                                                     ("checkpoint", 3), ("resume", 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl"]  # no temporary file left


def test_truncate_after_drops_later_steps_and_the_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonLines(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    with open(path, "a") as f:
        f.write('{"step": 6, "loss": 0.1')
    JsonLines(path).truncate_after(3)
    assert [r["step"] for r in strict_lines(path)] == [1, 2, 3]


def test_damaged_line_before_the_end_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=f"{path} has a damaged line 2"):
        JsonLines(path).read()


def test_report_reads_torn_files_and_string_nans(tmp_path, capsys):
    metrics, events = JsonLines(tmp_path / "metrics.jsonl"), EventLog(tmp_path / "events.jsonl")
    for step in range(1, 6):
        loss = float("nan") if step == 3 else 5.0 - step
        metrics.write({"step": step, "loss": loss, "lm_loss": loss, "mtp_loss": 0.1, "grad_norm": 1.0})
    events.event("nonfinite", 3, loss=float("nan"), grad_norm=float("inf"), action="skip")
    events.event("loss_spike", 4, loss=9.0, grad_norm=2.0, action="rollback")
    for name in ("metrics.jsonl", "events.jsonl"):
        with open(tmp_path / name, "a") as f:
            f.write('{"step": 6, "lo')
    assert report_main([str(tmp_path)]) == 0
    assert (tmp_path / "report.png").stat().st_size > 1000
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nbroken\n{"step": 2}\n')
    assert report_main([str(tmp_path)]) == 2
    assert "metrics.jsonl has a damaged line 2" in capsys.readouterr().err
