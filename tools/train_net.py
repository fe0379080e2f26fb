#!/usr/bin/env python
"""FastReID's train_net.py with the LEAP plugin: the same CLI (--config-file, --eval-only,
--resume, --num-gpus, KEY VALUE opts), LEAPTrainer instead of DefaultTrainer.

    python tools/train_net.py --config-file configs/fastreid/Market1501_LT/H20_S5/leap_cf.yml MODEL.DEVICE cpu
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import leap_plugin.fastreid  # noqa: E402,F401  (registers LEAPHead, the *_LT datasets, compat patches)
from fastreid.config import get_cfg  # noqa: E402
from fastreid.engine import default_argument_parser, default_setup, launch  # noqa: E402
from fastreid.utils import comm  # noqa: E402
from fastreid.utils.env import seed_all_rng  # noqa: E402
from leap_plugin.fastreid import LEAPTrainer, add_leap_config  # noqa: E402
from leap_plugin.fastreid.checkpoint import LEAPCheckpointer, lock_output_dir  # noqa: E402


def setup(args):
    cfg = get_cfg()
    add_leap_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    if args.eval_only and not cfg.MODEL.WEIGHTS:
        sys.exit("--eval-only needs the model to evaluate: set MODEL.WEIGHTS to a checkpoint "
                 "(e.g. MODEL.WEIGHTS <OUTPUT_DIR>/model_final.pth)")
    lock_output_dir(cfg.OUTPUT_DIR)  # before default_setup writes its log and config.yaml there
    default_setup(cfg, args)  # seeds every RNG at random
    if cfg.SEED >= 0:
        seed_all_rng(cfg.SEED + comm.get_rank())
    return cfg


def save_results(cfg, results):
    """OUTPUT_DIR/final_results.json: the last evaluation, for scripts (tools/demo.py)."""
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        with open(os.path.join(cfg.OUTPUT_DIR, "final_results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)  # numpy scalars -> float


def main(args):
    cfg = setup(args)
    if args.eval_only:
        cfg.defrost()
        cfg.MODEL.BACKBONE.PRETRAIN = False
        model = LEAPTrainer.build_model(cfg)
        LEAPCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        return LEAPTrainer.test(cfg, model)
    trainer = LEAPTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    save_results(cfg, results)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
