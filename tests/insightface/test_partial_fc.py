"""arcface_torch's real PartialFC_V2 with LEAPMarginLoss in one process (a world-1 gloo group, as
single-GPU training), train_v2's checkpoint/resume, and the wrappers of
``leap_plugin.insightface.session`` around the host's own modules.

Needs arcface_torch (the ``arcface_torch`` fixture, conftest.py): skipped otherwise.
PartialFC_V2 calls ``Tensor.cuda()`` on a few buffers; here that returns the tensor (CPU).
The configs import ``easydict`` (an arcface_torch requirement, pinned in requirements.txt).
"""
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from face_fixtures import load_host, train, train_batch

from leap_plugin.insightface import LEAPMarginLoss, compat
from leap_plugin.insightface.class_counts import (class_counts_from_dataset, class_counts_from_rec,
                                                  read_class_counts)
from leap_plugin.insightface.host import prepare
from leap_plugin.insightface.session import Session

REPO = Path(__file__).resolve().parents[2]
# the host's own code warns on this torch / Python (torch.cuda.amp.autocast, "is" with a literal)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::SyntaxWarning")


def _make(arcface, sample_rate):
    pfc_module = load_host(arcface, "partial_fc_v2")
    loss = LEAPMarginLoss(torch.tensor([40, 30, 20, 5, 5, 5, 4, 5, 3]), 8, margin="cos", margin_value=0.35,
                          version="vanilla", head_threshold=5, update_every=2, start_epoch=1, seed=9,
                          angle_reference="updated_center")  # every observed sample stores an angle
    pfc = pfc_module.PartialFC_V2(loss, 8, 9, sample_rate, False).train()
    loss.attach(pfc)
    return pfc, loss


@pytest.mark.parametrize("sample_rate", [1.0, 0.6])
def test_checkpoint_resume_as_train_v2(arcface, world1, tmp_path, sample_rate):
    torch.manual_seed(0)
    pfc, loss = _make(arcface, sample_rate)
    init = {k: v.clone() for k, v in pfc.state_dict().items() if k == "weight"}
    opt = torch.optim.SGD(pfc.parameters(), lr=0.5)
    torch.manual_seed(1)
    straight = train(pfc, loss, 6, opt)

    torch.manual_seed(0)
    pfc, loss = _make(arcface, sample_rate)
    pfc.load_state_dict(init, strict=False)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.5)
    torch.manual_seed(1)
    first = train(pfc, loss, 3, opt)
    rng = torch.get_rng_state()
    # what train_v2 saves per rank, and loads back with cfg.resume
    checkpoint = {"epoch": 1, "state_dict_softmax_fc": pfc.state_dict(), "state_optimizer": opt.state_dict()}
    torch.save(checkpoint, tmp_path / "checkpoint_gpu_0.pt")
    keys = set(checkpoint["state_dict_softmax_fc"])
    assert {"margin_softmax.stats.centers", "margin_softmax.stats.memory", "margin_softmax.stats.angle_sum",
            "margin_softmax._extra_state"} <= keys

    pfc, loss = _make(arcface, sample_rate)  # a fresh process: new modules, then load
    loaded = torch.load(tmp_path / "checkpoint_gpu_0.pt", weights_only=False)
    pfc.load_state_dict(loaded["state_dict_softmax_fc"])
    opt = torch.optim.SGD(pfc.parameters(), lr=0.5)
    opt.load_state_dict(loaded["state_optimizer"])
    assert loss.leap.step == 3 and int(loss.stats.num_written.sum()) == 24  # steps 0 and 2 updated
    torch.set_rng_state(rng)
    resumed = train(pfc, loss, 6, opt, start=3)
    np.testing.assert_allclose(first + resumed, straight, rtol=1e-5)
    assert loss.leap.cloud_active and loss.leap.epoch == 1


