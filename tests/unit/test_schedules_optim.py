"""The arXiv 2412.19437 §4.2 schedules and the FP32-master / BF16-moment AdamW."""

import math

import pytest
import torch

from moetron.config import OptimConfig, TrainConfig
from moetron.train import schedules
from moetron.train.optim import MasterAdamW


def test_learning_rate_stages():
    opt = OptimConfig(lr=1.0, min_lr=0.1, final_lr=0.01, warmup_steps=10, decay_start_tokens=100,
                      decay_tokens=200, final_lr_start_tokens=400)
    assert schedules.learning_rate(opt, 0, 0) == pytest.approx(0.1)  # linear warm-up
    assert schedules.learning_rate(opt, 9, 0) == pytest.approx(1.0)
    assert schedules.learning_rate(opt, 50, 99) == 1.0  # constant
    assert schedules.learning_rate(opt, 50, 200) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert schedules.learning_rate(opt, 50, 300) == pytest.approx(0.1)  # end of cosine, then held
    assert schedules.learning_rate(opt, 50, 399) == pytest.approx(0.1)
    assert schedules.learning_rate(opt, 50, 400) == 0.01  # the final stage


def test_batch_ramp_is_linear_in_tokens_and_a_multiple_of_the_micro_batch():
    train = TrainConfig(micro_batch_size=4, global_batch_size=64, batch_ramp_start=8, batch_ramp_tokens=1000)
    sizes = [schedules.batch_size(train, t) for t in range(0, 1200, 50)]
    assert sizes[0] == 8 and sizes[-1] == 64
    assert all(s % 4 == 0 for s in sizes) and sizes == sorted(sizes)
    assert schedules.batch_size(train, 500) == 36  # 8 + 0.5 * 56


def test_mtp_lambda_and_bias_rate_switch_at_their_token_counts():
    train = TrainConfig(mtp_lambda=0.3, mtp_lambda_final=0.1, mtp_lambda_switch_tokens=10,
                        bias_update_rate=0.001, bias_update_stop_tokens=20)
    assert [schedules.mtp_lambda(train, t) for t in (0, 9, 10)] == [0.3, 0.3, 0.1]
    assert [schedules.bias_update_rate(train, t) for t in (19, 20)] == [0.001, 0.0]


def test_master_adamw_with_fp32_moments_equals_torch_adamw():
    torch.manual_seed(0)
    ours = torch.nn.Linear(8, 4)
    theirs = torch.nn.Linear(8, 4)
    theirs.load_state_dict(ours.state_dict())
    cfg = OptimConfig(lr=0.01, weight_decay=0.1, moment_dtype="float32")
    opt = MasterAdamW(ours.named_parameters(), cfg)
    ref = torch.optim.AdamW([{"params": [theirs.weight]}, {"params": [theirs.bias], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, optim in ((ours, opt), (theirs, ref)):
            model(x).pow(2).mean().backward()
            optim.step()
            optim.zero_grad()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.bias, theirs.bias, rtol=1e-6, atol=1e-7)


def test_moments_are_stored_in_bf16_and_params_stay_fp32():
    model = torch.nn.Linear(8, 4)
    opt = MasterAdamW(model.named_parameters(), OptimConfig())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    state = opt.state[model.weight]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert model.weight.dtype == torch.float32
    opt.load_state_dict(opt.state_dict())  # torch's loader casts to the param dtype; ours keeps BF16
    assert opt.state[model.weight]["exp_avg"].dtype == torch.bfloat16
