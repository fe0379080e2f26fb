"""Finding arcface_torch: explicit folder, $INSIGHTFACE_ROOT, the per-user location; clear errors."""
import pytest

from leap_plugin.insightface import host


def _fake_checkout(root):
    arcface = root / "recognition" / "arcface_torch"
    arcface.mkdir(parents=True)
    for name in ("train_v2.py", "partial_fc_v2.py"):
        (arcface / name).write_text("")
    return arcface.resolve()


def test_lookup_order(tmp_path, monkeypatch):
    explicit, env, user = (_fake_checkout(tmp_path / name) for name in ("explicit", "env", "user"))
    monkeypatch.setattr(host, "USER_ROOT", tmp_path / "user")
    monkeypatch.setenv("INSIGHTFACE_ROOT", str(tmp_path / "env"))
    assert host.locate_arcface_torch(str(tmp_path / "explicit")) == explicit
    assert host.locate_arcface_torch(str(explicit)) == explicit  # the arcface_torch folder itself
    assert host.locate_arcface_torch() == env
    monkeypatch.delenv("INSIGHTFACE_ROOT")
    assert host.locate_arcface_torch() == user


def test_errors_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "USER_ROOT", tmp_path / "nothing")
    monkeypatch.delenv("INSIGHTFACE_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="INSIGHTFACE_ROOT is not set and .*nothing holds no insightface "
                                                "checkout. Clone https://github.com/deepinsight/insightface"):
        host.locate_arcface_torch()
    monkeypatch.setenv("INSIGHTFACE_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no arcface_torch .* in .*recognition/arcface_torch"):
        host.locate_arcface_torch()


def test_write_config_round_trips(tmp_path):
    path = host.write_config(tmp_path / "face.py", lr=0.1, margin_list=(1.0, 0.0, 0.35), leap={"start_epoch": 2},
                             val_targets=[])
    namespace = {}
    exec(path.read_text(), namespace)
    assert namespace["config"] == {"lr": 0.1, "margin_list": (1.0, 0.0, 0.35), "leap": {"start_epoch": 2},
                                   "val_targets": []}
    with pytest.raises(ValueError, match="shadow"):
        host.write_config(tmp_path / "base.py", lr=0.1)
