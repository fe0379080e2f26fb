"""FastReID runs whose resume, checkpoint, OUTPUT_DIR or split file would corrupt the statistics
or evaluate the wrong thing: each is refused with a message naming the file / key (issue 14)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastreid.data.build as fastreid_build
from fastreid.data.datasets import DATASET_REGISTRY
from leap_plugin.core.integrity import StatsStateError
from leap_plugin.fastreid import LEAPTrainer, find_leap_head
from leap_plugin.fastreid.checkpoint import LOCK_NAME, CheckpointError, lock_output_dir

from reid_fixtures import tiny_cfg

ONE_EPOCH = {"SOLVER.MAX_EPOCH": 1, "TEST.EVAL_PERIOD": 5, "MODEL.HEADS.LEAP.START_EPOCH": 0}


@pytest.fixture(scope="module")
def datasets_root(market_root):
    with pytest.MonkeyPatch.context() as mp:  # fastreid reads FASTREID_DATASETS once, at import
        mp.setenv("FASTREID_DATASETS", market_root)
        mp.setattr(fastreid_build, "_root", market_root)
        yield market_root


@pytest.fixture(scope="module")
def finished_run(datasets_root, tmp_path_factory):
    """One real epoch of LEAP training on CPU; its OUTPUT_DIR (copied per test by ``run_dir``)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    trainer = LEAPTrainer(tiny_cfg("leap_cf.yml", output_dir=out, **ONE_EPOCH))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert int(find_leap_head(trainer.model).stats.num_written.sum()) > 0
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns(LOCK_NAME))
    return out


def resume(out, **opts):
    trainer = LEAPTrainer(tiny_cfg("leap_cf.yml", output_dir=out, **dict(ONE_EPOCH, **opts)))
    trainer.resume_or_load(resume=True)
    return trainer


def test_resume_with_another_memory_factor_is_refused_or_starts_the_statistics_afresh(run_dir):
    # the issue: FastReID skipped only 'memory' and loaded the sums; 10 steps later 82 of 102
    # classes had a negative variance
    with pytest.raises(StatsStateError, match="(?s)model_final.pth.*memory factor P .* 1, this run 2.*"
                                              "MODEL.HEADS.LEAP.MEMORY_FACTOR differs.*RESET_STATS True"):
        resume(run_dir, **{"MODEL.HEADS.LEAP.MEMORY_FACTOR": 2})
    trainer = resume(run_dir, **{"MODEL.HEADS.LEAP.MEMORY_FACTOR": 2, "MODEL.HEADS.LEAP.RESET_STATS": True})
    stats = find_leap_head(trainer.model).stats
    assert stats.memory_factor == 2 and int(stats.num_written.sum()) == 0 and stats.angle_sum.abs().sum() == 0
    saved = torch.load(os.path.join(run_dir, "model_final.pth"), map_location="cpu")["model"]
    assert torch.equal(trainer.model.state_dict()["heads.weight"], saved["heads.weight"])  # the model resumed
    assert trainer.start_epoch == 1


def test_resume_on_another_split_is_refused_and_the_published_split_kept(run_dir):
    split = os.path.join(run_dir, "long_tail_split.json")
    with open(split) as f:
        published = f.read()
    with pytest.raises(ValueError, match="(?s)long_tail_split.json holds another split.*SPLIT_FILE"):
        resume(run_dir, **{"DATASETS.LONG_TAIL.TAIL_IMAGES": 5})
    with open(split) as f:
        assert f.read() == published
    os.rename(split, split + ".old")  # the user moves it away: the statistics still refuse the split
    with pytest.raises(StatsStateError, match=r"(?s)K_i differs for class.*the training split \(DATASETS"):
        resume(run_dir, **{"DATASETS.LONG_TAIL.TAIL_IMAGES": 5})


def test_corrupt_statistics_in_a_checkpoint_are_refused_naming_the_class(run_dir):
    path = os.path.join(run_dir, "model_final.pth")
    checkpoint = torch.load(path, map_location="cpu")
    checkpoint["model"]["heads.stats.angle_sum"][3] = float("nan")
    torch.save(checkpoint, path)
    with pytest.raises(StatsStateError, match=r"(?s)model_final.pth.*non-finite angle_sum for class \[3\].*"
                                              "resume from a sound checkpoint"):
        resume(run_dir)


def test_a_truncated_or_empty_checkpoint_names_the_file_and_the_others(run_dir):
    path = os.path.join(run_dir, "model_final.pth")
    shutil.copy(path, os.path.join(run_dir, "model_0000.pth"))  # an earlier checkpoint to go back to
    with open(path, "rb") as f:
        head = f.read(1000)
    for content in (b"", head):
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError, match="(?s)model_final.pth.*(empty|truncated).*model_0000.pth"):
            resume(run_dir)


