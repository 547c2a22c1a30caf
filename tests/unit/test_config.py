"""Bad config values fail at start with one paragraph naming the field (typed dataclasses + Hydra)."""

import pytest
from helpers import small_model_config

from moetron.config import ConfigError, ModelConfig, MoetronConfig, ParallelConfig, TrainConfig


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_group": 3}, "model.n_group"),  # does not divide 8 experts
        ({"topk_group": 5}, "model.topk_group"),  # more groups kept than exist
        ({"num_experts_per_tok": 3, "topk_group": 2}, "model.num_experts_per_tok"),  # K not divisible by M
        ({"qk_rope_head_dim": 5}, "model.qk_rope_head_dim"),
        ({"hidden_size": 0}, "model.hidden_size"),
        ({"first_k_dense_replace": 9}, "model.first_k_dense_replace"),
    ],
)
def test_bad_model_values_name_the_field(overrides, field):
    fields = dict(vars(small_model_config()))
    fields.update(overrides)
    with pytest.raises(ConfigError) as err:
        ModelConfig(**fields).validate()
    message = str(err.value)
    assert f"`{field}`" in message and "Valid:" in message and "\n" not in message


@pytest.mark.parametrize(
    "train, field",
    [
        (TrainConfig(global_batch_size=10, micro_batch_size=4, batch_ramp_start=4), "train.global_batch_size"),
        (TrainConfig(global_batch_size=8, micro_batch_size=4, batch_ramp_start=16), "train.batch_ramp_start"),
        (TrainConfig(precision="fp16"), "train.precision"),
        (TrainConfig(steps=0), "train.steps"),
    ],
)
def test_bad_train_values_name_the_field(train, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        MoetronConfig(train=train).validate()


@pytest.mark.parametrize(
    "parallel, field",
    [
        (ParallelConfig(ep_dispatch="deepep"), "parallel.ep_dispatch"),
        (ParallelConfig(link_model_scale=-1.0), "parallel.link_model_scale"),
        (ParallelConfig(comm_timeout=0.0), "parallel.comm_timeout"),
        (ParallelConfig(comm_timeout=float("inf")), "parallel.comm_timeout"),
        (ParallelConfig(schedule="gpipe"), "parallel.schedule"),
    ],
)
def test_bad_parallel_values_name_the_field(parallel, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        MoetronConfig(parallel=parallel).validate()


def test_seq_len_beyond_positions_is_refused():
    cfg = MoetronConfig(train=TrainConfig(seq_len=8192))
    cfg.model.max_position_embeddings = 4096
    with pytest.raises(ConfigError, match="`train.seq_len`"):
        cfg.validate()
