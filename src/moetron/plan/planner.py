"""The capacity plan of one layout: per-rank memory (itemised) and predicted step time.

Step time: per-chunk forward (F), input-backward (B), weight-backward (W) and all-to-all times from
FLOP and byte counts, fed to the schedule simulator of moetron.parallel. Assumptions are fields of
the `hardware` and `plan` config groups, so every one of them can be varied from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb

from moetron.model.flops import training_flops_per_token
from moetron.model.param_count import count_parameters
from moetron.parallel import FB, Costs, Op, SimResult, build_schedule, simulate
from moetron.plan.config import PlanConfig
from moetron.plan.memory import (
    GB,
    Precision,
    layer_activation_full,
    peak_weighted,
    stage_activation_per_token,
)
from moetron.plan.stages import LayerCounts, Stage, split_stages, stage_counts


@dataclass
class ChunkTimes:
    """Seconds for one micro-batch through one rank's stage (averaged over the rank's stages)."""

    f_comp: float
    b_comp: float  # input gradient, attention-core backward and recomputation
    w_comp: float
    f_comm: float  # all-to-all (dispatch + combine) and tensor-parallel reductions of the forward
    b_comm: float


@dataclass
class Plan:
    cfg: PlanConfig
    stages: list[Stage]
    rank_stages: list[list[int]]
    memory: dict[str, float]  # item -> bytes, on the rank with the most memory
    memory_rank: int
    memory_per_rank: list[float]
    chunk: ChunkTimes  # of the busiest rank, which sets the pace of the simulated pipeline
    chunk_rank: int
    sim: SimResult
    step_time: float
    dp_sync_time: float
    comm_hidden: float
    tokens_per_step: int
    flops_per_token: float
    notes: list[str] = field(default_factory=list)
    items_per_rank: list[dict[str, float]] = field(default_factory=list)  # memory items of each pipeline rank

    # ---- headline figures
    @property
    def world_size(self) -> int:
        return self.cfg.parallel.world_size

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.memory_total <= self.cfg.hardware.gpu_memory_gb * GB

    @property
    def largest_items(self) -> list[tuple[str, float]]:
        return sorted(self.memory.items(), key=lambda kv: -kv[1])[:3]

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_time / self.world_size

    @property
    def mfu(self) -> float:
        """Model FLOPs (6N + attention, recomputation not counted) over the dense BF16 peak."""
        hw = self.cfg.hardware
        peak = hw.fp32_tflops if self.cfg.train.precision == "fp32" and not self.cfg.fp8.enabled else hw.bf16_tflops
        return self.tokens_per_s_per_gpu * self.flops_per_token / (peak * 1e12)

    @property
    def gpu_hours_per_trillion(self) -> float:
        return 1e12 / self.tokens_per_s_per_gpu / 3600

    def as_dict(self) -> dict:
        out = {
            "model": self.cfg.model.name, "hardware": self.cfg.hardware.name, "schedule": self.cfg.parallel.schedule,
            "pp": self.cfg.parallel.pp, "dp": self.cfg.parallel.dp, "ep": self.cfg.parallel.ep,
            "tp": self.cfg.parallel.tp, "world_size": self.world_size, "ranks_per_node": self.cfg.ranks_per_node,
            "microbatches": self.cfg.microbatches, "recompute": self.cfg.plan.recompute,
            "fp8": self.cfg.fp8.enabled, "achievable_fraction": self.cfg.hardware.achievable_fraction,
            "memory_gb": self.memory_total / GB, "memory_rank": self.memory_rank,
            "gpu_memory_gb": self.cfg.hardware.gpu_memory_gb, "fits": self.fits,
            "peak_chunks_in_flight": max(self.sim.peak_activations),
            "step_time_s": self.step_time, "pipeline_time_s": self.sim.makespan, "dp_sync_s": self.dp_sync_time,
            "bubble_share": self.sim.max_bubble / self.sim.makespan, "comm_hidden_share": self.comm_hidden,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "mfu": self.mfu,
            "gpu_hours_per_trillion_tokens": self.gpu_hours_per_trillion, "flops_per_token": self.flops_per_token,
        }
        out.update({f"chunk_{k}_s": v for k, v in vars(self.chunk).items()})
        out.update({f"mem_{_key(k)}_gb": v / GB for k, v in self.memory.items()})
        return out

    def report(self) -> str:
        c, p, hw = self.cfg, self.cfg.parallel, self.cfg.hardware
        counts = count_parameters(c.model)
        lines = [
            f"moetron plan: model={c.model.name} ({counts.total / 1e9:.2f}B total, {counts.activated / 1e9:.2f}B "
            f"activated, +{counts.mtp_own / 1e9:.2f}B MTP) on {self.world_size} x {hw.name} ({c.ranks_per_node}/node)",
            f"layout: PP {p.pp} x DP {p.dp} x TP {p.tp}, EP {p.ep} ({_ep_nodes(c)} node(s)), {p.schedule}, "
            f"{c.microbatches} micro-batches of {c.train.micro_batch_size} x {c.train.seq_len} tokens per pipeline, "
            f"FP8 {'on' if c.fp8.enabled else 'off'}, recompute {c.plan.recompute}",
            f"stages of rank {self.memory_rank}: " + ", ".join(_stage_str(self.stages[s]) for s in self.rank_stages[self.memory_rank]),
            "",
            f"memory per rank (rank {self.memory_rank}, the fullest):",
        ]
        for name, value in self.memory.items():
            lines.append(f"  {name:<52}{value / GB:>9.2f} GB")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<52}{self.memory_total / GB:>9.2f} GB of {hw.gpu_memory_gb:g} GB -> {verdict}")
        lines.append("  largest: " + "; ".join(f"{k} {v / GB:.1f} GB" for k, v in self.largest_items))
        ch = self.chunk
        lines += [
            "",
            f"time per chunk (one micro-batch through one stage of rank {self.chunk_rank}, the busiest): F {_ms(ch.f_comp)} compute + {_ms(ch.f_comm)} "
            f"all-to-all, B {_ms(ch.b_comp)} + {_ms(ch.b_comm)}, W {_ms(ch.w_comp)}",
            f"step: {self.step_time:.3f} s (pipeline {self.sim.makespan:.3f} s, bubble "
            f"{100 * self.sim.max_bubble / self.sim.makespan:.1f}%, DP gradient sync {self.dp_sync_time:.3f} s, "
            f"optimizer {self.step_time - self.sim.makespan - self.dp_sync_time * (1 - c.plan.dp_overlap):.3f} s), "
            f"{100 * self.comm_hidden:.0f}% of communication hidden",
            f"throughput: {self.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, MFU {100 * self.mfu:.1f}% "
            f"(of dense {'FP32' if c.train.precision == 'fp32' and not c.fp8.enabled else 'BF16'} peak), "
            f"{self.gpu_hours_per_trillion / 1e3:,.1f}K GPU-hours per trillion tokens",
            f"assumptions: {hw.achievable_fraction:.0%} of peak TFLOP/s, {hw.comm_sm_fraction:.0%} of compute "
            f"units on communication while overlapped, IB {hw.internode_gbps:g} GB/s, NVLink {hw.nvlink_gbps:g} GB/s per GPU",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _key(name: str) -> str:
    return name.split(" (")[0].replace(" ", "_").replace("-", "_").lower()


def _ms(t: float) -> str:
    return f"{t * 1e3:.2f} ms"


def _stage_str(s: Stage) -> str:
    parts = [f"stage {s.index}:"]
    parts += ["embedding"] if s.embedding else []
    parts += [f"{s.dense_layers} dense"] if s.dense_layers else []
    parts += [f"{s.moe_layers} MoE"] if s.moe_layers else []
    parts += [f"{s.mtp_modules} MTP"] if s.mtp_modules else []
    parts += ["head"] if s.head else []
    return " ".join(parts)


def _stride(cfg: PlanConfig, kind: str) -> int:
    """Distance in global rank between neighbours of a `kind` ("dp" or "pp") group."""
    p = cfg.parallel
    order = getattr(p, "rank_order", "tp-dp-pp")  # fastest-varying index first
    stride = 1
    for name in order.split("-"):
        if name == kind:
            return stride
        stride *= getattr(p, name)
    return stride


def _ep_nodes(cfg: PlanConfig) -> int:
    """Nodes one expert-parallel group spans (its ranks are data-parallel neighbours)."""
    per_node = max(1, cfg.ranks_per_node // _stride(cfg, "dp"))
    return max(1, -(-cfg.parallel.ep // per_node))


def _crosses_nodes(cfg: PlanConfig, kind: str) -> bool:
    """Whether a `kind` group ("dp" or "pp") has members on more than one node."""
    return _stride(cfg, kind) * getattr(cfg.parallel, kind) > cfg.ranks_per_node


def _p_hit(total: int, per_bin: int, chosen: int) -> float:
    """Chance a bin of `per_bin` items is touched when `chosen` of `total` items are drawn uniformly."""
    if chosen > total - per_bin:
        return 1.0
    return 1.0 - comb(total - per_bin, chosen) / comb(total, chosen)


def dispatch_rows(cfg: PlanConfig) -> tuple[float, float]:
    """(rows sent across nodes, rows sent inside nodes) per token for one dispatch, with node-limited
    routing and the two-hop path: one IB copy per remote node, NVLink to each distinct target GPU."""
    m, ep = cfg.model, cfg.parallel.ep
    if ep == 1:
        return 0.0, 0.0
    nodes = _ep_nodes(cfg)
    inter = 0.0
    if nodes > 1:
        if m.n_group % nodes == 0:  # groups map onto nodes: M of G groups are kept
            hit = _p_hit(m.n_group, m.n_group // nodes, m.topk_group)
        else:
            hit = _p_hit(m.n_routed_experts, m.n_routed_experts // nodes, m.num_experts_per_tok)
        inter = (nodes - 1) * hit
    per_gpu = m.n_routed_experts // ep
    gpus = ep * _p_hit(m.n_routed_experts, per_gpu, m.num_experts_per_tok)  # distinct target GPUs
    intra = gpus * (1 - 1 / ep)  # all but the home GPU's share, over NVLink (after IB for remote nodes)
    return inter, intra


def _compute_rates(cfg: PlanConfig, overlapped: bool) -> dict[str, float]:
    hw = cfg.hardware
    plain = hw.fp32_tflops if cfg.train.precision == "fp32" and not cfg.fp8.enabled else hw.bf16_tflops
    gemm = hw.fp8_tflops if cfg.fp8.enabled else plain
    scale = 1e12 * hw.achievable_fraction * ((1 - hw.comm_sm_fraction) if overlapped else 1.0)
    return {"linear": gemm * scale, "expert": gemm * scale, "attn_core": plain * scale,
            "router": plain * scale, "head": plain * scale}


def _chunk_times(cfg: PlanConfig, counts: LayerCounts, stage: Stage, overlapped: bool) -> ChunkTimes:
    m, t, hw, p = cfg.model, cfg.train, cfg.hardware, cfg.parallel
    tokens = t.micro_batch_size * t.seq_len
    rate = _compute_rates(cfg, overlapped)
    fwd = sum(tokens * v / rate[k] for k, v in counts.flops.items())
    core = tokens * counts.flops.get("attn_core", 0.0) / rate["attn_core"]
    gemm = fwd - core
    recompute = {"none": 0.0, "selective": tokens * counts.up_proj_flops / rate["linear"], "full": fwd}[cfg.plan.recompute]
    overhead = counts.ops * hw.op_overhead_us * 1e-6
    f_comp = fwd + overhead
    b_comp = gemm + 2 * core + recompute + overhead * (2 if cfg.plan.recompute == "full" else 1)
    w_comp = gemm + overhead
    # all-to-all of the MoE layers (dispatch FP8 or BF16, combine BF16; backward both BF16)
    moe_layers = stage.moe_layers + stage.mtp_modules if m.first_k_dense_replace < m.num_hidden_layers else 0
    act = 4 if t.precision == "fp32" and not cfg.fp8.enabled else 2
    h = m.hidden_size
    row_fp8 = h + 4 * h / 128 + 12 * m.num_experts_per_tok  # payload, 1x128 scales, gates and ids
    row_dispatch = row_fp8 if cfg.fp8.enabled else act * h
    inter, intra = dispatch_rows(cfg)

    def a2a(row_bytes: float) -> float:
        return tokens * max(inter * row_bytes / (hw.internode_gbps * 1e9), intra * row_bytes / (hw.nvlink_gbps * 1e9))

    f_comm = moe_layers * (a2a(row_dispatch) + a2a(act * h))
    b_comm = moe_layers * 2 * a2a(act * h)
    if p.tp > 1:  # two all-reduces per layer each way, inside the node
        ar = 2 * (p.tp - 1) / p.tp * tokens * act * h / (hw.nvlink_gbps * 1e9)
        f_comm += 2 * stage.layers * ar
        b_comm += 2 * stage.layers * ar
    return ChunkTimes(f_comp, b_comp, w_comp, f_comm, b_comm)


def _mean_times(times: list[ChunkTimes]) -> ChunkTimes:
    n = len(times)
    return ChunkTimes(*(sum(getattr(t, k) for t in times) / n for k in ("f_comp", "b_comp", "w_comp", "f_comm", "b_comm")))


def make_plan(cfg: PlanConfig) -> Plan:
    m, t, p, hw = cfg.model, cfg.train, cfg.parallel, cfg.hardware
    schedule = build_schedule(p.schedule, p.pp, cfg.microbatches)
    stages = split_stages(m, schedule.num_stages)
    rank_stages = [sorted({sid.stage for sid in schedule.stages_of(r)}) for r in range(schedule.num_ranks)]
    counts = [stage_counts(m, s, t.seq_len, p.ep, p.tp) for s in stages]
    prec = Precision.of(t.precision, cfg.fp8.enabled)
    tokens = t.micro_batch_size * t.seq_len
    fused_attention = hw.name != "cpu_local"
    act_per_chunk = [tokens * stage_activation_per_token(m, s, t.seq_len, p.tp, prec, cfg.plan.recompute,
                                                         fused_attention, cfg.plan.fused_cross_entropy) for s in stages]
    # ---- memory, per rank
    pbytes = 4 if t.precision == "fp32" and not cfg.fp8.enabled else 2  # activations, all-to-all, P2P
    wbytes = 2 if t.param_dtype == "bf16" else 4  # the model's parameters (train.param_dtype)
    mbytes = 2 if t.optim.moment_dtype == "bfloat16" else 4
    zero1 = getattr(p, "zero1", True)
    edp = max(1, p.dp // p.ep) if zero1 else 1  # data-parallel replicas of one expert (ZeRO-1 shards over them)
    dp_shard = p.dp if zero1 else 1
    ep_on = p.ep > 1 and m.first_k_dense_replace < m.num_hidden_layers
    per_rank, items_of = [], []
    # ZeRO-1 as the trainer does it (train/zero.py): a tensor's masters and moments are sharded over every
    # rank holding it -- its DP (or expert-DP) replicas times the pipeline ranks holding its stage (DualPipe:
    # two; the embedding with MTP: stage 0's and the last stage's ranks).
    pp_holders = [len({pp for sid, pp in schedule.placement.items() if sid.stage == s}) for s in range(len(stages))]
    embedding = m.vocab_size * m.hidden_size
    emb_holders = len({pp for sid, pp in schedule.placement.items() if sid.stage in (0, len(stages) - 1)}) \
        if stages[-1].mtp_embedding else pp_holders[0]
    for r, own in enumerate(rank_stages):
        copies = schedule.stages_of(r)
        dense = sum(counts[sid.stage].params_dense for sid in copies)
        expert = sum(counts[sid.stage].params_expert for sid in copies)
        held = lambda sid: pp_holders[sid.stage] if zero1 else 1  # noqa: E731
        shard = sum(counts[sid.stage].params_dense / (dp_shard * held(sid))
                    + counts[sid.stage].params_expert / (edp * held(sid)) for sid in copies)
        for sid in copies:  # the embedding's holders are its own (stage 0 and the last stage with MTP)
            if (stages[sid.stage].embedding or stages[sid.stage].mtp_embedding) and zero1:
                shard += embedding / (dp_shard * emb_holders) - embedding / (dp_shard * held(sid))
        if {0, len(stages) - 1} <= set(own) and stages[-1].mtp_embedding:
            dense -= embedding  # the MTP modules use stage 0's embedding Parameter itself
            shard -= embedding / (dp_shard * emb_holders) if zero1 else embedding
        n = len(copies)
        x2 = f", {n} stage copies" if n > 1 else ""
        over = f"ZeRO-1 over dp {p.dp}" + (f" x {max(pp_holders)} copies" if max(pp_holders) > 1 else "")
        items = {f"parameters ({'BF16' if wbytes == 2 else 'FP32'}{x2})": wbytes * (dense + expert)}
        items[f"FP32 master weights ({over if zero1 else 'not sharded'})"] = 4 * shard
        items["gradients (FP32 accumulation)"] = 4 * (dense + expert)
        items[f"AdamW moments (2 x {'BF16' if mbytes == 2 else 'FP32'}{', ZeRO-1' if zero1 else ''})"] = 2 * mbytes * shard
        peak = peak_weighted(schedule.steps[r], lambda s: act_per_chunk[s])
        items[f"activations (peak in flight, recompute {cfg.plan.recompute})"] = peak
        moe_here = any(stages[s].moe_layers + stages[s].mtp_modules for s in own)
        buffers = 0.0
        if ep_on and moe_here:
            row = (m.hidden_size + m.hidden_size / 32) if cfg.fp8.enabled else pbytes * m.hidden_size
            buffers += 2 * tokens * m.num_experts_per_tok * (row + pbytes * m.hidden_size)  # 2 chunks overlapped
        if p.pp > 1:
            buffers += 4 * tokens * pbytes * m.hidden_size  # send / receive, both directions
        items["communication buffers (all-to-all, P2P)"] = buffers
        work = 2 * tokens * layer_activation_full(m, t.seq_len, p.tp, prec, fused_attention)
        if any(stages[s].head for s in own):
            work = max(work, tokens * m.vocab_size * (4 / 8 if cfg.plan.fused_cross_entropy else 8))
        items["transient workspace (one layer / loss)"] = work
        items["runtime (context, allocator, libraries)"] = hw.runtime_overhead_gb * GB
        per_rank.append(sum(items.values()))
        items_of.append(items)
    fullest = max(range(len(per_rank)), key=per_rank.__getitem__)
    # ---- time
    overlapped = p.overlap and ep_on and p.schedule in ("dualpipe", "dualpipev")
    times = [_mean_times([_chunk_times(cfg, counts[s], stages[s], overlapped) for s in own]) for own in rank_stages]

    def pace(c: ChunkTimes) -> float:  # one forward + one backward chunk, overlapped where the schedule pairs them
        if overlapped:
            return max(c.f_comp + c.b_comp + c.w_comp, c.f_comm + c.b_comm)
        return c.f_comp + c.f_comm + c.b_comp + c.w_comp + c.b_comm

    busiest = max(range(len(times)), key=lambda r: pace(times[r]))
    ch = times[busiest]
    f = ch.f_comp + ch.f_comm
    b = ch.b_comp + ch.w_comp + ch.b_comm
    fb = pace(ch) if overlapped else None
    bw = (hw.internode_gbps if _crosses_nodes(cfg, "pp") else hw.nvlink_gbps) * 1e9
    p2p = (tokens * pbytes * m.hidden_size / bw + hw.p2p_latency_us * 1e-6) if p.pp > 1 else 0.0
    sim = simulate(schedule, Costs(f=f, b=b, w=ch.w_comp, fb=fb, p2p=p2p))
    # data-parallel sync (ZeRO-1: reduce-scatter FP32 gradients, all-gather BF16 parameters)
    copies = schedule.stages_of(busiest)
    dense = sum(counts[sid.stage].params_dense for sid in copies)
    expert = sum(counts[sid.stage].params_expert for sid in copies)
    if {0, len(stages) - 1} <= set(rank_stages[busiest]) and stages[-1].mtp_embedding:
        dense -= embedding  # one Parameter for both ends
    dp_bw = (hw.internode_gbps if _crosses_nodes(cfg, "dp") else hw.nvlink_gbps) * 1e9
    replicas = max(1, p.dp // p.ep)
    sync_bytes = (4 + wbytes) * (dense * (p.dp - 1) / p.dp + expert * (replicas - 1) / replicas)
    dp_sync = sync_bytes / dp_bw
    # optimizer step: ~12 eager ops per parameter tensor (AdamW with low-precision moments, clipping);
    # on GPUs the kernels are memory-bound and short, on CPU their launch cost shows
    tensors = 16 * sum(stages[s].layers for s in rank_stages[busiest]) + 3
    optimizer = 12 * tensors * hw.op_overhead_us * 1e-6
    step = sim.makespan + dp_sync * (1 - cfg.plan.dp_overlap) + optimizer
    # share of communication hidden: every rank's all-to-all with its own chunk times, plus the DP sync
    total = exposed = 0.0
    for span in sim.spans:
        own = times[span.rank]
        if isinstance(span.step, FB):
            comm, comp = own.f_comm + own.b_comm, own.f_comp + own.b_comp + own.w_comp
            total += comm
            exposed += max(0.0, comm - comp) if overlapped else comm
        elif span.step.op == Op.F:
            total += own.f_comm
            exposed += own.f_comm
        elif span.step.op in (Op.B, Op.BW):
            total += own.b_comm
            exposed += own.b_comm
    total += dp_sync * len(times)
    exposed += dp_sync * (1 - cfg.plan.dp_overlap) * len(times)
    hidden = 1 - exposed / total if total > 0 else 1.0
    notes = []
    if p.schedule in ("dualpipe", "dualpipev"):
        notes.append("DualPipe: every rank holds two stage copies (parameters and gradients 2x), "
                     f"peak in-flight chunks {max(sim.peak_activations)} (PP+1 = {p.pp + 1}).")
    return Plan(cfg, stages, rank_stages, items_of[fullest], fullest, per_rank, ch, busiest, sim, step, dp_sync, hidden,
                t.global_batch_size * t.seq_len, training_flops_per_token(m, t.seq_len), notes, items_of)
