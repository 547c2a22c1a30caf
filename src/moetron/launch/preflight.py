"""`python -m moetron.launch.preflight [--run-dir DIR] [--device auto|cpu|cuda] [--min-free-gb N] [--mb N]`:
the first step of a job, before training. Every rank (torchrun, srun or mpiexec, as moetron.launch) checks

  device      run.device's choice works here (cuda:LOCAL_RANK with NCCL, or the CPU with gloo)
  disk        run.dir is writable and has at least --min-free-gb free
  code        the same moetron (package version, hash of the source tree, git commit) and torch everywhere
  network     all-reduce and all-to-all within each node, across nodes (rank r with rank r of every other
              node) and over the whole job: results checked, time and bus bandwidth measured

Rank 0 prints a table and writes run.dir/preflight.json. A failed check prints one paragraph naming each
failing rank and its reason, and every rank exits 1, so the job stops before any training step.
Bus bandwidth follows nccl-tests: all-reduce moves 2(n-1)/n of the buffer per rank, all-to-all (n-1)/n.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moetron.config.errors import ConfigError
from moetron.launch.bootstrap import LAUNCHERS, RankInfo, detect, export_env, init_process_group

GB = 1e9
MAX_RANK_ROWS = 32  # larger jobs: the first ranks in the table, every rank in preflight.json


@dataclass
class Options:
    run_dir: str = "runs/default"
    device: str = "auto"  # run.device
    min_free_gb: float = 10.0
    mb: float = 64.0  # buffer per rank of the timed collectives, MB
    iters: int = 3  # timed repetitions after one warm-up
    timeout: float = 300.0  # seconds before a collective that does not complete is a failure


def code_version() -> dict:
    """What must be the same on every rank: the moetron package and source tree, and torch."""
    import importlib.metadata

    import torch

    import moetron
    import moetron.comm
    import moetron.hydra_conf
    import moetron.parallel

    digest = hashlib.sha256()
    for package in (moetron, moetron.parallel, moetron.comm, moetron.hydra_conf):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".yaml", ".sbatch"):
                digest.update(f"{package.__name__}/{path.relative_to(root)}\n".encode())
                digest.update(path.read_bytes())
    try:
        version = importlib.metadata.version("moetron")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:  # informative only: the tree hash already says whether the code is the same
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(moetron.__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return dict(moetron=version, tree=digest.hexdigest()[:16], torch=torch.__version__, commit=commit or "-")


COMPARED = ("moetron", "tree", "torch")  # fields of code_version() that must agree


def _local_checks(opts: Options, info: RankInfo, version: dict) -> tuple[dict, list[str]]:
    """Device, disk and code of this rank: (facts, failure reasons)."""
    from moetron import device as dev

    facts = dict(rank=info.rank, node=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                 local_rank=info.local_rank, version=version, device="-", free_gb=None)
    failures = []
    try:
        device = dev.choose_device(opts.device, info.local_rank)
        if dev.is_gpu(device):
            import torch

            torch.cuda.set_device(device)
            torch.ones(1, device=device).sum().item()  # the device runs a kernel, not just enumerates
            facts["device"] = f"{device} ({torch.cuda.get_device_name(device)})"
        else:
            facts["device"] = str(device)
    except (ValueError, RuntimeError) as err:
        failures.append(f"device (run.device={opts.device}): {err}")
    run_dir = Path(opts.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".preflight-{info.rank}"
        probe.write_text("ok")
        probe.unlink()
        facts["free_gb"] = round(shutil.disk_usage(run_dir).free / GB, 1)
        if facts["free_gb"] < opts.min_free_gb:
            failures.append(f"free disk at run.dir {run_dir} is {facts['free_gb']} GB, below the minimum "
                            f"{opts.min_free_gb:g} GB (cluster.preflight_min_free_gb)")
    except OSError as err:
        failures.append(f"run.dir {run_dir} is not writable: {err.strerror or err}")
    return facts, failures


def _groups(info: RankInfo, backend: str) -> list[tuple[str, list[int], object]]:
    """(scope, ranks, group) for this rank: its node, its rail (one rank per node), the world. Creating
    groups is collective: every rank creates every group in the same order."""
    import torch.distributed as dist

    from moetron.parallel.mesh import MeshLayout

    mesh = MeshLayout(info.world_size, info.ranks_per_node)  # the trainer's node and rail partitions
    scopes = []
    if info.ranks_per_node > 1:
        scopes.append(("within a node", mesh.node_groups()))
    if info.num_nodes > 1:
        scopes.append(("across nodes", mesh.rail_groups()))
        scopes.append(("whole job", [list(range(info.world_size))]))
    mine = []
    for scope, partition in scopes:
        for ranks in partition:
            group = dist.new_group(ranks, backend=backend)
            if info.rank in ranks:
                mine.append((scope, ranks, group))
    return mine


def _time_collectives(opts: Options, info: RankInfo, device, groups) -> tuple[list[dict], list[str]]:
    """Timed all-reduce and all-to-all in each of this rank's groups. Rows are reported by the group's
    first rank: time = the slowest member's mean, bus bandwidth from it."""
    import torch
    import torch.distributed as dist

    from moetron import device as dev

    rows, failures = [], []
    for scope, ranks, group in groups:
        n = len(ranks)
        numel = max(n, int(opts.mb * 2**20 / 4) // n * n)  # float32, a whole chunk per peer
        for op in ("all_reduce", "all_to_all"):
            data = torch.ones(numel, device=device) if op == "all_reduce" else torch.full((numel,), float(info.rank),
                                                                                           device=device)
            out = torch.empty_like(data)
            times = []
            for i in range(opts.iters + 1):
                buf = data.clone() if op == "all_reduce" else data
                dev.synchronize(device)
                start = time.perf_counter()
                if op == "all_reduce":
                    dist.all_reduce(buf, group=group)
                else:
                    dist.all_to_all_single(out, buf, group=group)
                dev.synchronize(device)
                if i:  # the first is a warm-up (connections, buffers)
                    times.append(time.perf_counter() - start)
            if op == "all_reduce":
                ok = bool((buf[[0, -1]] == n).all())
                share = 2 * (n - 1) / n
            else:  # chunk i came from the group's i-th rank
                ends = out.view(n, -1)[:, [0, -1]]
                ok = bool((ends == torch.tensor(ranks, dtype=out.dtype, device=device)[:, None]).all())
                share = (n - 1) / n
            if not ok:
                failures.append(f"{op} {scope} (ranks {_span(ranks)}) returned wrong values")
            slowest = torch.tensor([statistics.mean(times)], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
            seconds = slowest.item()
            if info.rank == ranks[0]:
                rows.append(dict(op=op, scope=scope, ranks=ranks, mb=round(numel * 4 / 2**20, 2),
                                 ms=round(seconds * 1e3, 3), busbw_gbs=round(numel * 4 * share / seconds / GB, 3)))
    return rows, failures


def _span(ranks: list[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if ranks == list(range(ranks[0], ranks[-1] + 1)) else ",".join(map(str, ranks))


def _table(facts: list[dict], rows: list[dict], info: RankInfo) -> str:
    v = facts[0]["version"]
    lines = [f"moetron preflight: {info.world_size} ranks on {info.num_nodes} node(s), {info.ranks_per_node} per "
             f"node; moetron {v['moetron']} tree {v['tree']} commit {v['commit']}, torch {v['torch']}",
             f"  {'rank':>5}  {'node':<16} {'local':>5}  {'free GB':>8}  device"]
    shown = facts if len(facts) <= MAX_RANK_ROWS else facts[:MAX_RANK_ROWS // 2]
    lines += [f"  {f['rank']:>5}  {f['node']:<16} {f['local_rank']:>5}  {f['free_gb'] if f['free_gb'] is not None else '-':>8}"
              f"  {f['device']}" for f in shown]
    if len(shown) < len(facts):
        least = min((f for f in facts if f["free_gb"] is not None), key=lambda f: f["free_gb"], default=None)
        lines.append(f"  ... {len(facts) - len(shown)} more ranks in preflight.json" + (
            f"; least free disk: {least['free_gb']} GB on rank {least['rank']} ({least['node']})" if least else ""))
    if rows:
        lines.append(f"  {'collective':<11} {'scope':<14} {'groups':>6} {'ranks':>5} {'MB':>8} {'ms (max)':>9}  "
                     "bus GB/s min / median / max  (slowest group)")
    for op in ("all_reduce", "all_to_all"):
        for scope in dict.fromkeys(r["scope"] for r in rows):
            mine = [r for r in rows if r["op"] == op and r["scope"] == scope]
            if not mine:
                continue
            bw = sorted(r["busbw_gbs"] for r in mine)
            slow = min(mine, key=lambda r: r["busbw_gbs"])
            lines.append(f"  {op:<11} {scope:<14} {len(mine):>6} {len(mine[0]['ranks']):>5} {mine[0]['mb']:>8} "
                         f"{max(r['ms'] for r in mine):>9.2f}  {bw[0]:.3f} / {statistics.median(bw):.3f} / "
                         f"{bw[-1]:.3f}  (ranks {_span(slow['ranks'])})")
    return "\n".join(lines)


def _verdict(facts: list[dict], failures: list[list[str]]) -> str:
    """One paragraph naming every failing rank and its reasons ("" when all passed)."""
    parts = [f"rank {f['rank']} ({f['node']}, local rank {f['local_rank']}): {'; '.join(why)}"
             for f, why in zip(facts, failures, strict=True) if why]
    if not parts:
        return ""
    return (f"moetron preflight: failed on {len(parts)} of {len(facts)} ranks, nothing was trained. "
            + ". ".join(parts) + ".")


def run(opts: Options, info: RankInfo, version: Callable[[], dict] = code_version, out=sys.stdout) -> int:
    """The preflight of this rank; 0 if every check passed on every rank, else 1 (on every rank). Joins the
    process group through moetron.launch's bootstrap unless one is already there (then it is left as is)."""
    import torch.distributed as dist

    from moetron import device as dev

    owns_group = not dist.is_initialized()
    if owns_group:  # gloo first: it works whatever the devices, so a rank without its GPU can still report
        init_process_group(info, "gloo", opts.timeout)
    try:
        facts, failures = _local_checks(opts, info, version())
        everyone: list = [None] * info.world_size
        dist.all_gather_object(everyone, (facts, failures))
        facts_all = [f for f, _ in everyone]
        failures_all = [list(why) for _, why in everyone]
        reference = facts_all[0]["version"]
        for f, why in zip(facts_all, failures_all, strict=True):
            differ = [k for k in COMPARED if f["version"][k] != reference[k]]
            if differ:
                why.append("code differs from rank 0's: " + ", ".join(
                    f"{k} {f['version'][k]} (rank 0: {reference[k]})" for k in differ))
        rows = []
        if not any(failures_all):  # the devices work: time the collectives on them
            device = dev.choose_device(opts.device, info.local_rank)
            mine, bad = [], []
            try:
                mine, bad = _time_collectives(opts, info, device, _groups(info, dev.backend_of(device)))
            except RuntimeError as err:  # a timeout or a broken link (DistBackendError is one too)
                bad = [f"collective failed: {' '.join(str(err).split())[:300]}"]
            gathered: list = [None] * info.world_size
            dist.all_gather_object(gathered, (mine, bad))
            rows = [r for mine_, _ in gathered for r in mine_]
            failures_all = [list(b) for _, b in gathered]
        verdict = _verdict(facts_all, failures_all)
        if info.rank == 0:
            out.write(_table(facts_all, rows, info) + "\n")
            out.write((verdict or "moetron preflight: ok, every check passed") + "\n")
            out.flush()
            report = dict(ok=not verdict, world_size=info.world_size, num_nodes=info.num_nodes,
                          ranks_per_node=info.ranks_per_node, ranks=facts_all, collectives=rows,
                          failures={f["rank"]: why for f, why in zip(facts_all, failures_all, strict=True) if why},
                          message=verdict)
            try:
                Path(opts.run_dir, "preflight.json").write_text(json.dumps(report, indent=1) + "\n")
            except OSError:
                pass  # an unwritable run.dir is already in the verdict
        # Nobody exits before rank 0 has reported: srun --kill-on-bad-exit ends the step at the first exit 1.
        dist.barrier()
        return 1 if verdict else 0
    finally:
        if owns_group:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.launch.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=Options.run_dir)
    parser.add_argument("--device", default=Options.device)
    parser.add_argument("--min-free-gb", type=float, default=Options.min_free_gb)
    parser.add_argument("--mb", type=float, default=Options.mb)
    parser.add_argument("--iters", type=int, default=Options.iters)
    parser.add_argument("--timeout", type=float, default=Options.timeout)
    parser.add_argument("--launcher", default=os.environ.get("MOETRON_LAUNCHER", "auto"), choices=LAUNCHERS)
    args = parser.parse_args(argv)
    opts = Options(args.run_dir, args.device, args.min_free_gb, args.mb, args.iters, args.timeout)
    try:
        if not (opts.mb > 0 and opts.iters >= 1 and opts.min_free_gb >= 0 and opts.timeout > 0):
            raise ConfigError(f"Invalid preflight options: --mb {opts.mb}, --iters {opts.iters}, --min-free-gb "
                              f"{opts.min_free_gb}, --timeout {opts.timeout}. Valid: --mb > 0, --iters >= 1, "
                              "--min-free-gb >= 0, --timeout > 0.")
        info = detect(args.launcher)
    except ConfigError as err:
        print(f"moetron preflight: error: {err}", file=sys.stderr)
        return 2
    export_env(info)
    return run(opts, info)


if __name__ == "__main__":
    sys.exit(main())
