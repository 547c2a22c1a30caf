"""A step's performance figures from every rank, as a GPU user reads them: one small all-gather per step
brings each rank's memory peaks, phase times and communication waits to rank 0, which logs the headline
figures in metrics.jsonl (the step's time and phases as rank 0 saw them, the largest memory peak over ranks,
the mean share of the step blocked on EP and DP communication) and every rank's values in ranks.jsonl."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist

from moetron import device as dev
from moetron.train.timing import PHASES, share

MB = 2**20
# One row per rank, these columns: what each rank measured of the step.
COLUMNS = ("peak_rss_mb", "peak_device_allocated_mb", "peak_device_reserved_mb", "step_time",
           *(f"time_{p}" for p in PHASES), "ep_wait", "dp_wait")


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rank_row(device: torch.device, step_time: float, phases: dict[str, float], ep_wait: float,
             dp_wait: float) -> torch.Tensor:
    values = {"peak_rss_mb": peak_rss_mb(), "peak_device_allocated_mb": dev.peak_memory_bytes(device) / MB,
              "peak_device_reserved_mb": dev.reserved_memory_bytes(device) / MB, "step_time": step_time,
              **{f"time_{p}": phases[p] for p in PHASES}, "ep_wait": ep_wait, "dp_wait": dp_wait}
    return torch.tensor([values[c] for c in COLUMNS], dtype=torch.float64, device=device)


def gather_rows(row: torch.Tensor) -> torch.Tensor:
    """[world, len(COLUMNS)] on the host: every rank's row (a collective of the world group)."""
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return torch.stack(rows).to(dev.HOST)


def summarize(table: torch.Tensor, on_gpu: bool) -> tuple[dict, dict]:
    """(metrics.jsonl fields, ranks.jsonl fields) from the gathered table (rank 0 is row 0)."""
    col = {name: table[:, i].tolist() for i, name in enumerate(COLUMNS)}
    ranks = len(col["step_time"])
    ep = [share(w, t) for w, t in zip(col["ep_wait"], col["step_time"])]
    dp = [share(w, t) for w, t in zip(col["dp_wait"], col["step_time"])]
    memory = ("peak_rss_mb", "peak_device_allocated_mb", "peak_device_reserved_mb") if on_gpu else ("peak_rss_mb",)
    record = {"step_time": col["step_time"][0], **{f"time_{p}": col[f"time_{p}"][0] for p in PHASES},
              "ep_wait_share": sum(ep) / ranks, "dp_wait_share": sum(dp) / ranks,
              **{m: max(col[m]) for m in memory}}
    per_rank = {"step_time": col["step_time"], "ep_wait_share": ep, "dp_wait_share": dp,
                **{m: col[m] for m in memory}}
    return record, {k: [round(v, 4) for v in values] for k, values in per_rank.items()}
