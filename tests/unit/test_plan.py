"""The capacity planner's arithmetic: parameter and FLOP counts against hand-computed values and the
built model, the 671B / 37B totals, memory that shrinks as ZeRO-1 and recompute say, layout errors."""

import subprocess
import sys

import pytest
import torch
from helpers import small_model_config

from moetron.config import ConfigError
from moetron.config.hardware import HardwareConfig
from moetron.model.flops import training_flops_per_token
from moetron.model.param_count import count_parameters
from moetron.plan import dispatch_rows, load_plan_config, make_plan
from moetron.plan.stages import split_stages, stage_counts

# A small MoE layout used by the memory tests: lite_16b is big enough for every item to matter.
LITE = ["model=lite_16b", "train=v3", "fp8=emulated", "hardware=h100", "train.global_batch_size=256",
        "train.batch_ramp_start=256",
        "plan.timeline="]


def hand_count(c) -> tuple[int, int]:
    """(total without MTP, activated) written out matrix by matrix, the way the HF checkpoint stores them."""
    h, n = c.hidden_size, c.num_attention_heads
    attn = (h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n * (c.qk_nope_head_dim + c.qk_rope_head_dim)
            + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim) + n * c.v_head_dim * h)
    norms = 2 * h
    dense = 3 * h * c.intermediate_size
    expert = 3 * h * c.moe_intermediate_size
    moe_all = c.n_routed_experts * h + (c.n_shared_experts + c.n_routed_experts) * expert
    moe_act = c.n_routed_experts * h + (c.n_shared_experts + c.num_experts_per_tok) * expert
    k, m = c.first_k_dense_replace, c.num_hidden_layers - c.first_k_dense_replace
    shared = 2 * c.vocab_size * h + h
    return (shared + k * (attn + norms + dense) + m * (attn + norms + moe_all),
            shared + k * (attn + norms + dense) + m * (attn + norms + moe_act))


def test_parameter_counts_match_hand_count_and_the_built_model():
    from moetron.model.transformer import DeepSeekV3

    c = small_model_config()
    counts = count_parameters(c)
    assert (counts.total, counts.activated) == hand_count(c)
    torch.manual_seed(0)
    built = sum(p.numel() for p in DeepSeekV3(c).parameters())
    assert counts.total + counts.mtp_own == built


def test_stages_hold_every_parameter_once():
    c = small_model_config(num_hidden_layers=5)
    counts = count_parameters(c)
    for num_stages in (1, 2, 3, 5):
        stages = split_stages(c, num_stages)
        assert [s.index for s in stages] == list(range(num_stages))
        assert sum(s.layers for s in stages) == c.num_hidden_layers + c.num_nextn_predict_layers
        assert stages[0].embedding and stages[-1].head and stages[-1].mtp_modules == 1
        held = 0
        for s in stages:
            sc = stage_counts(c, s, 64, ep=1, tp=1)
            held += sc.params_dense + sc.params_expert
        copy = c.vocab_size * c.hidden_size if num_stages > 1 else 0  # the last stage's MTP embedding
        assert held == counts.total + counts.mtp_own + copy


def test_flops_per_token_by_hand():
    c = small_model_config(num_nextn_predict_layers=0)
    seq = 64
    _, activated = hand_count(c)
    core = 2 * c.num_attention_heads * (seq / 2) * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    expected = 6 * (activated - c.vocab_size * c.hidden_size) + 3 * c.num_hidden_layers * core
    assert training_flops_per_token(c, seq) == pytest.approx(expected)
    # the planner's per-stage forward FLOPs x 3 add up to the same (norm vectors aside)
    stages = split_stages(c, 2)
    fwd = sum(sum(stage_counts(c, s, seq, 1, 1).flops.values()) for s in stages)
    assert 3 * fwd == pytest.approx(expected, rel=0.01)


