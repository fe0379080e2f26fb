"""Shared settings of the paper's face experiments (LEAP, Section 4.1 "Face recognition").

arcface_torch-style: its ``get_config`` merges ``configs/base.py`` first, then the job config's
``config``. The job configs next to this file are one line each::

    from .leap_face_base import face_config
    config = face_config("h5k_t10k", "cosface", leap=True)

(relative import: they are loaded as ``configs.<name>``, by ``tools/train_arcface_leap.py`` or
after copying this folder's files into arcface_torch's ``configs/``).

Paper: MS-Celeb-1M, top H classes kept whole (head), next T classes cut to 5 images (tail);
ResNet-18, 512-d, 112x112, 30 epochs, triangular LR, feature cloud from the start of the third
cycle, CosFace s=64 m=0.35, ArcFace s=64 m=0.5, centre rate 0.1, centres updated every 5
iterations; the face results (Table 6: LEAP-CV, LEAP-AV) are the vanilla version.
Not given by the paper (our choices, marked below): batch size, LR range and cycle length,
memory factor P, head threshold T (5 separates exactly: tail classes keep 5 images).
"""
from easydict import EasyDict as edict

# subset name: (H head classes, T tail classes)
SUBSETS = {"h5k_t10k": (5000, 10000), "h5k_t20k": (5000, 20000),
           "h3k_t10k": (3000, 10000), "h3k_t20k": (3000, 20000)}
# arcface_torch margin_list (m1, m2, m3): ArcFace = (1, m_a, 0), CosFace = (1, 0, m_c); s = 64
MARGINS = {"cosface": (1.0, 0.0, 0.35), "arcface": (1.0, 0.5, 0.0)}
TAIL_IMAGES = 5
CYCLE_EPOCHS = 10  # ours: 30 epochs = 3 triangular cycles


def face_config(subset: str, margin: str, leap: bool):
    """The config of one experiment: ``subset`` in SUBSETS, ``margin`` in MARGINS, baseline or LEAP."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {sorted(SUBSETS)}, got {subset!r}")
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {sorted(MARGINS)}, got {margin!r}")
    head, tail = SUBSETS[subset]
    config = edict()
    config.margin_list = MARGINS[margin]
    config.network = "r18"
    config.resume = False
    config.save_all_states = True  # per-rank checkpoints: they hold the LEAP statistics for resume
    config.output = None  # work_dirs/<config name>
    config.embedding_size = 512
    config.sample_rate = 1.0
    config.interclass_filtering_threshold = 0
    config.fp16 = True
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.batch_size = 128  # per GPU (ours)
    config.lr = 0.1  # triangular: peak LR (ours)
    # read by tools/train_arcface_leap.py; a plain train_v2.py ignores them (its polynomial decay)
    config.lr_policy = "triangular"
    config.lr_min = 0.001  # ours
    config.lr_cycle_epochs = CYCLE_EPOCHS
    config.verbose = 2000
    config.frequent = 10
    config.dali = False
    # the long-tailed subset (train.rec / train.idx, made with the plugin's long-tail tool) and
    # the verification .bin files (lfw.bin, cfp_fp.bin, agedb_30.bin) in the same folder
    config.rec = f"/train_tmp/ms1m_{subset}"
    config.num_classes = head + tail
    # counted from the dataset by tools/train_arcface_leap.py; set it for a plain train_v2.py
    config.num_image = None
    config.num_epoch = 30
    config.warmup_epoch = 0
    config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
    config.leap = None
    if leap:
        # the LEAP options that differ from the face loss's defaults (README "Options";
        # leap_plugin/insightface/loss.py FACE_DEFAULTS: centres every 5 iterations, Section 4.3;
        # angles to the centre before its update; 16-bit centres)
        config.leap = dict(
            version="vanilla",  # Table 6: LEAP-CV / LEAP-AV
            head_threshold=TAIL_IMAGES,  # K_i > 5: a head class (ours; tail classes have exactly 5)
            start_epoch=2 * CYCLE_EPOCHS,  # the start of the third cycle
            # arcface_torch's ArcFace passes the gradient straight through the margin: keep that so
            # that LEAP-AV differs from the ArcFace baseline by the cloud only
            straight_through=margin == "arcface",
        )
    return config
