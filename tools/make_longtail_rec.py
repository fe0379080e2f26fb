"""Make a long-tailed subset of an MS1M-style train.rec/train.idx (the paper's <H, T> face sets).

    python tools/make_longtail_rec.py --src faces_emore --dst ms1m_H5K_T10K \\
        --num-head 5000 --num-tail 10000 --tail-images 5 --seed 0

The paper's four subsets: (--num-head, --num-tail) = (5000, 10000), (5000, 20000), (3000, 10000),
(3000, 20000), --tail-images 5. The output is read by arcface_torch (MXFaceDataset and DALI)
unchanged: set ``config.rec`` to --dst and use the printed num_classes / num_image.
The logic is leap_plugin.insightface.ms1m.make_longtail_rec.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from leap_plugin.insightface.ms1m import make_longtail_rec  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="folder with the source train.rec/train.idx")
    parser.add_argument("--dst", required=True, help="folder for the new train.rec/train.idx")
    parser.add_argument("--num-head", type=int, required=True, help="H: identities kept whole")
    parser.add_argument("--num-tail", type=int, default=None,
                        help="T: identities after the head cut to --tail-images (default: all)")
    parser.add_argument("--tail-images", type=int, default=5, help="S: images per tail identity")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tail images' choice")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = make_longtail_rec(args.src, args.dst, num_head=args.num_head,
                                    num_tail=args.num_tail, tail_images=args.tail_images,
                                    seed=args.seed, force=args.force,
                                    progress=not args.no_progress)
    except (ValueError, OSError) as exc:
        print(f"make_longtail_rec: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {Path(args.dst) / 'train.rec'}: {summary.num_head} head + {summary.num_tail} "
          f"tail identities (of {summary.source_classes}), {summary.num_image} images "
          f"(of {summary.source_images})")
    print(summary.config_lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
