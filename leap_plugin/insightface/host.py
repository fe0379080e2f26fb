"""Finding and loading InsightFace's arcface_torch (the host), without editing or copying it.

Where arcface_torch is looked for, first hit wins:

1. the folder given explicitly (``--insightface-root``);
2. ``$INSIGHTFACE_ROOT``;
3. ``~/.cache/leap-plugin/insightface`` (``USER_ROOT``), e.g. made with
   ``git clone https://github.com/deepinsight/insightface ~/.cache/leap-plugin/insightface``.

Each may be an insightface checkout or its ``recognition/arcface_torch`` folder.
"""
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

__all__ = ["USER_ROOT", "find_arcface_torch", "locate_arcface_torch", "prepare", "load_train_v2", "write_config",
           "load_backbone"]

USER_ROOT = Path("~/.cache/leap-plugin/insightface")


def find_arcface_torch(root) -> Path:
    """The arcface_torch folder: ``root`` itself or ``root/recognition/arcface_torch``."""
    root = Path(root).expanduser().resolve()
    for candidate in (root, root / "recognition" / "arcface_torch"):
        if (candidate / "train_v2.py").is_file() and (candidate / "partial_fc_v2.py").is_file():
            return candidate
    raise FileNotFoundError(f"no arcface_torch (train_v2.py, partial_fc_v2.py) in {root} or "
                            f"{root / 'recognition' / 'arcface_torch'}")


def locate_arcface_torch(explicit: Optional[str] = None) -> Path:
    """arcface_torch from ``explicit``, else ``$INSIGHTFACE_ROOT``, else ``USER_ROOT``.

    Raises FileNotFoundError saying where it looked and how to point at a checkout.
    """
    if explicit:
        return find_arcface_torch(explicit)
    env = os.environ.get("INSIGHTFACE_ROOT")
    if env:
        return find_arcface_torch(env)
    try:
        return find_arcface_torch(USER_ROOT)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no arcface_torch found: INSIGHTFACE_ROOT is not set and {USER_ROOT} holds no insightface "
            f"checkout. Clone https://github.com/deepinsight/insightface there, or set INSIGHTFACE_ROOT "
            f"(or --insightface-root) to a checkout or its recognition/arcface_torch folder") from None


def _resolve_config(arcface: Path, config: str) -> Tuple[str, Optional[Path]]:
    """(the ``configs/<name>.py`` argument for train_v2, folder to put on the configs package path)."""
    path = Path(config).expanduser()
    if path.is_file():
        path = path.resolve()
        if path.stem == "base":
            raise ValueError("a config named base.py would shadow arcface_torch's configs/base.py")
        extra = None if path.parent == (arcface / "configs").resolve() else path.parent
        return f"configs/{path.stem}.py", extra
    if (arcface / "configs" / path.name).is_file():
        return f"configs/{path.name}", None
    raise FileNotFoundError(f"config {config} not found (nor {arcface / 'configs' / path.name})")


def prepare(arcface_root, config: str) -> Tuple[Path, str]:
    """Put arcface_torch first on sys.path and the config's folder on its ``configs`` package path.

    Returns (arcface_torch folder, the ``configs/<name>.py`` argument its get_config expects).
    """
    arcface = find_arcface_torch(arcface_root)
    if str(arcface) not in sys.path:
        sys.path.insert(0, str(arcface))
    for name in ("configs", "utils", "eval"):  # a same-named module from elsewhere must not shadow theirs
        module = sys.modules.get(name)
        if module is not None and not str(getattr(module, "__file__", "") or "").startswith(str(arcface)):
            del sys.modules[name]
    config_arg, extra = _resolve_config(arcface, config)
    configs = importlib.import_module("configs")
    if extra is not None and str(extra) not in configs.__path__:
        configs.__path__.insert(0, str(extra))
    return arcface, config_arg


def load_train_v2(arcface: Path):
    """Import arcface_torch's train_v2.py as a module (not as __main__: its main() does not run).

    Its top level runs as usual: imports, ``init_process_group`` (see ``compat`` for CPU hosts).
    """
    spec = importlib.util.spec_from_file_location("train_v2", arcface / "train_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(path, **settings) -> Path:
    """Write an arcface_torch config file (``config = edict(...)``; its ``configs/base.py`` is merged
    first by ``get_config``) holding ``settings``, values that ``repr`` round-trips."""
    path = Path(path)
    if path.stem == "base":
        raise ValueError("a config named base.py would shadow arcface_torch's configs/base.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"config.{key} = {value!r}\n" for key, value in settings.items())
    path.write_text(f'"""Written by leap_plugin.insightface.host.write_config."""\n'
                    f"from easydict import EasyDict as edict\n\nconfig = edict()\n{body}")
    return path


def load_backbone(arcface: Path, network: str, embedding_size: int, weights):
    """arcface_torch's ``get_model(network)`` with the weights train_v2 saved (``model.pt``), in eval
    mode on CPU."""
    import torch
    if str(arcface) not in sys.path:
        sys.path.insert(0, str(arcface))
    backbones = importlib.import_module("backbones")
    model = backbones.get_model(network, dropout=0.0, fp16=False, num_features=embedding_size)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model.eval()