def test_checkpoints_are_written_atomically(run_dir, monkeypatch):
    trainer = resume(run_dir)
    path = os.path.join(run_dir, "model_final.pth")
    before = os.path.getsize(path), open(os.path.join(run_dir, "last_checkpoint")).read()

    def killed(obj, f, *args, **kwargs):  # a kill during the save: half the bytes, then gone
        f.write(b"\x80\x02half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpointer.save("model_final")
    monkeypatch.undo()
    assert (os.path.getsize(path), open(os.path.join(run_dir, "last_checkpoint")).read()) == before
    assert not [name for name in os.listdir(run_dir) if ".tmp" in name]
    resume(run_dir)  # still loads


def test_a_second_run_on_a_live_output_dir_is_refused(tmp_path):
    out = str(tmp_path / "busy")
    os.makedirs(out)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(out, LOCK_NAME), "w") as f:
            f.write(f"{os.uname().nodename} {other.pid}\n")
        with pytest.raises(RuntimeError, match=f"(?s)OUTPUT_DIR {out} is in use by process {other.pid}.*"
                                               "another OUTPUT_DIR"):
            lock_output_dir(out)
    finally:
        other.kill()
        other.wait()
    lock_output_dir(out)  # that process is gone: the stale lock is taken over
    with open(os.path.join(out, LOCK_NAME)) as f:
        assert f.read().split() == [os.uname().nodename, str(os.getpid())]
    lock_output_dir(out)  # the owner again: fine


@pytest.mark.parametrize("content, match", [
    ("{", "not valid JSON"),
    ("[]", "the top level is a list"),
    ('{"dataset": "Market1501_LT"}', "no 'identities' object"),
    ('{"dataset": "Market1501_LT", "identities": []}', "'identities' is a list"),
    ('{"dataset": "Market1501_LT", "identities": {}}', "'identities' is empty"),
    ('{"dataset": "Market1501_LT", "identities": {"1": "a.jpg"}}', "identity '1' must map to a non-empty list"),
    ('{"dataset": "Market1501_LT", "identities": {"1": ["a.jpg"], "2": ["a.jpg"]}}', "a.jpg is listed twice"),
    ('{"dataset": "Market1501_LT", "identities": {"1": ["a.jpg"], "1": ["b.jpg"]}}', "a key is repeated"),
])
def test_split_file_errors_name_the_file(datasets_root, tmp_path, content, match):
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"(?s)SPLIT_FILE {path}: .*{match}"):
        DATASET_REGISTRY.get("Market1501_LT")(root=datasets_root, long_tail={"split_file": str(path)})


def test_a_split_that_keeps_nothing_is_an_error_not_a_hang(datasets_root, tmp_path):
    # the issue: '"identities": {}' trained on "0 ids" and FastReID's sampler spun forever
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"dataset": "Market1501_LT", "identities": {}}))
    with pytest.raises(ValueError, match="keeps no training image"):
        DATASET_REGISTRY.get("Market1501_LT")(root=datasets_root, long_tail={"split_file": str(path)})


def test_eval_only_without_weights_is_refused(tmp_path):
    # the issue: it evaluated a randomly initialised model with rc 0 and real-looking metrics
    from reid_fixtures import CONFIGS, REPO
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
                           os.path.join(CONFIGS, "leap_cf.yml"), "--eval-only", "MODEL.DEVICE", "cpu",
                           "OUTPUT_DIR", str(tmp_path / "eval")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--eval-only needs the model to evaluate: set MODEL.WEIGHTS" in proc.stderr
    assert not os.path.exists(tmp_path / "eval")  # nothing written


def test_a_cloud_that_never_switches_on_is_warned_about(datasets_root, tmp_path, caplog):
    opts = {"MODEL.HEADS.LEAP.START_EPOCH": 2, "SOLVER.MAX_EPOCH": 2,
            "MODEL.HEADS.LEAP.VERSION": "vanilla", "MODEL.HEADS.LEAP.HEAD_THRESHOLD": 10}
    LEAPTrainer(tiny_cfg("leap_cf.yml", output_dir=str(tmp_path / "a"), **opts))
    assert "START_EPOCH 2 >= SOLVER.MAX_EPOCH 2: the feature cloud never switches on" in caplog.text
    assert "HEAD_THRESHOLD: no class has more than head_threshold T = 10 images (the largest K_i is 10)" in caplog.text
    caplog.clear()
    opts.update({"MODEL.HEADS.LEAP.START_EPOCH": 1, "MODEL.HEADS.LEAP.HEAD_THRESHOLD": 9})
    LEAPTrainer(tiny_cfg("leap_cf.yml", output_dir=str(tmp_path / "b"), **opts))
    assert "never" not in caplog.text


def test_omniglot_split_and_cache_are_keyed_by_content_not_path(tmp_path, monkeypatch):
    # the issue: the same images at another path rejected a published split ("646 images are not
    # in Omniglot_LT"), and other images at the same path loaded the old prepared cache
    from test_omniglot import write_omniglot_folder
    root = str(tmp_path / "datasets")
    here = write_omniglot_folder(str(tmp_path / "here"))
    there = shutil.copytree(here, str(tmp_path / "elsewhere" / "there"))
    monkeypatch.setenv("OMNIGLOT_ROOT", here)
    split = str(tmp_path / "split.json")
    lt = {"num_head": 2, "tail_images": 3, "seed": 0}
    published = DATASET_REGISTRY.get("Omniglot_LT")(root=root, long_tail=dict(lt, save_split=split))
    monkeypatch.setenv("OMNIGLOT_ROOT", there)
    loaded = DATASET_REGISTRY.get("Omniglot_LT")(root=root, long_tail={"split_file": split})
    assert loaded.train == published.train
    shutil.rmtree(here)  # other images at the first path: prepared afresh, not the old cache
    write_omniglot_folder(here, alphabets=("Gamma",), characters=8)
    monkeypatch.setenv("OMNIGLOT_ROOT", here)
    other = DATASET_REGISTRY.get("Omniglot")(root=root)
    assert {p.split(os.sep)[-3] for p, _, _ in other.train} == {"Gamma"}
