#!/usr/bin/env python
"""Head-vs-tail intra-class angular variance of a trained FastReID model (paper Section 1).

    python tools/analyze.py --config-file configs/fastreid/DukeMTMC_LT/H20_S4/cosface.yml \\
        --weights logs/cosface/model_final.pth --out analysis/cosface MODEL.DEVICE cuda

writes OUT/analysis.json and OUT/angles.npz (``leap_plugin.fastreid.analysis.analyze_run``, which
does the same from Python); ``--plots`` also draws this run alone.
"""
import argparse
import json
import logging

from leap_plugin.fastreid.analysis import analyze_run, setup


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the training config")
    parser.add_argument("--weights", required=True, help="the checkpoint, e.g. OUTPUT_DIR/model_final.pth")
    parser.add_argument("--out", required=True, help="folder for analysis.json and angles.npz")
    parser.add_argument("--head-threshold", type=int, default=None, metavar="T",
                        help="classes with more than T images are head "
                             "(default: DATASETS.LONG_TAIL.TAIL_IMAGES)")
    parser.add_argument("--plots", action="store_true", help="also draw angles.png, variance.png, tsne.png")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = analyze_run(setup(args.config_file, args.opts), args.weights, args.out,
                         head_threshold=args.head_threshold, plots=args.plots)
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
