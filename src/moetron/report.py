"""`python -m moetron.report RUN_DIR [--out PNG]`: a picture of a run without wandb: loss and grad-norm
curves with spikes, skips and rollbacks marked; throughput and MFU per device; each rank's memory peaks;
where each step's time went (stacked phases) and its share blocked on EP and DP communication; and the
expert load (load / mean) over time, one row per (MoE layer, expert)."""

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moetron.config import ConfigError  # noqa: E402
from moetron.train.logs import number, read_jsonl  # noqa: E402

MARKERS = {"loss_spike": ("red", "x"), "grad_spike": ("orange", "x"), "nonfinite": ("purple", "D"),
           "skip": ("gray", "v"), "rollback": ("black", "|")}


def _read(path: Path) -> list[dict]:
    return read_jsonl(path)  # a torn last line (a run killed mid-write) is dropped


def _series(records: list[dict], key: str) -> list[float]:
    """One number per record; NaN/Inf (logged as "nan"/"inf") and missing values become NaN (a gap)."""
    values = [number(r.get(key)) for r in records]
    return [math.nan if v is None else v for v in values]


def load_heatmap_figure(loads: list[list[float]], title: str = "expert load / mean"):
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * max(len(loads), 1)))
    image = ax.imshow(loads, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(loads)))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def load_over_time(records: list[dict]) -> tuple[list[int], list[list[float]], int]:
    """expert_load.jsonl records -> (steps, rows, experts): row layer * experts + e holds expert e of that
    MoE layer's load / mean at each step (NaN where a record lacks the layer)."""
    layers = max((len(r["load"]) for r in records), default=0)
    experts = max((len(row) for r in records for row in r["load"]), default=0)
    rows = [[math.nan] * len(records) for _ in range(layers * experts)]
    for t, record in enumerate(records):
        for layer, row in enumerate(record["load"]):
            for e, value in enumerate(row):
                rows[layer * experts + e][t] = value
    return [r["step"] for r in records], rows, experts


PHASE_COLORS = {"data": "tab:green", "forward_backward": "tab:blue", "optimizer": "tab:orange",
                "checkpoint": "tab:purple", "other": "lightgray"}


def _throughput(ax, metrics: list[dict], steps: list[int]) -> None:
    """Tokens/s per device, with MFU (or model TFLOP/s) per device on the right axis: at a fixed model and
    sequence length both are the same curve times a constant, so one line with two scales."""
    ax.plot(steps, _series(metrics, "tokens_per_s_per_device"), linewidth=1, color="tab:blue")
    ax.set_ylabel("tokens/s per device")
    ax.set_xlabel("step")
    ax.set_title("throughput per device (global tokens/s / world)")
    key, label, scale = ("mfu", "MFU per device (%)", 100.0) if any("mfu" in m for m in metrics) else \
        ("tflops_per_device", "model TFLOP/s per device", 1.0)
    ratios = [number(m[key]) * scale / number(m["tokens_per_s_per_device"]) for m in metrics
              if number(m.get(key)) and number(m.get("tokens_per_s_per_device"))]
    if ratios:
        ratio = ratios[-1]
        right = ax.secondary_yaxis("right", functions=(lambda t: t * ratio, lambda v: v / ratio))
        right.set_ylabel(label)


def _memory(ax, ranks: list[dict]) -> None:
    last = ranks[-1] if ranks else {}
    columns = [c for c in ("peak_rss_mb", "peak_device_allocated_mb", "peak_device_reserved_mb") if c in last]
    if not columns:
        ax.set_axis_off()
        return
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        ax.bar([r + i * width for r in range(len(last[column]))], last[column], width, label=column)
    ax.set_xticks([r + 0.4 - width / 2 for r in range(len(last[columns[0]]))], range(len(last[columns[0]])))
    ax.set_xlabel("rank")
    ax.set_ylabel("MB")
    ax.legend(fontsize=7)
    ax.set_title(f"memory peaks per rank at step {last['step']} (RSS: host process high-water mark)")


