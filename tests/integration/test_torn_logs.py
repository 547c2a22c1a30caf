"""A run killed in the middle of appending to metrics.jsonl / events.jsonl resumes: the torn last lines are
dropped, the files hold strict JSON again, and every step is logged once."""

import json

from test_trainer import make_config

from moetron.train.trainer import Trainer


def strict_lines(path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"bare {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_resume_after_torn_log_lines(corpus, tmp_path):
    run = tmp_path / "run"
    Trainer(make_config(corpus, run, 4, save_every=2)).fit()
    for name in ("metrics.jsonl", "events.jsonl"):
        with open(run / name, "a") as f:
            f.write('{"step": 5, "loss": 2.')  # killed mid-write
    Trainer(make_config(corpus, run, 6, save_every=2)).fit()
    assert [r["step"] for r in strict_lines(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    events = [r["event"] for r in strict_lines(run / "events.jsonl")]
    assert events[0] == "start" and "resume" in events and events[-1] == "finish"