def test_attach_checks_the_module(arcface, world1):
    pfc, loss = _make(arcface, 1.0)
    other = LEAPMarginLoss(torch.ones(9, dtype=torch.long) * 3, 8)
    with pytest.raises(ValueError, match="margin_softmax"):
        other.attach(pfc)
    # without attach, training raises instead of silently never updating the statistics
    pfc_module = load_host(arcface, "partial_fc_v2")
    lonely = LEAPMarginLoss(torch.ones(9, dtype=torch.long) * 3, 8)
    host = pfc_module.PartialFC_V2(lonely, 8, 9, 1.0, False).train()
    with pytest.raises(RuntimeError, match="attach"):
        host(*train_batch(0))


# ---------------------------------------------------------------- leap_plugin.insightface.session

def _train_v2_namespace(arcface):
    """train_v2.py's globals as its own ``from X import Y`` lines make them (run for real, read
    from the file); the lines whose modules need what is missing here (mxnet) are left out."""
    import ast
    tree = ast.parse((Path(arcface) / "train_v2.py").read_text())
    namespace = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and not node.module.startswith(("torch", "datetime")):
            try:
                exec(compile(ast.Module([node], []), "train_v2.py", "exec"), namespace)
            except ImportError:
                pass
    return namespace


def test_session_wires_leap_into_the_hosts_modules(host_modules, world1, tmp_path):
    config = REPO / "configs" / "insightface" / "ms1m_h3k_t10k_r18_arcface_leap.py"
    arcface, config_arg = prepare(host_modules, str(config))
    assert config_arg == "configs/ms1m_h3k_t10k_r18_arcface_leap.py"  # what train_v2's get_config gets
    ns = _train_v2_namespace(arcface)
    session = Session()
    rebound = session.patch(ns)
    assert {"get_config", "CombinedMarginLoss", "PartialFC_V2", "PolynomialLRWarmup"} <= set(rebound)
    import losses
    import partial_fc_v2
    assert losses.CombinedMarginLoss is not ns["CombinedMarginLoss"]  # their modules are untouched
    assert partial_fc_v2.PartialFC_V2 is not ns["PartialFC_V2"]

    cfg = ns["get_config"](config_arg)
    assert cfg.seed == 2048 and cfg.num_workers == 2  # arcface_torch's configs/base.py merged first
    assert (cfg.network, cfg.embedding_size, cfg.num_epoch, cfg.num_classes) == ("r18", 512, 30, 13000)
    assert cfg.margin_list == (1.0, 0.5, 0.0) and cfg.leap.start_epoch == 20

    # a small problem with the same config: 6 classes, 8-d, K_i given in the config
    cfg.num_classes, cfg.embedding_size = 6, 8
    cfg.leap["class_counts"] = [50, 40, 5, 5, 5, 5]
    margin_loss = ns["CombinedMarginLoss"](64, cfg.margin_list[0], cfg.margin_list[1], cfg.margin_list[2],
                                            cfg.interclass_filtering_threshold)
    assert isinstance(margin_loss, LEAPMarginLoss)
    assert (margin_loss.margin, margin_loss.margin_value, margin_loss.scale) == ("arc", 0.5, 64.0)
    assert margin_loss.straight_through and margin_loss.leap.cloud.version == "vanilla"
    options = margin_loss.leap.options
    assert (margin_loss.leap.seed, options.start_epoch, options.update_every) == (2048, 20, 5)
    module_partial_fc = ns["PartialFC_V2"](margin_loss, cfg.embedding_size, cfg.num_classes,
                                                   cfg.sample_rate, False)
    assert type(module_partial_fc).__name__ == "PartialFC_V2" and margin_loss._hook is not None
    module_partial_fc.train()
    emb, labels = train_batch(0, classes=6)
    module_partial_fc(emb.requires_grad_(), labels).backward()
    # the face configs measure angles to the centre before the update: a first sighting sets the
    # centres of the batch's classes and stores no angle
    seen = labels.unique()
    assert int(margin_loss.stats.num_written.sum()) == 0 and margin_loss.stats.angles_to == "previous_center"
    assert (margin_loss.stats.centers[seen].float().norm(dim=1) > 0).all()

    # the epoch reaches the loss through the sampler's set_epoch (train_v2 calls it every epoch)
    from utils.utils_distributed_sampler import DistributedSampler
    dataset = torch.utils.data.TensorDataset(torch.zeros(20, 1), torch.zeros(20).long())
    loader_fn = session.wrap_get_dataloader(lambda *a, **k: torch.utils.data.DataLoader(
        dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=1, rank=0)))
    cfg.num_image = None
    loader = loader_fn("synthetic", 0, 4)
    assert cfg.num_image == 20  # counted from the dataset
    loader.sampler.set_epoch(20)
    assert margin_loss.leap.epoch == 20 and margin_loss.leap.cloud_active

    # triangular LR: 30 epochs of 10 steps, 10-epoch cycles, lr_min -> lr at mid-cycle -> lr_min
    opt = torch.optim.SGD(module_partial_fc.parameters(), lr=cfg.lr, momentum=0.9)
    sched = ns["PolynomialLRWarmup"](optimizer=opt, warmup_iters=0, total_iters=300)
    lrs = []
    for _ in range(101):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(cfg.lr_min) and lrs[50] == pytest.approx(cfg.lr)
    assert lrs[100] == pytest.approx(cfg.lr_min) and lrs[25] == pytest.approx((cfg.lr + cfg.lr_min) / 2)


