"""`python -m moetron.report RUN_DIR [--out PNG]`: a picture of a run without wandb: loss and grad-norm
curves with spikes, skips and rollbacks marked, and the expert-load heatmap (load / mean, per MoE layer)."""

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


def draw_report(run_dir: Path, out: Path) -> Path:
    metrics = _read(run_dir / "metrics.jsonl")
    events = _read(run_dir / "events.jsonl")
    loads = _read(run_dir / "expert_load.jsonl")
    fig, (ax_loss, ax_grad, ax_load) = plt.subplots(3, 1, figsize=(9, 11))
    steps = [m["step"] for m in metrics]
    for key in ("loss", "lm_loss", "mtp_loss"):
        ax_loss.plot(steps, _series(metrics, key), label=key, linewidth=1)
    val = [(m["step"], number(m["val_loss"])) for m in metrics if "val_loss" in m]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="val_loss", markersize=3)
    ax_grad.plot(steps, _series(metrics, "grad_norm"), linewidth=1, label="grad_norm")
    ax_grad.set_yscale("log")
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
    if loads:
        image = ax_load.imshow(loads[-1]["load"], aspect="auto", cmap="viridis")
        ax_load.set_yticks(range(len(loads[-1]["load"])))
        ax_load.set_title(f"expert load / mean at step {loads[-1]['step']}")
        ax_load.set_xlabel("expert")
        ax_load.set_ylabel("MoE layer")
        fig.colorbar(image, ax=ax_load)
    else:
        ax_load.set_axis_off()
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
