"""A rank builds only its part, on the meta device, and materializes it with the weights one process has.

Each rank of a layout (DualPipe pp 2 x dp 2 with EP 2; 1F1B pp 2 with EP 2; FP8 on) is built in this process
under torch's fake process group; every tensor it holds (its stages' parameters, its routed experts by
GLOBAL id) must equal the same key of the full model built by one process with the same seed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import small_model_config
from moetron.comm import Transport
from moetron.parallel.mesh import MeshLayout, ProcessMesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from moetron.checkpoint.state import model_entries
from moetron.config import FP8Config, MoetronConfig, ParallelConfig
from moetron.model import DeepSeekV3
from moetron.train.parallelize import materialize, parallelize

SEED = 11
HOST = torch.device("cpu")


def build_rank(rank: int, config: MoetronConfig, param_dtype=torch.float32):
    par = config.parallel
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=par.world_size)
    try:
        mesh = ProcessMesh(MeshLayout(par.world_size, par.ranks_per_node, pp=par.pp, ep=par.ep, tp=1,
                                      order=par.rank_order))
        with torch.device("meta"):
            full = DeepSeekV3(config.model)
        staged = parallelize(full, mesh, config, Transport())
        return materialize(staged, HOST, SEED, config.model.initializer_range, param_dtype)
    finally:
        dist.destroy_process_group()


def config_for(parallel: ParallelConfig, fp8: bool = False) -> MoetronConfig:
    model = small_model_config(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)
    return MoetronConfig(model=model, parallel=parallel, fp8=FP8Config(enabled=fp8))


def reference(config: MoetronConfig) -> dict[str, torch.Tensor]:
    return model_entries(DeepSeekV3(config.model, seed=SEED))


def check_layout(config: MoetronConfig) -> set[str]:
    want, covered = reference(config), set()
    for rank in range(config.parallel.world_size):
        staged = build_rank(rank, config)
        for stage in staged.stages.values():
            for key, value in model_entries(stage).items():
                assert not value.is_meta, key
                assert torch.equal(value, want[key]), (rank, key)
                covered.add(key)
    return covered


def test_every_rank_of_dualpipe_ep_starts_from_the_single_process_weights():
    config = config_for(ParallelConfig(pp=2, dp=2, ep=2, schedule="dualpipe", ranks_per_node=2))
    assert check_layout(config) == set(reference(config))  # every key held somewhere


def test_1f1b_with_fp8_converted_on_meta_starts_from_the_same_weights():
    from moetron.fp8.grouped import FP8GroupedExperts
    from moetron.fp8.linear import FP8Linear

    config = config_for(ParallelConfig(pp=2, dp=2, ep=2, schedule="1f1b", ranks_per_node=2), fp8=True)
    assert check_layout(config) == set(reference(config))
    staged = build_rank(3, config)
    kinds = {type(m) for m in staged.modules()}
    assert FP8Linear in kinds and FP8GroupedExperts in kinds


def test_shared_embedding_stays_one_parameter_and_dtype_applies_to_parameters_only():
    config = config_for(ParallelConfig(pp=2, dp=1, ep=1, schedule="dualpipe", ranks_per_node=2))
    staged = build_rank(0, config, param_dtype=torch.bfloat16)
    first, last = staged.stages["s0d0"], staged.stages["s1d1"]
    assert last.embed_tokens.weight is first.embed_tokens.weight
    assert {p.dtype for p in staged.parameters()} == {torch.bfloat16}
    bias = next(m for m in staged.modules() if hasattr(m, "e_score_correction_bias")).e_score_correction_bias
    assert bias.dtype == torch.float32 and not bias.any()