def _phases(ax, metrics: list[dict], steps: list[int]) -> None:
    timed = [m for m in metrics if "time_forward_backward" in m]
    bottom = [0.0] * len(timed)
    for phase, color in PHASE_COLORS.items():
        if phase == "other":
            values = [max(number(m["step_time"]) - sum(number(m[f"time_{p}"]) for p in PHASE_COLORS if p != "other"),
                          0.0) for m in timed]
        else:
            values = [number(m[f"time_{phase}"]) for m in timed]
        ax.bar([m["step"] for m in timed], values, 0.8, bottom=bottom, color=color, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds (rank 0)")
    ax.legend(fontsize=7)
    ax.set_title("step time by phase")


def _comm(ax, metrics: list[dict], steps: list[int], ranks: list[dict]) -> None:
    for key, color in (("ep_wait_share", "tab:red"), ("dp_wait_share", "tab:blue")):
        per_rank = [r.get(key, []) for r in ranks]
        for rank in range(max((len(v) for v in per_rank), default=0)):
            ax.plot([r["step"] for r in ranks], [v[rank] if rank < len(v) else math.nan for v in per_rank],
                    color=color, linewidth=0.5, alpha=0.3)
        ax.plot(steps, _series(metrics, key), color=color, linewidth=1.5, label=f"{key} (mean; thin: ranks)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("share of step time")
    ax.legend(fontsize=7)
    ax.set_title("time blocked on EP all-to-alls and DP collectives")


def _load_over_time(fig, ax, loads: list[dict]) -> None:
    if not loads:
        ax.set_axis_off()
        return
    steps, rows, experts = load_over_time(loads)
    image = ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(-0.5, len(steps) - 0.5, len(rows) - 0.5, -0.5))
    for boundary in range(experts, len(rows), experts):
        ax.axhline(boundary - 0.5, color="white", linewidth=0.8)
    ticks = range(0, len(steps), max(1, len(steps) // 12))
    ax.set_xticks(list(ticks), [steps[t] for t in ticks])
    ax.set_yticks([layer * experts + (experts - 1) / 2 for layer in range(len(rows) // max(experts, 1))],
                  [f"layer {layer}" for layer in range(len(rows) // max(experts, 1))])
    ax.set_xlabel("step")
    ax.set_ylabel(f"MoE layer x expert ({experts} per layer)")
    ax.set_title("expert load / mean over time")
    fig.colorbar(image, ax=ax)


def draw_report(run_dir: Path, out: Path) -> Path:
    metrics = _read(run_dir / "metrics.jsonl")
    events = _read(run_dir / "events.jsonl")
    loads = _read(run_dir / "expert_load.jsonl")
    ranks = _read(run_dir / "ranks.jsonl")
    fig = plt.figure(figsize=(15, 17))
    grid = fig.add_gridspec(4, 2)
    ax_loss, ax_grad = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_perf, ax_memory = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    ax_phases, ax_comm = fig.add_subplot(grid[2, 0]), fig.add_subplot(grid[2, 1])
    ax_load = fig.add_subplot(grid[3, :])
    steps = [m["step"] for m in metrics]
    for key in ("loss", "lm_loss", "mtp_loss"):
        ax_loss.plot(steps, _series(metrics, key), label=key, linewidth=1)
    val = [(m["step"], number(m["val_loss"])) for m in metrics if "val_loss" in m]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="val_loss", markersize=3)
    ax_grad.plot(steps, _series(metrics, "grad_norm"), linewidth=1, label="grad_norm")
    ax_grad.set_yscale("log")
    # A step whose update was skipped is also a skip marker (its event is the verdict: spike or NaN/Inf).
    events = events + [{**e, "event": "skip"} for e in events if e.get("action") == "skip"]
    for event in events:
        if event["event"] not in MARKERS:
            continue
        color, marker = MARKERS[event["event"]]
        values = [number(event.get(key)) for key in ("loss", "grad_norm")]
        # Rollbacks, and NaN/Inf values (not placeable on the axis), mark the step.
        if marker == "|" or not all(v is not None and math.isfinite(v) for v in values):
            for ax in (ax_loss, ax_grad):
                ax.axvline(event["step"], color=color, linestyle="--", linewidth=0.8, label=event["event"])
            continue
        ax_loss.plot(event["step"], values[0], marker, color=color, label=event["event"])
        ax_grad.plot(event["step"], values[1], marker, color=color)
    ax_loss.set_ylabel("loss")
    ax_grad.set_ylabel("global grad norm")
    ax_grad.set_xlabel("step")
    handles, labels = ax_loss.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax_loss.legend(unique.values(), unique.keys(), fontsize=8)
    ax_loss.set_title(f"{run_dir.name}: spikes x; rollbacks (black) and NaN/Inf (purple) dashed")
    _throughput(ax_perf, metrics, steps)
    _memory(ax_memory, ranks)
    _phases(ax_phases, metrics, steps)
    _comm(ax_comm, metrics, steps, ranks)
    _load_over_time(fig, ax_load, loads)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").exists():
        print(f"moetron: error: {args.run_dir} has no metrics.jsonl; give the run.dir of a moetron run.",
              file=sys.stderr)
        return 2
    try:
        out = draw_report(args.run_dir, args.out or args.run_dir / "report.png")
    except ConfigError as err:  # a damaged line inside a log file: named, no traceback
        print(f"moetron: error: {err}", file=sys.stderr)
        return 2
    print(f"moetron: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
