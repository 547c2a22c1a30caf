"""benchmarks/memory_savings.py at tiny sizes: selective recompute saves activation bytes and leaves the
gradients bitwise equal; the distributed trainer's EMA lives in CPU memory as one FP32 copy of the weights."""

from __future__ import annotations

import pytest
import torch
from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("memory_savings")


@pytest.fixture(scope="module")
def tiny_cfg(bench):
    return bench.model_config(hidden=32, layers=3, heads=2, experts=4, experts_per_token=2, vocab=64, seq=16)


def test_recompute_saves_activation_bytes_with_equal_gradients(bench, tiny_cfg):
    result = bench.measure_activations(tiny_cfg, pp=2, seq=16, micro_batch=2)
    assert len(result["stages"]) == 2
    for stage in result["stages"]:
        assert stage["regions_recomputed"] > 0
        assert 0 < stage["saved_bytes_recompute"] < stage["saved_bytes_plain"], stage
        assert stage["grads_equal"] and stage["losses_equal"] and stage["max_abs_grad_diff"] == 0.0, stage
        assert stage["predicted_bytes_recompute"] < stage["predicted_bytes_plain"]
    total = result["activations"]
    assert total["grads_equal"] and 0 < total["ratio"] < 1


def test_saved_tensor_count_dedupes_storages_and_skips_parameters(bench):
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    counter = bench.SavedTensors([w])
    with counter.hooks():
        y = x @ w  # saves x and w
        z = (x.t() * 2).sum() + (y * y).sum()  # y saved once (twice by mul, one storage); x.t() a view: no save
    assert set(counter.storages) == {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    assert counter.bytes == x.untyped_storage().nbytes() + y.untyped_storage().nbytes()
    z.backward()


def test_ema_is_the_trainers_one_fp32_copy_in_cpu_memory(bench, tiny_cfg):
    stage = bench.build_stages(tiny_cfg, 2, 0)[0]
    params = {id(p): p for p in stage.parameters()}.values()
    ema = bench.measure_ema(stage, steps=2)
    assert ema["bytes"] == 4 * sum(p.numel() for p in params)
    assert ema["devices"] == ["cpu"] and ema["accelerator_bytes"] == 0 and ema["dtype"] == ["float32"]
    assert ema["matches_reference"] and ema["update_ms_median"] > 0
