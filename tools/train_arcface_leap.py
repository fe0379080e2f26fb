#!/usr/bin/env python
"""Run InsightFace arcface_torch's own, unmodified ``train_v2.py`` with the LEAP margin loss.

    torchrun --nproc_per_node=8 tools/train_arcface_leap.py \\
        --insightface-root /path/to/insightface configs/insightface/ms1m_h5k_t10k_r18_cosface_leap.py

(``--insightface-root``: an insightface checkout or its ``recognition/arcface_torch`` folder;
default ``$INSIGHTFACE_ROOT``, else ``~/.cache/leap-plugin/insightface``.) On a CPU-only machine the
same command trains on CPU (gloo), also under ``torchrun --nproc_per_node 2``; mxnet is optional.

``train_v2.py`` is imported as a module (so its ``main`` does not start) after the host patches of
``leap_plugin.insightface.compat``; the host names it imported into its own globals are rebound
by ``leap_plugin.insightface.session.Session``; then its ``main`` runs with the config. The LEAP
statistics are buffers of the loss, PartialFC_V2's ``margin_softmax``: they are in train_v2's
``checkpoint_gpu_{rank}.pt`` (set ``save_all_states``) and come back with ``resume``.
"""
import argparse

import torch

from leap_plugin.insightface import compat
from leap_plugin.insightface.host import load_train_v2, locate_arcface_torch, prepare
from leap_plugin.insightface.session import Session


def main(argv=None) -> Session:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--insightface-root", default=None,
                        help="insightface checkout, or its recognition/arcface_torch folder "
                             "(default: $INSIGHTFACE_ROOT, else ~/.cache/leap-plugin/insightface)")
    parser.add_argument("config", help="arcface_torch-style python config (e.g. configs/insightface/...)")
    args = parser.parse_args(argv)
    try:
        root = locate_arcface_torch(args.insightface_root)
    except FileNotFoundError as error:
        raise SystemExit(f"train_arcface_leap: {error}") from None
    arcface, config_arg = prepare(root, args.config)
    compat.apply()
    train_v2 = load_train_v2(arcface)
    session = Session()
    session.patch(vars(train_v2))
    torch.backends.cudnn.benchmark = True  # as train_v2's own __main__ block
    train_v2.main(argparse.Namespace(config=config_arg))
    return session


if __name__ == "__main__":
    main()
