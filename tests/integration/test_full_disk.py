"""A full disk during a save: one paragraph naming the path and the free space, the earlier checkpoints intact
and still loadable, no half-written temporary left (a small tmpfs, mounted where the machine allows it)."""

import subprocess

import pytest
from test_trainer import make_config

from moetron.checkpoint.manifest import verify_manifest
from moetron.config import ConfigError
from moetron.train.trainer import Trainer


def config(corpus, run_dir, steps):
    return make_config(corpus, run_dir, steps, save_every=1, keep_checkpoints=3)


@pytest.fixture
def small_disk(tmp_path, corpus):
    """A tmpfs with room for about one and a half checkpoints of the test model."""
    mount = tmp_path / "disk"
    mount.mkdir()
    probe = tmp_path / "probe"
    Trainer(config(corpus, probe, steps=1)).fit()  # how big is one checkpoint of this model?
    size = sum(p.stat().st_size for p in (probe / "checkpoints").rglob("*") if p.is_file())
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) // 4096 * 4096 + 65536}", "tmpfs",
                           str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_full_disk_names_the_path_and_keeps_the_published_checkpoints(small_disk, corpus):
    run_dir = small_disk / "run"
    trainer = Trainer(config(corpus, run_dir, steps=4))
    with pytest.raises(ConfigError) as err:
        trainer.fit()
    message = str(err.value)
    assert str(run_dir / "checkpoints") in message and "MiB free" in message and "\n" not in message
    published = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in published] == ["step_00000001"]
    verify_manifest(published[0])  # intact
    assert not list((run_dir / "checkpoints").glob(".step_*"))  # no temporary left behind
