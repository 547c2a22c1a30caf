"""Draws a simulated (or measured) timeline in the style of the published DualPipe figure:
one row per rank, one box per step labelled with its micro-batch, colour by kind, darker shade
for direction 1 (or the way back up the V), overlapped F&B pairs as a split box with a frame."""

from __future__ import annotations

from pathlib import Path

from .actions import FB, Action, Op
from .simulator import SimResult, Span

COLOURS = {  # (direction 0, direction 1)
    Op.F: ("#f9c784", "#e8871e"),
    Op.B: ("#a8d5a2", "#4a9c45"),
    Op.BW: ("#8fc1e3", "#2f6f9f"),
    Op.W: ("#c9b6e4", "#7d5ba6"),
}


def _shade(result: SimResult, action: Action) -> int:
    s = result.schedule
    if s.duplicated_stages:
        return action.direction
    ranks_down = s.num_stages // 2 if s.num_stages > s.num_ranks else s.num_stages
    return int(action.stage >= ranks_down)  # DualPipeV: the way back up


def plot_timeline(result: SimResult, path: str | Path, title: str | None = None, spans: list[Span] | None = None) -> Path:
    """Write the timeline PNG to `path` and return it. `spans` defaults to the simulated ones
    (pass measured spans to draw a real run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    spans = result.spans if spans is None else spans
    s = result.schedule
    end = max(sp.end for sp in spans)
    fig, ax = plt.subplots(figsize=(max(8.0, min(30.0, 0.45 * len(spans) / s.num_ranks + 4)), 0.6 * s.num_ranks + 1.4))

    def box(x0: float, x1: float, y0: float, height: float, action: Action, frame: bool) -> None:
        colour = COLOURS[action.op][_shade(result, action)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, height, facecolor=colour,
                               edgecolor="black", linewidth=1.2 if frame else 0.4))
        ax.text((x0 + x1) / 2, y0 + height / 2, str(action.microbatch), ha="center", va="center",
                fontsize=7)

    for sp in spans:
        y = s.num_ranks - 1 - sp.rank
        if isinstance(sp.step, FB):
            box(sp.start, sp.end, y + 0.45, 0.45, sp.step.forward, True)
            box(sp.start, sp.end, y, 0.45, sp.step.backward, True)
        else:
            box(sp.start, sp.end, y, 0.9, sp.step, False)
    ax.set_xlim(0, end)
    ax.set_ylim(-0.1, s.num_ranks)
    ax.set_yticks([s.num_ranks - 1 - r + 0.45 for r in range(s.num_ranks)])
    ax.set_yticklabels([f"rank {r}" for r in range(s.num_ranks)])
    ax.set_xlabel("time")
    ax.set_title(title or f"{s.name}: {s.num_ranks} ranks, {s.num_microbatches} micro-batches, "
                 f"step {result.makespan:g}, max bubble {result.max_bubble:g}")
    legend = [Patch(facecolor=COLOURS[op][0], label=name) for op, name in
              ((Op.F, "forward"), (Op.B, "backward (input)"), (Op.W, "backward (weights)"),
               (Op.BW, "full backward"))]
    legend.append(Patch(facecolor="white", edgecolor="black", linewidth=1.2, label="overlapped F&B"))
    legend.append(Patch(facecolor="#666666", label="darker: direction 1 / way back"))
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=6, fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