def test_session_baseline_config_keeps_the_hosts_loss(host_modules, world1):
    config = REPO / "configs" / "insightface" / "ms1m_h5k_t20k_r18_cosface.py"
    arcface, config_arg = prepare(host_modules, str(config))
    ns = _train_v2_namespace(arcface)
    Session().patch(ns)
    cfg = ns["get_config"](config_arg)
    assert cfg.leap is None and cfg.margin_list == (1.0, 0.0, 0.35) and cfg.num_classes == 25000
    loss = ns["CombinedMarginLoss"](64, *cfg.margin_list, cfg.interclass_filtering_threshold)
    assert type(loss).__name__ == "CombinedMarginLoss" and loss.m3 == 0.35


def test_class_counts(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder
    for name, count in (("a", 3), ("b", 1), ("c", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", (4, 4)).save(tmp_path / name / f"{i}.png")
    counts = class_counts_from_dataset(ImageFolder(str(tmp_path)), 3)
    assert counts.tolist() == [3, 1, 2]
    np.savetxt(tmp_path / "counts.txt", [4, 5, 6], fmt="%d")
    assert read_class_counts(str(tmp_path / "counts.txt"), 3).tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="num_classes = 4"):
        read_class_counts([1, 2, 3], 4)
    with pytest.raises(ValueError, match="class_counts"):
        class_counts_from_dataset(torch.utils.data.TensorDataset(torch.zeros(2)), 2)


def test_class_counts_from_ms1m_rec(tmp_path):
    """K_i from the identity records of an MS1M-style train.rec (the layout MXFaceDataset reads)."""
    from leap_plugin.insightface.ms1m import write_ms1m
    from leap_plugin.insightface.recordio import IndexedRecordWriter
    sizes = [4, 1, 3, 5]
    images = [(float(c), b"jpeg-bytes") for c, n in enumerate(sizes) for _ in range(n)]
    with IndexedRecordWriter(tmp_path / "train.idx", tmp_path / "train.rec") as writer:
        write_ms1m(writer, sizes, images)
    assert class_counts_from_rec(tmp_path, 5).tolist() == [4, 1, 3, 5, 0]
    with pytest.raises(ValueError, match="num_classes = 3"):
        class_counts_from_rec(tmp_path, 3)


def test_all_configs_load(host_modules):
    names = sorted(p.stem for p in (REPO / "configs" / "insightface").glob("ms1m_*.py"))
    assert len(names) == 16
    prepare(host_modules, str(REPO / "configs" / "insightface" / f"{names[0]}.py"))
    from utils.utils_config import get_config
    for name in names:
        cfg = get_config(f"configs/{name}.py")
        subset = name.split("_")[1:3]
        head, tail = int(subset[0][1]) * 1000, int(subset[1][1:3]) * 1000
        assert cfg.num_classes == head + tail and cfg.rec.endswith("_".join(subset))
        assert (cfg.leap is not None) == name.endswith("_leap")
        assert cfg.margin_list == ((1.0, 0.5, 0.0) if "arcface" in name else (1.0, 0.0, 0.35))
        if cfg.leap is not None:
            LEAPMarginLoss.from_margin_list(cfg.margin_list, 64, torch.full((cfg.num_classes,), 5), 512,
                                            **cfg.leap)  # every key is a LEAPMarginLoss argument


def test_session_logging_callback_passes_the_epoch_and_logs_the_statistics(host_modules, world1, caplog):
    """The host's own CallBackLogging, wrapped: every call tells the loss the epoch (loaders without a
    sampler, DALI); at its ``frequent`` the LEAP statistics go to the log and the tensorboard writer."""
    prepare(host_modules, str(REPO / "configs" / "insightface" / "ms1m_h5k_t20k_r18_cosface.py"))
    compat._records_without_mxnet()  # utils_callbacks imports eval.verification, which imports mxnet
    from utils.utils_callbacks import CallBackLogging
    from utils.utils_logging import AverageMeter
    session = Session()
    loss = LEAPMarginLoss(torch.tensor([3, 3, 3]), 4, start_epoch=2)
    session.losses.append(weakref.ref(loss))
    metrics = {"leap/reference_var": torch.tensor(0.25), "leap/cloud_fraction": torch.tensor(0.5),
               "leap/mean_abs_alpha": torch.tensor(0.125), "leap/tail_mean_angle": torch.tensor(0.75),
               "leap/head_mean_angle": torch.tensor(1.0)}
    loss.last_metrics = metrics  # what LEAPMarginLoss refreshes every training step

    class Writer:  # SummaryWriter's add_scalar
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, scalar_value, global_step):
            self.scalars.append((tag, scalar_value, global_step))

    writer = Writer()
    callback = session.wrap_logging_callback(CallBackLogging)(frequent=2, total_step=10, batch_size=4,
                                                              writer=writer)
    meter = AverageMeter()
    meter.update(1.0)
    with caplog.at_level("INFO"):
        for step in (1, 2, 3):
            callback(step, meter, 2, False, 0.1, None)
    assert loss.leap.epoch == 2 and loss.leap.cloud_active
    leap_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LEAP:")]
    assert leap_lines == ["LEAP: cloud_fraction 0.5   head_mean_angle 1   mean_abs_alpha 0.125   "
                          "reference_var 0.25   tail_mean_angle 0.75   Global Step: 2"]
    ours = sorted(s for s in writer.scalars if s[0].startswith("leap/"))
    assert ours == sorted((key, float(value), 2) for key, value in metrics.items())


def test_session_without_class_counts_says_how_to_give_them(tmp_path):
    from easydict import EasyDict as edict
    session = Session()
    for rec in ("", str(tmp_path)):  # no config.rec, or a folder without train.rec / train.idx
        session.cfg = edict(leap={}, rec=rec, num_classes=3, embedding_size=4)
        with pytest.raises(ValueError, match=r"config.leap\['class_counts'\].*config.rec = "):
            session.build_loss(64, (1.0, 0.0, 0.35))


def test_session_option_errors_name_the_config_key():
    from easydict import EasyDict as edict
    session = Session()
    session.cfg = edict(leap={"class_counts": [4, 4, 2], "memory_factor": 0}, rec="", num_classes=3,
                        embedding_size=4)
    with pytest.raises(ValueError, match=r"config\.leap\['memory_factor'\]=0 is invalid: expected an integer >= 1"):
        session.build_loss(64, (1.0, 0.0, 0.35))
    session.cfg.leap = {"class_counts": [4, 4, 2], "version": "vanilla"}
    with pytest.raises(ValueError, match=r"config\.leap\['head_threshold'\] must be set .* config\.leap\['version'\]"):
        session.build_loss(64, (1.0, 0.0, 0.35))
