"""LEAPHead built from yaml through FastReID's own registry and build_model."""
import pytest
import torch

from fastreid.modeling import build_model
from fastreid.modeling.heads import EmbeddingHead
from fastreid.modeling.heads.build import REID_HEADS_REGISTRY
from leap_plugin.fastreid import LEAPHead

from reid_fixtures import tiny_cfg


def test_registered_and_built_from_yaml():
    assert REID_HEADS_REGISTRY.get("LEAPHead") is LEAPHead
    cfg = tiny_cfg("leap_af.yml", **{"MODEL.HEADS.NUM_CLASSES": 7})
    model = build_model(cfg)
    assert isinstance(model.heads, LEAPHead)
    assert model.heads.margin == "arc" and model.heads.cls_layer.s == 16 and model.heads.cls_layer.m == 0.2
    assert model.heads.leap_options.version == "full" and model.heads.leap is None  # until the class counts


@pytest.mark.parametrize("host_config,leap_config", [("cosface.yml", "leap_cf.yml"), ("arcface.yml", "leap_af.yml")])
def test_before_start_epoch_equals_embedding_head(host_config, leap_config):
    torch.manual_seed(0)
    opts = {"MODEL.HEADS.NUM_CLASSES": 9, "MODEL.HEADS.LEAP.START_EPOCH": 5}
    host = EmbeddingHead(tiny_cfg(host_config, **opts))
    leap = LEAPHead(tiny_cfg(leap_config, **opts))
    leap.load_state_dict(host.state_dict(), strict=False)
    leap.set_class_counts(torch.full((9,), 6))
    features = torch.randn(12, 512, 4, 2)
    targets = torch.randint(0, 9, (12,))
    host.train(), leap.train()
    want, got = host(features, targets), leap(features, targets)
    for key in ("cls_outputs", "pred_class_logits", "features"):
        torch.testing.assert_close(got[key], want[key], atol=5e-5, rtol=0)
    # the statistics were updated, but no cloud was applied
    assert int(leap.stats.num_written.sum()) == 12
    leap.eval(), host.eval()
    torch.testing.assert_close(leap(features), host(features))


def test_cloud_changes_tail_logits_from_start_epoch():
    torch.manual_seed(0)
    head = LEAPHead(tiny_cfg("leap_cv.yml", **{"MODEL.HEADS.NUM_CLASSES": 4, "MODEL.HEADS.LEAP.START_EPOCH": 3,
                                               "MODEL.HEADS.LEAP.HEAD_THRESHOLD": 5}))
    head.set_class_counts(torch.tensor([20, 20, 3, 3]))
    head.train()
    features = torch.randn(16, 512, 1, 1)
    targets = torch.tensor([0, 1, 2, 3] * 4)
    for _ in range(3):
        head(features + 0.3 * torch.randn_like(features), targets)
    plain = head(features, targets)["cls_outputs"]
    head.set_epoch(3)
    cloud = head(features, targets)["cls_outputs"]
    head_rows, tail_rows = targets < 2, targets >= 2
    # head classes never get alpha; tail classes (var below sigma_h^2) do
    assert head.leap.cloud.std(head.stats, targets)[tail_rows].gt(0).any()
    torch.testing.assert_close(cloud[head_rows], plain[head_rows], atol=1e-4, rtol=0)
    assert not torch.allclose(cloud[tail_rows], plain[tail_rows], atol=1e-3)


def test_no_update_without_grad():
    head = LEAPHead(tiny_cfg(**{"MODEL.HEADS.NUM_CLASSES": 3}))
    head.set_class_counts(torch.tensor([4, 4, 4]))
    head.train()
    with torch.no_grad():  # PreciseBN runs the model like this
        head(torch.randn(6, 512, 1, 1), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert int(head.stats.num_written.sum()) == 0


def test_training_without_class_counts_says_how_to_fix():
    head = LEAPHead(tiny_cfg(**{"MODEL.HEADS.NUM_CLASSES": 3}))
    head.train()
    with pytest.raises(RuntimeError, match="LEAPTrainer"):
        head(torch.randn(2, 512, 1, 1), torch.tensor([0, 1]))


def test_angle_reference_weight_and_16bit_centres():
    """ANGLE_REFERENCE weight: the angles in memory are those between the embedding and W_y;
    CENTER_DTYPE float16 stores the centres in 16 bits and survives a state_dict round trip."""
    torch.manual_seed(0)
    opts = {"MODEL.HEADS.NUM_CLASSES": 5, "MODEL.HEADS.LEAP.ANGLE_REFERENCE": "weight",
            "MODEL.HEADS.LEAP.CENTER_DTYPE": "float16"}
    head = LEAPHead(tiny_cfg("leap_cf.yml", **opts)).train()
    head.set_class_counts(torch.full((5,), 4))
    assert head.stats.centers.dtype == torch.float16
    features, targets = torch.randn(10, 512, 1, 1), torch.tensor([0, 1, 2, 3, 4] * 2)
    head(features, targets)
    emb = torch.nn.functional.normalize(head.bottleneck(features)[..., 0, 0].double())
    w = torch.nn.functional.normalize(head.weight[targets].double())
    want = torch.arccos((emb * w).sum(1).clamp(-1, 1))
    torch.testing.assert_close(head.stats.memory[:-1].view(5, 4)[:, :2].t().reshape(-1).double(), want,
                               atol=1e-5, rtol=0)
    again = LEAPHead(tiny_cfg("leap_cf.yml", **opts))
    again.load_state_dict(head.state_dict())
    assert torch.equal(again.stats.centers, head.stats.centers)


@pytest.mark.parametrize("opts,match", [
    ({"MODEL.HEADS.CLS_LAYER": "CircleSoftmax"}, "MODEL.HEADS.CLS_LAYER='CircleSoftmax'"),
    ({"MODEL.HEADS.LEAP.VERSION": "vanila"}, "MODEL.HEADS.LEAP.VERSION='vanila'"),
    ({"MODEL.HEADS.LEAP.VERSION": "vanilla"}, "MODEL.HEADS.LEAP.HEAD_THRESHOLD must be set"),
    ({"MODEL.HEADS.LEAP.CENTER_RATE": 1.5}, "MODEL.HEADS.LEAP.CENTER_RATE=1.5"),
    ({"MODEL.HEADS.LEAP.MEMORY_FACTOR": 0}, "MODEL.HEADS.LEAP.MEMORY_FACTOR=0"),
    ({"MODEL.HEADS.LEAP.MIN_ANGLES": 1}, "MODEL.HEADS.LEAP.MIN_ANGLES=1"),
    ({"MODEL.HEADS.LEAP.ANGLE_REFERENCE": "centroid"}, "MODEL.HEADS.LEAP.ANGLE_REFERENCE='centroid'"),
    ({"MODEL.HEADS.LEAP.CENTER_DTYPE": "half"}, "MODEL.HEADS.LEAP.CENTER_DTYPE='half'"),
])
def test_config_errors_name_the_key(opts, match):
    cfg = tiny_cfg(**dict(opts, **{"MODEL.HEADS.NUM_CLASSES": 3}))
    with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
        build_model(cfg)
