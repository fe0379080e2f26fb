"""LEAPMarginLoss's statistics on train_v2's resume (real PartialFC_V2, strict load): a checkpoint of
another memory factor, other classes or corrupt values is refused naming the config key / class;
config.leap['reset_stats'] resumes with fresh statistics (issue 14)."""

import pytest
import torch
from easydict import EasyDict as edict

from leap_plugin.core.integrity import StatsStateError
from leap_plugin.insightface import LEAPMarginLoss
from leap_plugin.insightface.session import Session

from face_fixtures import load_host, train, train_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::SyntaxWarning")
COUNTS = [40, 30, 20, 5, 5, 5, 4, 5, 3]


def _pfc(arcface, counts=COUNTS, **leap):
    loss = LEAPMarginLoss(torch.tensor(counts), 8, margin="cos", margin_value=0.35, update_every=1, **leap)
    pfc = load_host(arcface, "partial_fc_v2").PartialFC_V2(loss, 8, len(counts), 1.0, False).train()
    loss.attach(pfc)
    return pfc, loss


@pytest.fixture
def saved(arcface, world1):
    """train_v2's per-rank ``state_dict_softmax_fc`` after 3 steps with P = 1."""
    torch.manual_seed(0)
    pfc, _ = _pfc(arcface)
    train(pfc, pfc.margin_softmax, 3, torch.optim.SGD(pfc.parameters(), lr=0.5))
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in pfc.state_dict().items()}


def test_resume_with_another_memory_factor_is_refused_naming_the_config_key(arcface, saved):
    pfc, _ = _pfc(arcface, memory_factor=2)
    with pytest.raises(StatsStateError, match=r"(?s)memory factor P .* 1, this run 2.*"
                                              r"config.leap\['memory_factor'\] differs.*reset_stats"):
        pfc.load_state_dict(saved)
    counts = COUNTS[:-1] + [4]  # another K_i (another subset of the data)
    pfc, _ = _pfc(arcface, counts=counts)
    with pytest.raises(StatsStateError, match=r"K_i differs for class \[8\].*config.num_classes"):
        pfc.load_state_dict(saved)


def test_reset_stats_resumes_the_model_with_fresh_statistics(arcface, saved):
    session = Session()
    session.cfg = edict(num_classes=len(COUNTS), embedding_size=8, rec="",
                        leap=dict(class_counts=COUNTS, memory_factor=2, update_every=1, reset_stats=True,
                                  angle_reference="updated_center"))
    loss = session.build_loss(64.0, (1.0, 0.0, 0.35))
    assert loss.leap.options.reset_stats
    pfc = load_host(arcface, "partial_fc_v2").PartialFC_V2(loss, 8, len(COUNTS), 1.0, False).train()
    loss.attach(pfc)
    pfc.load_state_dict(saved)  # strict, as train_v2
    assert torch.equal(pfc.weight, saved["weight"]) and loss.leap.step == 3
    assert loss.stats.memory_factor == 2 and int(loss.stats.num_written.sum()) == 0
    emb, labels = train_batch(3)
    pfc(emb.requires_grad_(), labels).backward()  # and it trains on
    assert int(loss.stats.num_written.sum()) == 12


def test_corrupt_statistics_are_refused_naming_the_class(arcface, saved):
    saved["margin_softmax.stats.centers"][4, 0] = float("inf")
    pfc, _ = _pfc(arcface)
    with pytest.raises(StatsStateError, match=r"(?s)non-finite class centre for class \[4\].*"
                                              "resume from a sound checkpoint, or set config.leap"):
        pfc.load_state_dict(saved)


def test_session_warns_when_the_cloud_never_switches_on(caplog):
    session = Session()
    session.cfg = edict(num_classes=len(COUNTS), embedding_size=8, rec="", num_epoch=30,
                        leap=dict(class_counts=COUNTS, version="vanilla", head_threshold=40, start_epoch=30))
    session.build_loss(64.0, (1.0, 0.0, 0.35))
    text = caplog.text
    assert "start_epoch'] 30 >= config.num_epoch 30: the feature cloud never switches on" in text
    assert "no class has more than head_threshold T = 40 images (the largest K_i is 40)" in text
    caplog.clear()
    session.cfg.leap.update(head_threshold=39, start_epoch=29)
    session.build_loss(64.0, (1.0, 0.0, 0.35))
    assert "never" not in caplog.text