def test_v3_totals():
    c = load_plan_config(["model=v3_671b", "train=v3"]).model
    counts = count_parameters(c)
    assert counts.total / 1e9 == pytest.approx(671, rel=0.005)
    assert counts.activated / 1e9 == pytest.approx(37, rel=0.02)
    assert counts.mtp / 1e9 == pytest.approx(14, rel=0.05)  # with its copies of embedding and head
    # FLOPs: 6 x activated (37B) plus the attention core at 4K
    assert 230e9 < training_flops_per_token(c, 4096) < 290e9


def test_dispatch_rows_v3_layout():
    cfg = load_plan_config(["model=v3_671b", "train=v3", "parallel.pp=16", "parallel.dp=128", "parallel.ep=64",
                            "parallel.schedule=dualpipe", "hardware=h800", "parallel.ranks_per_node=8"])
    inter, intra = dispatch_rows(cfg)
    assert inter == pytest.approx(3.5)  # 4 of 8 nodes kept; the home node is one of them half the time
    assert 7 < intra < 8  # ~8 experts on distinct GPUs, minus the home GPU's share
    single = load_plan_config(["model=v3_671b", "train=v3"])
    assert dispatch_rows(single) == (0.0, 0.0)


def _item(plan, prefix):
    return next(v for k, v in plan.memory.items() if k.startswith(prefix))


def test_zero1_divides_masters_and_moments_by_dp():
    one = make_plan(load_plan_config([*LITE, "parallel.pp=2", "parallel.dp=1"]))
    four = make_plan(load_plan_config([*LITE, "parallel.pp=2", "parallel.dp=4"]))
    for item in ("FP32 master", "AdamW moments"):
        assert _item(four, item) == pytest.approx(_item(one, item) / 4)
    for item in ("parameters", "gradients"):  # not sharded by ZeRO-1
        assert _item(four, item) == pytest.approx(_item(one, item))
    # experts: sharded over EP, their optimizer state over the dp / ep replicas of each expert
    ep = make_plan(load_plan_config([*LITE, "parallel.pp=2", "parallel.dp=4", "parallel.ep=4"]))
    assert _item(ep, "parameters") < _item(four, "parameters")


def test_recompute_and_fp8_shrink_activations():
    acts = {}
    for mode in ("none", "selective", "full"):
        acts[mode] = _item(make_plan(load_plan_config([*LITE, "parallel.pp=2", f"plan.recompute={mode}"])), "activations")
    assert acts["none"] > acts["selective"] > acts["full"] > 0
    bf16 = _item(make_plan(load_plan_config([*LITE, "parallel.pp=2", "fp8=disabled"])), "activations")
    assert bf16 > acts["selective"]


def test_dualpipe_doubles_parameters_and_holds_pp_plus_one_chunks():
    base = [*LITE, "model.num_hidden_layers=24", "model.num_nextn_predict_layers=0", "parallel.pp=4"]
    f1b = make_plan(load_plan_config([*base, "parallel.schedule=1f1b"]))
    dual = make_plan(load_plan_config([*base, "parallel.schedule=dualpipe"]))
    assert max(f1b.sim.peak_activations) == 4 and max(dual.sim.peak_activations) == 5
    # rank 1 holds stage 1 only (1F1B) or stages 1 and 2 (DualPipe): 6 MoE layers each
    assert dual.rank_stages[1] == [1, 2]
    p1 = stage_counts(f1b.cfg.model, f1b.stages[1], 4096, 1, 1).params_dense
    p2 = sum(stage_counts(dual.cfg.model, dual.stages[s], 4096, 1, 1).params_dense for s in [1, 2])
    assert p2 == pytest.approx(2 * p1)


def test_more_compute_is_faster_and_throughput_is_consistent():
    slow = make_plan(load_plan_config([*LITE, "parallel.pp=2", "hardware.achievable_fraction=0.2"]))
    fast = make_plan(load_plan_config([*LITE, "parallel.pp=2", "hardware.achievable_fraction=0.4"]))
    assert fast.step_time < slow.step_time
    p = fast
    tokens = p.cfg.train.global_batch_size * p.cfg.train.seq_len
    assert p.tokens_per_s_per_gpu == pytest.approx(tokens / p.step_time / p.cfg.parallel.world_size)
    assert p.gpu_hours_per_trillion == pytest.approx(1e12 / p.tokens_per_s_per_gpu / 3600)
    assert 0 < p.mfu < 1 and 0 <= p.comm_hidden <= 1


