"""One checkpoint format for every layout: a run saved by one layout resumes in any other, and an HF import
resumes in any layout.

Each case trains a source layout for 3 steps with a checkpoint at step 2, copies that checkpoint (and the
run's config) into a fresh run.dir, and resumes it in the target layout for step 3. The target's step-3 loss
must equal the source's own step-3 loss within 1e-5 relative (the reference is the source layout itself, an
independent run that never changed layout), `events.jsonl` must record the layout change, and nothing may
be reported corrupt. Layouts: one process; DualPipe pp 2 x dp 2 x EP 2 (make train's cpu_2x2); 1F1B pp 2 x
EP 4 (8 ranks); DualPipeV on one pipeline rank x dp 4 x EP 4.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch
from helpers import write_corpus
from moetron.parallel.local import run_local
from test_trainer_distributed import DUALPIPE_EP_DP, TIMEOUT, make_config, metrics

from moetron.config import ParallelConfig
from moetron.train.trainer import Trainer

SINGLE = ParallelConfig()
ONEF1B_PP2_EP4 = ParallelConfig(pp=2, dp=4, ep=4, schedule="1f1b", ranks_per_node=4)
DUALPIPEV = ParallelConfig(pp=1, dp=4, ep=4, schedule="dualpipev", ranks_per_node=2)  # both ends on one rank


def _train(rank: int, world: int, config) -> None:
    warnings.simplefilter("ignore")
    Trainer(config).fit()


def train(config) -> None:
    world = config.parallel.world_size
    if world == 1:
        torch.set_num_threads(1)
        Trainer(config).fit()
    else:
        run_local(_train, world, (config,), timeout=TIMEOUT)


def events(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "events.jsonl")]


@pytest.fixture(scope="module")
def shared_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def sources(shared_corpus, tmp_path_factory):
    """Source runs of 3 steps with a checkpoint at step 2: DualPipe cpu_2x2 and one process."""
    runs = {}
    for name, layout in (("dualpipe", DUALPIPE_EP_DP), ("single", SINGLE)):
        run_dir = tmp_path_factory.mktemp(f"source-{name}")
        train(make_config(shared_corpus, run_dir, steps=3, parallel=layout, save_every=2))
        runs[name] = run_dir
    return runs


def resume_in(source, target_dir, corpus, layout):
    """Copy the source's step-2 checkpoint into a new run dir and train step 3 there in `layout`."""
    (target_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step_00000002", target_dir / "checkpoints" / "step_00000002")
    shutil.copy(source / "config.yaml", target_dir / "config.yaml")
    train(make_config(corpus, target_dir, steps=3, parallel=copy.deepcopy(layout), save_every=2))
    return metrics(target_dir)


@pytest.mark.parametrize("source, target", [
    ("dualpipe", SINGLE), ("dualpipe", ONEF1B_PP2_EP4), ("dualpipe", DUALPIPEV), ("single", DUALPIPE_EP_DP),
], ids=["dualpipe-to-single", "dualpipe-to-1f1b-pp2-ep4", "dualpipe-to-dualpipev", "single-to-dualpipe"])
def test_resume_in_another_layout(sources, shared_corpus, tmp_path, source, target):
    got = resume_in(sources[source], tmp_path / "target", shared_corpus, target)
    want = [r for r in metrics(sources[source]) if r["step"] == 3]
    assert [r["step"] for r in got] == [3]
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)
    assert got[0]["grad_norm"] == pytest.approx(want[0]["grad_norm"], rel=1e-5)
    log = events(tmp_path / "target")
    change = [e for e in log if e["event"] == "layout_change"]
    assert len(change) == 1 and change[0]["new"]["pp"] == target.pp and change[0]["new"]["ep"] == target.ep
    assert not [e for e in log if e["event"] in ("checkpoint_skipped", "checkpoint_discarded")]


def test_hf_import_resumes_in_any_layout(corpus, tmp_path):
    """An imported (model-only) checkpoint: the first step's loss is the same on one process and on cpu_2x2."""
    from moetron.hf import export_checkpoint, import_checkpoint
    from moetron.hf.convert import load_run_config

    # An HF directory of exactly our small model: export a fresh run's checkpoint, then import it.
    base = make_config(corpus, tmp_path / "base", steps=1, parallel=SINGLE)
    train(base)
    export_checkpoint(tmp_path / "base", tmp_path / "hf", dtype="fp32")
    losses = {}
    for name, layout in (("single", SINGLE), ("dualpipe", DUALPIPE_EP_DP)):
        run_dir = tmp_path / f"import-{name}"
        config = make_config(corpus, run_dir, steps=1, parallel=layout)
        import_checkpoint(tmp_path / "hf", run_dir, name=f"imported_{name}",
                          overrides=[f"train.seq_len={config.train.seq_len}", "data.tokenizer=null"])
        config.model = load_run_config(run_dir / "config.yaml").model  # model=imported_..., as import prints
        train(config)
        log = events(run_dir)
        assert any(e["event"] == "resume" and e["step"] == 0 for e in log)
        assert any(e["event"] == "layout_change" and e["old"] is None for e in log)
        losses[name] = metrics(run_dir)[0]["loss"]
    assert losses["dualpipe"] == pytest.approx(losses["single"], rel=1e-5)
