"""The single-process trainer end to end: learning, bitwise-exact resume, checkpoints, user errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import assert_step_metrics, small_model_config

from moetron.config import ConfigError, DataConfig, MoetronConfig, MonitorConfig, RunConfig, TrainConfig
from moetron.train.trainer import Trainer


def make_config(corpus, run_dir, steps, **run_overrides) -> MoetronConfig:
    train = TrainConfig(
        steps=steps, seq_len=32, micro_batch_size=4, global_batch_size=8, batch_ramp_start=4,
        batch_ramp_tokens=2000, mtp_lambda_switch_tokens=3000, bias_update_stop_tokens=4000, eval_every=5,
        eval_batches=2,
    )
    train.optim.lr, train.optim.warmup_steps = 3e-3, 3
    train.optim.decay_start_tokens, train.optim.decay_tokens, train.optim.final_lr_start_tokens = 1500, 3000, 5000
    config = MoetronConfig(
        model=small_model_config(vocab_size=264),
        train=train,
        data=DataConfig(train_files=[corpus["train"]], val_files=[corpus["val"]]),
        run=RunConfig(dir=str(run_dir), progress=False, log_every=1, **run_overrides),
        monitor=MonitorConfig(wandb=False, report=False),
    )
    return config.validate()


def final_params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_loss_falls_and_run_dir_has_the_contracted_files(corpus, tmp_path):
    trainer = Trainer(make_config(corpus, tmp_path / "run", steps=24))
    trainer.fit()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in ("loss", "lm_loss", "mtp_loss", "bal_loss", "grad_norm", "lr", "tokens_per_s", "max_vio"):
        assert key in records[-1]
    assert records[-1]["lm_loss"] < 0.8 * records[0]["lm_loss"]
    assert records[0]["batch_size"] == 4 and records[-1]["batch_size"] == 8  # the ramp happened
    assert "val_loss" in records[4]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step_00000012", "step_00000018", "step_00000024"]  # every quarter, keep 3
    events = [json.loads(line)["event"] for line in open(tmp_path / "run" / "events.jsonl")]
    assert events[0] == "start" and events[-1] == "finish" and events.count("checkpoint") == 4
    assert (tmp_path / "run" / "config.yaml").exists()
    assert_step_metrics(tmp_path / "run", world=1)  # tokens/s and MFU per device, phases, waits, memory


def test_bias_moves_toward_balance(corpus, tmp_path):
    trainer = Trainer(make_config(corpus, tmp_path / "run", steps=3))
    trainer.fit()
    biases = torch.stack([m.gate.e_score_correction_bias for m in trainer.model.moe_layers()])
    assert biases.abs().sum() > 0 and not biases.requires_grad


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(corpus, tmp_path):
    straight = Trainer(make_config(corpus, tmp_path / "a", steps=10, save_every=5))
    straight.fit()
    Trainer(make_config(corpus, tmp_path / "b", steps=5, save_every=5)).fit()
    resumed = Trainer(make_config(corpus, tmp_path / "b", steps=10, save_every=5))
    resumed.fit()
    a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    for key, value in final_params(straight).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path):
    Trainer(make_config(corpus, tmp_path / "run", steps=8, save_every=4)).fit()
    newest = tmp_path / "run" / "checkpoints" / "step_00000008"
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated
    (tmp_path / "run" / "checkpoints" / ".step_00000012.tmp-999").mkdir()  # an interrupted save
    trainer = Trainer(make_config(corpus, tmp_path / "run", steps=8, save_every=4))
    trainer.start()
    assert trainer.state.step == 4
    events = [json.loads(x) for x in open(tmp_path / "run" / "events.jsonl")]
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert skipped and "step_00000008" in skipped[-1]["reason"]


def test_resuming_with_another_model_names_the_field(corpus, tmp_path):
    Trainer(make_config(corpus, tmp_path / "run", steps=2)).fit()
    config = make_config(corpus, tmp_path / "run", steps=4)
    config.model.hidden_size = 48
    with pytest.raises(ConfigError, match="`model`"):
        Trainer(config).start()
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").exists()  # nothing damaged


def run_cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moetron.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_resumes_and_reports_bad_values(corpus, tmp_path):
    data = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null"]
    small = ["train.steps=4", "train.seq_len=32", "train.eval_every=2", "run.progress=false", "monitor.wandb=false"]
    run_dir = tmp_path / "run"
    first = run_cli(f"run.dir={run_dir}", *data, *small, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "moetron: done: step 4" in first.stdout
    again = run_cli(f"run.dir={run_dir}", *data, *small, cwd=tmp_path)
    assert again.returncode == 0 and "already trained 4 steps" in again.stdout

    bad = run_cli(f"run.dir={tmp_path / 'bad'}", *data, *small, "model.n_group=3", cwd=tmp_path)
    assert bad.returncode == 2 and "`model.n_group`" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before any work

    missing = run_cli(f"run.dir={tmp_path / 'missing'}", "data.train_files=[nope.jsonl]", *small, cwd=tmp_path)
    assert missing.returncode == 2 and "data.train_files" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_resumes_after_a_kill_mid_run(corpus, tmp_path):
    """A run killed between checkpoints resumes from the last one and ends with the same weights."""
    data = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null"]
    common = ["train.seq_len=32", "train.eval_every=0", "run.progress=false", "run.save_every=3", "monitor.wandb=false"]
    straight = run_cli(f"run.dir={tmp_path / 'a'}", *data, *common, "train.steps=6", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")  # as if killed after step 3's save
    resumed = run_cli(f"run.dir={tmp_path / 'b'}", *data, *common, "train.steps=6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in b] == [r["step"] for r in a]  # the redone steps replaced, not duplicated
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def _first_batch_and_weights(corpus, run_dir, seed: int, data_seed: int | None):
    """The rows the trainer's first step trains on and its initial parameters, for run.seed / data.seed."""
    config = make_config(corpus, run_dir, steps=1, seed=seed)
    config.data.seed, config.train.eval_every = data_seed, 0
    trainer = Trainer(config.validate())
    seen, read = [], trainer.data.train.batch
    trainer.data.train.batch = lambda *args, **kwargs: seen.append(read(*args, **kwargs)) or seen[-1]
    initial = torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])
    trainer.fit()
    return seen[0], initial


def test_data_seed_fixes_the_batches_while_run_seed_changes_the_initialization(corpus, tmp_path):
    a, init_a = _first_batch_and_weights(corpus, tmp_path / "a", seed=1, data_seed=7)
    b, init_b = _first_batch_and_weights(corpus, tmp_path / "b", seed=2, data_seed=7)
    assert torch.equal(a, b) and not torch.equal(init_a, init_b)
    c, _ = _first_batch_and_weights(corpus, tmp_path / "c", seed=2, data_seed=None)  # the default: run.seed
    d, _ = _first_batch_and_weights(corpus, tmp_path / "d", seed=7, data_seed=None)
    assert not torch.equal(b, c) and torch.equal(a, d)


@pytest.mark.parametrize("bad", [-1, True, "x"])
def test_bad_data_seed_names_the_field(corpus, tmp_path, bad):
    config = make_config(corpus, tmp_path / "run", steps=1)
    config.data.seed = bad
    with pytest.raises(ConfigError, match=r"data\.seed"):
        config.validate()