def test_report_layout_fits_and_is_near_180k_gpu_hours():
    cfg = load_plan_config(["model=v3_671b", "train=v3", "fp8=emulated", "hardware=h800", "parallel.pp=16",
                            "parallel.dp=128", "parallel.ep=64", "parallel.schedule=dualpipe",
                            "parallel.ranks_per_node=8", "plan.timeline="])
    p = make_plan(cfg)
    assert p.fits and p.memory_total < 80e9
    assert abs(p.gpu_hours_per_trillion / 180e3 - 1) < 0.30
    assert max(p.sim.peak_activations) == 17  # PP + 1


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["parallel.dp=3", "parallel.ep=3"], "parallel.ep"),  # 3 does not divide 64 experts
        (["parallel.pp=3", "parallel.schedule=dualpipe"], "parallel.pp"),  # DualPipe needs an even PP
        (["parallel.pp=40"], "parallel.pp"),  # more stages than layers
        (["parallel.pp=8", "parallel.schedule=dualpipe", "train.global_batch_size=8", "train.batch_ramp_start=8"], "train.global_batch_size"),
        (["parallel.dp=3"], "train.global_batch_size"),  # 256 sequences do not split over 3 replicas
        (["plan.recompute=some"], "plan.recompute"),
        (["hardware.achievable_fraction=0"], "hardware.achievable_fraction"),
        (["parallel.tp=3"], "parallel.tp"),
    ],
)
def test_bad_layouts_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        load_plan_config([*LITE, *overrides])


def test_hardware_presets_validate():
    for name in ("h800", "h100", "h200", "b200", "cpu_local"):
        hw = load_plan_config([f"hardware={name}"]).hardware
        assert isinstance(hw, HardwareConfig) and hw.name == name
        assert hw.fp8_tflops >= hw.bf16_tflops >= hw.fp32_tflops > 0


def test_cli_prints_the_plan_and_fails_cleanly(tmp_path):
    png = tmp_path / "t.png"
    ok = subprocess.run([sys.executable, "-m", "moetron.plan", f"plan.timeline={png}",
                         f"plan.json={tmp_path / 'p.json'}"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "FITS" in ok.stdout and "GPU-hours per trillion tokens" in ok.stdout
    assert png.exists() and (tmp_path / "p.json").exists()
    bad = subprocess.run([sys.executable, "-m", "moetron.plan", "parallel.ep=3", "parallel.dp=6"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "`parallel.ep`" in bad.stderr and "Traceback" not in bad.stderr


def test_rank_order_decides_which_groups_cross_nodes():
    from moetron.config import ParallelConfig
    from moetron.plan.planner import _crosses_nodes, _ep_nodes

    if not hasattr(ParallelConfig(), "rank_order"):
        pytest.skip("parallel.rank_order is not in this tree yet")
    base = ["hardware=cpu_local", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.ranks_per_node=2",
            "parallel.schedule=dualpipe", "train.micro_batch_size=1", "train.batch_ramp_start=16"]
    pipelines_in_node = load_plan_config([*base, "parallel.rank_order=tp-pp-dp"])
    assert _ep_nodes(pipelines_in_node) == 2 and not _crosses_nodes(pipelines_in_node, "pp")
    assert dispatch_rows(pipelines_in_node)[0] == pytest.approx(0.5)  # 1 of 2 groups kept: remote half the time
    dp_in_node = load_plan_config([*base, "parallel.rank_order=tp-dp-pp"])
    assert _ep_nodes(dp_in_node) == 1 and _crosses_nodes(dp_in_node, "pp")
    assert dispatch_rows(dp_in_node)[0] == 0.0
