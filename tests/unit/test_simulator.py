"""The simulator against arXiv 2412.19437 §3.2.1's bubble table, its memory column, and the CLI.

Bubble = step time minus a rank's busy time. Costs follow the table: B is the full backward
(a split B costs B - W), F&B the overlapped pair.

Where the simulator and the table differ, and why: the DualPipe row, (PP/2-1)(F&B+B-3W), is
the DualPipe paper's count in the zero-bubble unit-cost model, where a forward, a backward for
the input and a backward for the weights take equally long (F = B - W = W). In that model the
simulator reproduces it exactly as the bubble of the worst (middle) ranks, for every PP and
chunk count and any pair cost from B (fully overlapped) to F + B (not overlapped); ranks nearer
the ends idle less. With other ratios the idle gaps of the warm-up and cool-down are filled by
chunks of other lengths, so the bubble also depends on F and is no longer that linear formula:
at F=2, B=4, W=1, F&B=5 the simulated bubble is 5 on every rank at PP=4 (formula 6) and 14 to 16
at PP=8 (formula 18). The 1F1B and ZB1P rows are exact for both cost sets on every rank.
"""

from __future__ import annotations

import pytest
from moetron.parallel import Costs, ScheduleError, build_schedule, simulate
from moetron.parallel.simulate import main as simulate_main

UNIT = Costs(f=1, b=2, w=1)  # F = B - W = W: the zero-bubble paper's unit chunks
SKEWED = Costs(f=2, b=4, w=1, fb=5)
PPS = (4, 8)


def chunk_counts(pp: int) -> tuple[int, ...]:
    return (2 * pp, 3 * pp, 4 * pp)


def run(name: str, pp: int, chunks: int, costs: Costs):
    ranks = pp // 2 if name == "dualpipev" else pp  # DualPipeV: PP stages on PP/2 ranks
    return simulate(build_schedule(name, ranks, chunks), costs)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("costs", [UNIT, SKEWED])
def test_1f1b_and_zb1p_match_the_table_on_every_rank(pp, costs):
    for chunks in chunk_counts(pp):
        one_f_one_b = run("1f1b", pp, chunks, costs)
        assert one_f_one_b.bubble == [(pp - 1) * (costs.f + costs.b)] * pp
        zb = run("zb1p", pp, chunks, costs)
        assert zb.bubble == [(pp - 1) * (costs.f + costs.b - 2 * costs.w)] * pp


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("fb", [3.0, 2.5, 2.0])  # not overlapped (F+B) ... fully hidden (B)
def test_dualpipe_matches_the_table_with_unit_chunks(pp, name, fb):
    costs = Costs(f=1, b=2, w=1, fb=fb)
    formula = (pp / 2 - 1) * (fb + costs.b - 3 * costs.w)
    for chunks in chunk_counts(pp):
        result = run(name, pp, chunks, costs)
        assert result.max_bubble == formula
        assert all(b <= formula for b in result.bubble)


@pytest.mark.parametrize(
    "name,pp,expected",
    [
        ("dualpipe", 4, [5.0] * 4),  # formula: 1 * (5 + 4 - 3) = 6
        ("dualpipe", 8, [14.0, 15.0, 16.0, 16.0, 16.0, 16.0, 15.0, 14.0]),  # formula: 3 * 6 = 18
        ("dualpipev", 4, [5.0] * 2),
        ("dualpipev", 8, [14.0, 15.0, 16.0, 16.0]),
    ],
)
def test_dualpipe_with_other_ratios_stated_values(name, pp, expected):
    # Not the table's formula (see the module docstring): the bubble also depends on F here.
    for chunks in chunk_counts(pp):
        assert run(name, pp, chunks, SKEWED).bubble == expected


@pytest.mark.parametrize("pp", PPS)
def test_peak_activations_match_the_table(pp):
    for chunks in chunk_counts(pp):
        assert max(run("1f1b", pp, chunks, UNIT).peak_activations) == pp
        assert run("1f1b", pp, chunks, UNIT).peak_activations == list(range(pp, 0, -1))
        assert run("zb1p", pp, chunks, UNIT).peak_activations == [pp] * pp
        assert run("dualpipe", pp, chunks, UNIT).peak_activations == [pp + 1] * pp
        assert run("dualpipev", pp, chunks, UNIT).peak_activations == [pp + 1] * (pp // 2)


def test_busy_time_is_the_work_and_p2p_latency_adds_up():
    result = run("1f1b", 4, 8, UNIT)
    assert result.busy == [8 * (UNIT.f + UNIT.b)] * 4
    assert result.makespan == 8 * 3 + 3 * 3
    # One micro-batch is a pure chain: 4 forwards, 4 backwards, 3 hops down and 3 hops back.
    chain = simulate(build_schedule("1f1b", 4, 1), Costs(f=1, b=2, w=1, p2p=0.5))
    assert chain.makespan == 4 * 1 + 4 * 2 + 2 * 3 * 0.5
    assert run("1f1b", 4, 8, Costs(f=1, b=2, w=1, p2p=0.5)).makespan > result.makespan


def test_spans_are_ordered_and_never_overlap_on_a_rank():
    result = run("dualpipe", 8, 20, SKEWED)
    for rank in range(8):
        spans = [s for s in result.spans if s.rank == rank]
        assert len(spans) == len(result.schedule.steps[rank])
        assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))


def test_costs_are_validated():
    with pytest.raises(ScheduleError, match="w .* must not exceed b"):
        Costs(f=1, b=1, w=2)
    with pytest.raises(ScheduleError, match="f must be >= 0"):
        Costs(f=-1)


def test_cli_prints_report_and_writes_png(tmp_path, capsys):
    png = tmp_path / "dp.png"
    assert simulate_main(["--schedule", "dualpipe", "--pp", "4", "--chunks", "10", "--png", str(png),
                          "--f", "1", "--b", "2", "--w", "1", "--print-schedule"]) == 0
    out = capsys.readouterr().out
    assert "rank 0: F0@0" in out and "max bubble 2" in out and "max peak activations 5" in out
    assert png.stat().st_size > 10_000


def test_cli_reports_bad_arguments_without_traceback(capsys):
    assert simulate_main(["--schedule", "dualpipe", "--pp", "3", "--chunks", "12"]) == 2
    assert "error: DualPipe: num_ranks" in capsys.readouterr().err
