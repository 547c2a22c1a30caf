"""The whole model: causality, MTP (arXiv 2412.19437 §2.2), MLA shapes, YaRN scale, and analytic parameter counts."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import small_model_config

from moetron.config import ModelConfig, RopeScaling
from moetron.model import IGNORE_INDEX, DeepSeekV3, count_parameters
from moetron.model.attention import MLA
from moetron.model.mtp import shift_left

PRESETS = Path(__file__).resolve().parents[2] / "hydra_conf" / "model"


def preset(name: str) -> ModelConfig:
    fields = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_logits_are_causal(q_lora_rank):
    torch.manual_seed(0)
    model = DeepSeekV3(small_model_config(q_lora_rank=q_lora_rank)).eval()
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_mtp_shares_embedding_and_head_and_computes_shifted_loss():
    torch.manual_seed(1)
    cfg = small_model_config(num_nextn_predict_layers=2)
    model = DeepSeekV3(cfg).eval()
    own = {name for name, _ in model.mtp.named_parameters()}
    assert not any("embed" in n or "lm_head" in n for n in own)  # shared, not copied

    window = torch.randint(0, 64, (2, 17))
    tokens, labels = window[:, :-1], window[:, 1:]
    out = model(tokens, labels, mtp_lambda=0.3)

    # By hand: h'^k = M_k[RMSNorm(h^{k-1}); RMSNorm(Emb(t_{i+k}))], target t_{i+k+1}.
    cos, sin = model.rope(16, tokens.device)
    h = model.embed_tokens(tokens)
    for layer in model.layers:
        h = layer(h, cos, sin)
    h = model.norm(h)
    losses = []
    for k, module in enumerate(model.mtp, start=1):
        h = module(h, model.embed_tokens(shift_left(tokens, k, 0)), cos, sin)
        logits = model.lm_head(module.norm(h))[:, : 16 - k]
        losses.append(F.cross_entropy(logits.reshape(-1, 64), window[:, k + 1:].reshape(-1)))
    assert out.mtp_loss.item() == pytest.approx(0.3 / 2 * sum(x.item() for x in losses), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + out.mtp_loss.item(), rel=1e-6)


def test_mtp_loss_trains_the_shared_embedding_and_head():
    torch.manual_seed(2)
    model = DeepSeekV3(small_model_config())
    window = torch.randint(0, 64, (2, 9))
    out = model(window[:, :-1], window[:, 1:], mtp_lambda=1.0)
    out.mtp_loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.layers[-1].self_attn.o_proj.weight.grad.abs().sum() > 0  # through h^0, the main model's state


def test_shift_left_masks_the_tail():
    x = torch.arange(6).view(1, 6)
    assert shift_left(x, 2, IGNORE_INDEX).tolist() == [[2, 3, 4, 5, IGNORE_INDEX, IGNORE_INDEX]]


def test_yarn_softmax_scale_uses_mscale_squared():
    cfg = small_model_config(rope_scaling=RopeScaling(type="yarn", factor=40.0, mscale_all_dim=1.0))
    attn = MLA(cfg)
    mscale = 0.1 * math.log(40.0) + 1.0
    assert attn.softmax_scale == pytest.approx(mscale**2 / math.sqrt(cfg.qk_head_dim))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"q_lora_rank": 0}, {"first_k_dense_replace": 0}, {"n_shared_experts": 0},
     {"num_nextn_predict_layers": 2}, {"num_nextn_predict_layers": 0}, {"first_k_dense_replace": 3}],
)
def test_analytic_count_equals_the_allocated_model(overrides):
    cfg = small_model_config(**overrides)
    model = DeepSeekV3(cfg)
    counts = count_parameters(cfg)
    mtp_numel = sum(p.numel() for p in model.mtp.parameters())
    assert counts.total == sum(p.numel() for p in model.parameters()) - mtp_numel
    assert counts.mtp_own == mtp_numel


def test_v3_671b_counts_match_the_report():
    counts = count_parameters(preset("v3_671b"))
    assert abs(counts.total - 671e9) / 671e9 < 0.01
    assert abs(counts.activated - 37.5e9) / 37.5e9 < 0.02  # embedding and head counted
    assert abs(counts.mtp - 14e9) / 14e9 < 0.05  # as stored: own block + copies of embedding and head


def test_lite_16b_is_about_16b():
    counts = count_parameters(preset("lite_16b"))
    assert abs(counts.total - 15.7e9) / 15.7e9 < 0.03
