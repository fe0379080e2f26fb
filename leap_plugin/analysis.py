"""Angular statistics of a trained model: the paper's Section 1 measurement, and its plots.

For every training image, the angle beta between its l2-normalised feature and its class centre
(Eq. 3; the centre is the mean of the normalised features of the class), then per class the
unbiased variance of those angles, and the head-vs-tail comparison with a 95% confidence interval
over classes -- the paper's "0.463 +- 0.030 (head) vs 0.288 +- 0.023 (tail)" on DukeMTMC-reID.
Angles are in radians, variances in rad^2.

    angles, classes, var, count = class_angles(features, labels)
    summary = head_tail_summary(var, count, is_head=count > T)
    plot_variance_bars({"baseline": summary_a, "LEAP": summary_b}, "variance.png")

torch, numpy, scipy, matplotlib (Agg, no pyplot state) and scikit-learn only: no host framework.
``tools/analyze.py`` runs this on a FastReID model and its training set.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats as scipy_stats

from .core.stats import unit_angle

__all__ = ["class_angles", "mean_std", "mean_ci", "head_tail_summary", "load_run", "plot_angle_distributions",
           "plot_variance_bars", "plot_tsne"]

HEAD_COLOUR, TAIL_COLOUR = "tab:blue", "tab:orange"


def _numpy(x, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def class_angles(features, labels):
    """Angle of every feature to its class centre (Eq. 3) and each class's angular variance.

    Args:
        features: [N, D] float features (tensor or array; need not be normalised; none may be 0).
        labels: [N] integer class labels, any values (e.g. FastReID's relabelled ids or raw pids).

    Returns:
        angles: [N] radians in [0, pi], float64 for float64 features, float32 otherwise.
        classes: [C'] the distinct labels, ascending (int64).
        var: [C'] float64, unbiased variance of the angles of each class; NaN with < 2 samples.
        count: [C'] int64, samples per class.

    The centre of class i is the mean of its l2-normalised features; its direction is what the
    angle is measured to. Everything is index_add over samples: no Python loop over classes or
    samples. A class whose normalised features sum to exactly 0 has no centre direction; its
    angles come out as pi/2.
    """
    feats = torch.as_tensor(features)
    labels = torch.as_tensor(labels)
    if feats.dim() != 2 or feats.shape[0] == 0 or not feats.dtype.is_floating_point:
        raise ValueError(f"features must be a non-empty float [N, D] array, got dtype {feats.dtype} "
                         f"and shape {tuple(feats.shape)}")
    if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"labels must have shape [N] with N = features.shape[0] = {feats.shape[0]}, "
                         f"got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if feats.dtype != torch.float64:
        feats = feats.float()
    if not torch.isfinite(feats).all():
        raise ValueError("features contain NaN or inf: the angle to a class centre is undefined")
    norms = feats.norm(dim=1)
    if (norms == 0).any():
        bad = torch.nonzero(norms == 0).flatten()[:5].tolist()
        raise ValueError(f"features {bad} are zero vectors: their direction (and angle) is undefined")
    feats = feats / norms[:, None]

    classes, inverse, count = torch.unique(labels.long(), sorted=True, return_inverse=True,
                                           return_counts=True)
    num_classes = classes.numel()
    centre = F.normalize(feats.new_zeros(num_classes, feats.shape[1]).index_add_(0, inverse, feats), dim=1)
    angles = unit_angle(feats, centre[inverse])

    # two-pass unbiased variance per class, in float64
    beta = angles.double()
    n = count.double()
    mean = beta.new_zeros(num_classes).index_add_(0, inverse, beta) / n
    sq_dev = beta.new_zeros(num_classes).index_add_(0, inverse, (beta - mean[inverse]) ** 2)
    var = torch.where(n >= 2, sq_dev / (n - 1).clamp(min=1), torch.full_like(n, math.nan))
    return angles, classes, var, count


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value) of a list of numbers."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def mean_ci(values, level: float = 0.95):
    """Mean of ``values`` (NaNs dropped) and the half-width of its Student-t confidence interval.

    Returns ``(mean, half_width, n)``: the interval is mean +- half_width at ``level``, with
    half_width = t_{(1 + level) / 2, n - 1} * s / sqrt(n) (s: sample standard deviation).
    half_width is NaN when n < 2; mean is NaN when n = 0.
    """
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95 for a 95% interval, got {level}")
    v = _numpy(values, np.float64).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, n
    half = scipy_stats.t.ppf(0.5 + float(level) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return mean, float(half), n


def head_tail_summary(var, count, is_head, level: float = 0.95) -> dict:
    """Mean per-class angular variance of head and of tail classes, each with its CI half-width.

    Args:
        var, count: [C] per-class variance and image count (as ``class_angles`` returns them).
        is_head: [C] bool, True for a head class (e.g. ``count > T``).

    Returns ``{"level": level, "head": {...}, "tail": {...}}``, each group holding ``var_mean``,
    ``var_ci`` (half-width: var_mean +- var_ci), ``num_classes``, ``num_classes_with_var``
    (classes with >= 2 images, the ones averaged) and ``num_images``. Plain Python numbers.
    """
    var = _numpy(var, np.float64).ravel()
    count = _numpy(count).ravel()
    is_head = _numpy(is_head).ravel()
    if is_head.dtype != np.bool_:
        raise ValueError(f"is_head must be boolean (one flag per class), got dtype {is_head.dtype}")
    if not var.shape == count.shape == is_head.shape:
        raise ValueError(f"var, count and is_head must have one entry per class, got shapes "
                         f"{var.shape}, {count.shape}, {is_head.shape}")
    summary = {"level": float(level)}
    for name, mask in (("head", is_head), ("tail", ~is_head)):
        mean, half, n = mean_ci(var[mask], level)
        summary[name] = {"var_mean": mean, "var_ci": half, "num_classes": int(mask.sum()),
                         "num_classes_with_var": n, "num_images": int(count[mask].sum())}
    return summary


def load_run(out_dir) -> dict:
    """What ``tools/analyze.py`` wrote to out_dir: the arrays of angles.npz plus ``"analysis"``,
    the content of analysis.json (``["analysis"]["summary"]`` is a ``head_tail_summary``)."""
    with np.load(os.path.join(out_dir, "angles.npz")) as data:
        run = {key: data[key] for key in data.files}
    with open(os.path.join(out_dir, "analysis.json")) as f:
        run["analysis"] = json.load(f)
    return run


# ---------------------------------------------------------------------------------------- plots

def _new_figure(width, height):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path


def plot_angle_distributions(runs: dict, path, bins: int = 40):
    """Histograms (densities) of the feature-to-centre angles of head vs tail classes.

    Args:
        runs: ``{method name: (angles [N], is_head [N] per sample)}``, one panel per method, side
            by side with shared axes (e.g. baseline vs LEAP: the paper's Fig. 1 / Fig. 3 idea).
        path: the PNG to write. Returns path.
    """
    if not runs:
        raise ValueError("runs is empty: give {method name: (angles, is_head_per_sample)}")
    data = {}
    for name, (angles, is_head) in runs.items():
        angles, is_head = _numpy(angles, np.float64).ravel(), _numpy(is_head).ravel()
        if angles.shape != is_head.shape or is_head.dtype != np.bool_:
            raise ValueError(f"{name}: angles and is_head must be [N] floats and [N] bools, got "
                             f"{angles.shape} and {is_head.shape} ({is_head.dtype})")
        data[name] = (angles, is_head)
    top = max(float(np.nanmax(a)) if a.size else 0.0 for a, _ in data.values())
    edges = np.linspace(0.0, max(top, 1e-6) * 1.02, bins + 1)

    fig = _new_figure(4.2 * len(data) + 0.6, 3.8)
    axes = fig.subplots(1, len(data), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (name, (angles, is_head)) in zip(axes, data.items()):
        for group, mask, colour in (("head", is_head, HEAD_COLOUR), ("tail", ~is_head, TAIL_COLOUR)):
            values = angles[mask]
            values = values[~np.isnan(values)]
            if values.size == 0:
                continue
            mean = values.mean()
            ax.hist(values, bins=edges, density=True, color=colour, alpha=0.45,
                    label=f"{group} classes: {values.size} images, mean {mean:.3f} rad")
            ax.axvline(mean, color=colour, linestyle="--", linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("angle between feature and its class centre (rad)")
        ax.legend(fontsize="small", loc="upper right")
    axes[0].set_ylabel("density")
    fig.suptitle("Intra-class angular spread on the training set: head vs tail classes "
                 "(dashed: mean angle)")
    return _save(fig, path)


def plot_variance_bars(summaries: dict, path):
    """Mean per-class angular variance of head and tail classes, with CI error bars, per method.

    Args:
        summaries: ``{method name: head_tail_summary(...)}``.
        path: the PNG to write. Returns path.
    """
    if not summaries:
        raise ValueError("summaries is empty: give {method name: head_tail_summary(...)}")
    names = list(summaries)
    levels = {s.get("level", 0.95) for s in summaries.values()}
    x = np.arange(len(names))
    width = 0.38
    fig = _new_figure(max(4.5, 1.9 * len(names) + 2.0), 4.0)
    ax = fig.subplots()
    for offset, group, colour in ((-width / 2, "head", HEAD_COLOUR), (width / 2, "tail", TAIL_COLOUR)):
        means = np.array([summaries[n][group]["var_mean"] for n in names], dtype=np.float64)
        cis = np.array([summaries[n][group]["var_ci"] for n in names], dtype=np.float64)
        classes = [summaries[n][group]["num_classes_with_var"] for n in names]
        bars = ax.bar(x + offset, np.nan_to_num(means), width, yerr=np.nan_to_num(cis), capsize=4,
                      color=colour, alpha=0.8, label=f"{group} classes")
        for bar, mean, ci, c in zip(bars, means, cis, classes):  # value above the error bar
            text = "n/a" if np.isnan(mean) else (f"{mean:.3g}" if np.isnan(ci) else f"{mean:.3g}\n±{ci:.2g}")
            ax.annotate(f"{text}\n({c} classes)", (bar.get_x() + bar.get_width() / 2,
                                                    bar.get_height() + np.nan_to_num(ci)),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize="x-small")
    ax.set_xticks(x, names)
    ax.set_ylabel("mean intra-class angular variance (rad²)")
    ax.margins(y=0.25)
    level = "/".join(f"{100 * lv:g}%" for lv in sorted(levels))
    ax.set_title(f"Intra-class angular variance, head vs tail classes\n(mean over classes ± {level} CI)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_tsne(features, labels, is_head_per_class, path, num_head: int = 4, num_tail: int = 6,
              seed: int = 0):
    """2-D t-SNE of a neighbourhood of head classes (dots) and tail classes (triangles), Fig. 1.

    Args:
        features: [N, D] features; labels: [N] integer labels.
        is_head_per_class: [C'] bool, aligned with the sorted distinct labels (``classes`` of
            ``class_angles``).
        num_head, num_tail: how many head / tail classes to show.
        seed: picks the first head class and seeds t-SNE.

    The classes shown are neighbours, as in the paper's figure: a random head class, the
    ``num_head - 1`` head classes whose centres are closest to it, and the ``num_tail`` tail
    classes closest to the mean of those. Each class has its own colour. Returns path.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    feats = _numpy(features, np.float64)
    labels = _numpy(labels).ravel()
    is_head = _numpy(is_head_per_class).ravel()
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be [N, D] and labels [N], got {feats.shape} and {labels.shape}")
    classes, inverse, count = np.unique(labels, return_inverse=True, return_counts=True)
    if is_head.dtype != np.bool_ or is_head.shape != classes.shape:
        raise ValueError(f"is_head_per_class must be {classes.size} bools (one per distinct label, "
                         f"ascending), got {is_head.shape} ({is_head.dtype})")
    if num_head < 0 or num_tail < 0 or num_head + num_tail == 0:
        raise ValueError(f"num_head and num_tail must be >= 0, not both 0; got {num_head}, {num_tail}")
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(min=1e-12)
    centres = np.zeros((classes.size, feats.shape[1]))
    np.add.at(centres, inverse, feats)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True).clip(min=1e-12)

    chosen_head, chosen_tail = _neighbour_classes(centres, is_head, num_head, num_tail, seed)
    chosen = np.concatenate([chosen_head, chosen_tail])
    mask = np.isin(inverse, chosen)
    if mask.sum() < 4:
        raise ValueError(f"t-SNE needs at least 4 points; the {chosen.size} classes chosen have "
                         f"{int(mask.sum())} images")
    points = feats[mask]
    perplexity = float(min(30.0, max(1.0, (points.shape[0] - 1) / 3)))
    with threadpool_limits(1):  # a few hundred points: threads only add contention (10x slower)
        embedding = TSNE(n_components=2, perplexity=perplexity, init="pca",
                         random_state=seed).fit_transform(points)
    point_class = inverse[mask]

    fig = _new_figure(7.6, 5.4)
    ax = fig.subplots()
    cmap = colormaps["tab10" if chosen.size <= 10 else "tab20"]
    palette = [cmap(i % cmap.N) for i in range(chosen.size)]
    for k, c in enumerate(chosen):
        xy = embedding[point_class == c]
        head = bool(is_head[c])
        ax.scatter(xy[:, 0], xy[:, 1], s=28 if head else 46, marker="o" if head else "^",
                   color=palette[k], edgecolors="black" if not head else "none", linewidths=0.5,
                   label=f"{'head' if head else 'tail'} class {classes[c]} ({count[c]} images)")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(f"t-SNE of training features: {chosen_head.size} neighbouring head classes (dots)\n"
                 f"and the {chosen_tail.size} tail classes nearest to them (triangles)")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _neighbour_classes(centres, is_head, num_head, num_tail, seed):
    """Indices of a random head class and its num_head - 1 nearest head classes (by centre
    cosine), and of the num_tail tail classes nearest to the mean centre of those."""
    rng = np.random.default_rng(seed)
    head_ids, tail_ids = np.flatnonzero(is_head), np.flatnonzero(~is_head)
    if head_ids.size and num_head:
        anchor = centres[rng.choice(head_ids)]
        chosen_head = head_ids[np.argsort(-(centres[head_ids] @ anchor), kind="stable")[:num_head]]
        hub = centres[chosen_head].mean(axis=0)
    else:
        chosen_head = head_ids[:0]
        hub = centres[rng.choice(tail_ids)] if tail_ids.size else centres[0]
    chosen_tail = tail_ids[np.argsort(-(centres[tail_ids] @ hub), kind="stable")[:num_tail]]
    return chosen_head, chosen_tail
