"""Shift benchmark: clean, ImageNet-C (on disk or generated), -R, -Sketch, -A, -V2, PGD, probe, zero-shot.

Scores train_teacher.py / distill_partial.py checkpoints and timm models side by side: top-1 per set,
mCE / relative mCE, robust accuracy under PGD, linear-probe transfer and CLIP zero-shot accuracy.

    python evaluate.py --checkpoint runs/teacher/best.pt runs/student/best.pt --head all \\
        --data-dir /data/imagenet --data-root /data --shifts clean,c,r,sketch,a,v2 --output runs/eval
    torchrun --nproc_per_node=8 evaluate.py ...          # same flags; every image is counted exactly once
    python evaluate.py --dataset fashion-mnist --checkpoint runs/teacher/best.pt runs/student/best.pt \\
        --shifts clean,c --generate-c --test-subset 1000 -j 0 --output runs/eval     # CPU smoke, minutes

Sets under --data-root (docs/DESIGN.md section 6): imagenet-c/<corruption>/<severity>/<wnid>/, imagenet-r/<wnid>/,
imagenet-sketch/<wnid>/ (or imagenet-sketch/sketch/<wnid>/), imagenet-a/<wnid>/, imagenetv2/<0..999>/.
The clean set is --data-dir/val (else --data-root/imagenet/val) or the Fashion-MNIST test split.

Metrics (Hendrycks & Dietterich, ICLR 2019): top-1 per set; with E(s,c) the error at severity s of
corruption c, CE_c = sum_s E(s,c) / sum_s E_ref(s,c), mCE = 100 * mean_c CE_c, and relative
CE_c = sum_s (E(s,c) - E_clean) / sum_s (E_ref(s,c) - E_ref_clean). The reference is AlexNet (docs/REFERENCE.md)
for 1000-class ImageNet, else --baseline (default: the first model). The 4 extra corruptions never enter
mCE; "extra acc" reports them apart.

Choices worth knowing:
- A batch is read once and scored by every model; images are prepared with the first model's eval
  transform and each model's wrapper resizes to its own size. On-disk ImageNet-C is read as is (224 px).
- --generate-c corrupts block k (the k-th run of SEED_BLOCK = 250 consecutive images) with seed
  corruption_seed(seed, name, severity, k): every model, any -b and any number of processes see the same
  images. The models run on -b images of a block at a time; MC-dropout masks and PGD starts are seeded
  per block too and drawn batch by batch (so those two depend on -b when it is under 250).
- PGD attacks each column's answer in fp32 and eval mode; for a student's --head auto, the selected
  head's log-probabilities (no MC dropout during the attack).
- Probe / zero-shot features: a student's head input (clean: frozen tail; robust, combined, auto: branch),
  a plain model's pre-logits features. The zero-shot image embedding is those features when their width
  is the text matrix's (CLIP towers built with num_classes=0), else the model output (a timm CLIP tower
  whose head is the projection). "<name>:zeroshot" uses the frozen path, "<name>:zeroshot-branch" the branch.
- Columns: <name> (--name, else <folder>/<stem> or the timm name), <name>:<head> with --head all,
  <name>@wise<alpha> with --wise-alpha (the student's branch and heads interpolated, no retraining).
- Numbers are cached per (column, set, corruption, severity) in --output/cache, keyed by everything they
  depend on (checkpoint path, mtime and size, head, MC samples, subset, seed, ...): a rerun resumes.
- Routing diagnostics of a student's auto head, per set (clean, each corruption and severity, pooled per
  severity): each head's top-1, the auto head's, the oracle's (any head right) and the share of images
  sent to each head: whether head selection works on your data (results.json "routing", routing.md).
Writes --output/{results.json, routing.md, acc_vs_severity.png, wise_sweep.png}; prints a markdown table (and
the routing tables) and a last line `final: {json}`.
"""
import argparse
import functools
import hashlib
import inspect
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import (CORRUPTIONS, EXTRA_CORRUPTIONS, FROST_FILES, ImageFolderSafe, UserError, Views, add_data_args, augmix,
                  check_data_args, check_image_folder, check_readable, class_names, corrupt, fashion_mnist,
                  image_transforms, make_loader, native_size, shift_labels, subset, timm_info, to_float)
from train_teacher import (Normalized, all_sum, amp_setup, check_class_names, check_writable, create_model, fraction,
                           load_checkpoint, load_model, model_data_config, parse_kwargs, pgd_attack, progress,
                           run_main, setup_distributed, write_atomic)
from train_teacher import add_device_arg  # own line: eases merging the import above

SHIFTS = ("clean", "c", "r", "sketch", "a", "v2", "augmix")
SHIFT_DIRS = {"c": "imagenet-c", "r": "imagenet-r", "sketch": "imagenet-sketch", "a": "imagenet-a", "v2": "imagenetv2"}
# AlexNet top-1 error per corruption, averaged over the 5 severities (Hendrycks & Dietterich 2019; docs/REFERENCE.md)
ALEXNET_ERR = {"gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
               "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
               "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
               "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500}
ALEXNET_CLEAN_ERR = 0.4348
# routing diagnostics of a student's auto head, counted per set next to its top-1
ROUTE_FIELDS = ("to_clean", "to_robust", "to_combined", "clean", "robust", "combined", "oracle")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)  # here --train-subset / --val-subset limit the --probe-data splits
    p.add_argument("--test-subset", type=int, default=0, help="score a fixed random subset of N images per set")
    p.add_argument("--split", default="test", choices=["test", "val"], help="fashion-mnist: the test split (the "
                   "benchmark) or val (5k held-out training images: tune defaults there, never on test)")
    p.add_argument("--data-root", default=None, help="folder holding the shift sets (imagenet-c/, imagenet-r/, ...)")
    p.add_argument("--output", default="runs/eval", help="folder for results.json, plots and cache/")
    p.add_argument("--checkpoint", action="extend", nargs="+", default=[],
                   help="train_teacher.py or distill_partial.py checkpoints")
    p.add_argument("--model", action="extend", nargs="+", default=[], help="timm model names")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="--model: timm kwargs")
    p.add_argument("--pretrained", action="store_true", help="--model: timm's hub weights")
    p.add_argument("--pretrained-file", default=None, help="--model: local .pth/.safetensors weights")
    p.add_argument("--base-file", default=None, help="delta checkpoints: the student's base weights, if moved")
    p.add_argument("--num-classes", type=int, default=None, help="--model head size (default: the dataset's); another "
                   "value (e.g. 0 or a CLIP tower's 512) leaves only its zero-shot column")
    p.add_argument("--name", action="extend", nargs="+", default=[], help="labels: checkpoints first, then models")
    p.add_argument("--head", default="auto", choices=["auto", "clean", "robust", "combined", "all"],
                   help="delta checkpoints: the head to score ('all': one column per head plus auto)")
    p.add_argument("--mc-samples", type=int, default=None, help="delta checkpoints: MC-dropout passes of the branch "
                   "(default: those its tau was calibrated with)")
    p.add_argument("--wise-alpha", default=None, help="delta checkpoints: WiSE-FT alphas, e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--shifts", default="clean,c", help=f"sets to score, from {','.join(SHIFTS)}")
    p.add_argument("--generate-c", action="store_true", help="corrupt the clean set on the fly with data.corrupt")
    p.add_argument("--augmix-severity", type=int, default=6, help="--shifts augmix: the clean set under AugMix views "
                   "of this severity (the training augmentation on held-out images: did the branch learn it?)")
    p.add_argument("--corruptions", default="default", help="names, or default (the 15 of mCE), extra (the 4), all")
    p.add_argument("--severities", default="1,2,3,4,5", help="corruption severities")
    p.add_argument("--frost-dir", default=None, help="folder with ImageNet-C's frost images (else procedural frost)")
    p.add_argument("--baseline", default=None, help="model whose errors normalise 'mCE vs' (default: the first)")
    p.add_argument("--attack", default="none", choices=["none", "pgd"], help="robust accuracy on the clean set")
    p.add_argument("--attack-eps", type=fraction, default=4 / 255, help="PGD radius in [0,1] pixel units")
    p.add_argument("--attack-step", type=fraction, default=1 / 255, help="PGD step size in [0,1] pixel units")
    p.add_argument("--attack-steps", type=int, default=10, help="PGD iterations")
    p.add_argument("--attack-norm", default="linf", choices=["linf", "l2"], help="PGD threat model")
    p.add_argument("--probe-data", default=None, help="ImageFolder root with train/ and val/ for a linear probe")
    p.add_argument("--probe-wd", type=float, default=1e-4, help="linear-probe L2 weight decay")
    p.add_argument("--probe-steps", type=int, default=200, help="linear-probe L-BFGS iterations")
    p.add_argument("--zeroshot-head", default=None, help="torch or .npy file with a [C, D] class text-embedding matrix")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (PGD stays fp32)")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"], help="autocast dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of subsets, generated corruptions, MC dropout, PGD starts")
    add_device_arg(p)
    return p


# ----------------------------------------------------------------------------- metrics

def _severity_mean(values, severities):
    """Mean over severities of {severity: err}, a list, or one number already averaged (AlexNet's table)."""
    if isinstance(values, dict):
        values = [values[s] for s in severities]
    elif not isinstance(values, (list, tuple)):
        return float(values)
    return sum(values) / len(values)


def _ce_terms(errors, corruptions):
    """Sorted unique mCE corruptions (never the extra ones), each with the severities it was scored at."""
    names = sorted({c for c in corruptions if c not in EXTRA_CORRUPTIONS})
    return [(c, list(errors[c]) if isinstance(errors[c], dict) else None) for c in names]


def mce(errors, reference_errors, corruptions):
    """Mean corruption error, %: 100 * mean_c sum_s E(s,c) / sum_s E_ref(s,c) (Hendrycks & Dietterich 2019).

    errors[c]: errors in [0, 1], {severity: err} or a list; reference_errors[c]: the same, or one number
    averaged over the severities (AlexNet's table: sum_s E = 5 * avg). Keyed by name: the order of
    `corruptions` does not matter. The 4 extra corruptions are skipped."""
    ce = [_severity_mean(errors[c], s) / _severity_mean(reference_errors[c], s)
          for c, s in _ce_terms(errors, corruptions)]
    return 100 * sum(ce) / len(ce)


def relative_mce(errors, clean_err, reference_errors, reference_clean_err, corruptions):
    """Relative mCE, %: 100 * mean_c sum_s (E(s,c) - E_clean) / sum_s (E_ref(s,c) - E_ref_clean).
    ZeroDivisionError when a corruption leaves the reference's error unchanged (the ratio is undefined)."""
    ce = []
    for c, s in _ce_terms(errors, corruptions):
        den = _severity_mean(reference_errors[c], s) - reference_clean_err
        if abs(den) < 1e-9:
            raise ZeroDivisionError(f"{c}: the reference's error does not change under this corruption")
        ce.append((_severity_mean(errors[c], s) - clean_err) / den)
    return 100 * sum(ce) / len(ce)


# ----------------------------------------------------------------------------- label spaces and paths

def shift_dir(data_root, shift):
    path = os.path.join(data_root, SHIFT_DIRS[shift])
    nested = os.path.join(path, "sketch")  # the Kaggle/HF release unpacks to imagenet-sketch/sketch/<wnid>
    return nested if shift == "sketch" and os.path.isdir(nested) else path


def clean_dir(args):
    if args.data_dir:
        return os.path.join(args.data_dir, "val")
    if args.data_root and os.path.isdir(os.path.join(args.data_root, "imagenet", "val")):
        return os.path.join(args.data_root, "imagenet", "val")
    return None


def split_list(text, flag, cast=str):
    try:
        return [cast(t.strip()) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


def check_args(args):
    """Mistakes a user can make, caught before any model or image is loaded. Returns the parsed lists."""
    check_data_args(args)
    check_writable(args.output)
    parse_kwargs(args.model_kwargs)
    shifts = split_list(args.shifts, "--shifts")
    bad = [s for s in shifts if s not in SHIFTS] or ([""] if not shifts else [])
    if bad:
        raise UserError(f"--shifts: unknown set {bad[0]!r}; choose from {','.join(SHIFTS)}")
    if not args.checkpoint and not args.model:
        raise UserError("no model given; pass --checkpoint PATH (train_teacher.py, distill_partial.py) or --model NAME")
    for flag, path in (("--base-file", args.base_file), ("--zeroshot-head", args.zeroshot_head)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag}: file {path} does not exist")  # --checkpoint / --pretrained-file: checked on load
    known = CORRUPTIONS + EXTRA_CORRUPTIONS
    groups = {"default": CORRUPTIONS, "extra": EXTRA_CORRUPTIONS, "all": known}
    corruptions = [c for t in split_list(args.corruptions, "--corruptions") for c in groups.get(t, [t])]
    corruptions = list(dict.fromkeys(corruptions))
    for c in corruptions:
        if c not in known:
            raise UserError(f"--corruptions: unknown corruption {c!r}; use {', '.join(known)}, default, extra or all")
    if not corruptions and "c" in shifts:
        raise UserError(f"--corruptions {args.corruptions!r} names none; give names, default, extra or all")
    severities = sorted(set(split_list(args.severities, "--severities", int)))
    if not severities or not set(severities) <= {1, 2, 3, 4, 5}:
        raise UserError(f"--severities {args.severities!r}: ImageNet-C has severities 1 to 5")
    alphas = split_list(args.wise_alpha, "--wise-alpha", float) if args.wise_alpha else []
    if any(not 0 <= a <= 1 for a in alphas):
        raise UserError("--wise-alpha: each alpha must lie in [0, 1] (0: the original model, 1: the tuned one)")
    imagenet_sets = [s for s in shifts if s in ("r", "sketch", "a", "v2")]
    if args.dataset == "fashion-mnist" and imagenet_sets:
        raise UserError(f"--shifts {imagenet_sets[0]} is an ImageNet set; with --dataset fashion-mnist use clean and c")
    if "augmix" in shifts and not 1 <= args.augmix_severity <= 10:
        raise UserError(f"--augmix-severity {args.augmix_severity}: AugMix severities run from 1 to 10")
    if args.dataset == "fashion-mnist" and "c" in shifts and not args.generate_c:
        raise UserError("--shifts c with --dataset fashion-mnist needs --generate-c (no Fashion-MNIST-C on disk)")
    on_disk = [s for s in shifts if s in SHIFT_DIRS and not (s == "c" and args.generate_c)]
    if on_disk and not args.data_root:
        raise UserError(f"--shifts {on_disk[0]} needs --data-root, the folder that holds {SHIFT_DIRS[on_disk[0]]}/")
    for s in on_disk:
        folders = [shift_dir(args.data_root, s)]
        folders += [os.path.join(folders[0], c, str(v)) for c in corruptions for v in severities] if s == "c" else []
        for path in folders:
            if not os.path.isdir(path):
                raise UserError(f"--data-root: {path} does not exist (needed by --shifts {s}); see the layouts in "
                                f"evaluate.py's docstring" + (", or add --generate-c" if s == "c" else ""))
    needs_clean = bool({"clean", "augmix"} & set(shifts)) or ("c" in shifts and args.generate_c) or args.attack != "none"
    if needs_clean and args.dataset == "folder" and not os.path.isdir(clean_dir(args) or ""):
        raise UserError(f"the clean set {clean_dir(args) or ''} is missing; pass --data-dir (an ImageFolder root with "
                        f"val/) or --data-root with imagenet/val/")
    if args.attack != "none" and args.attack_norm == "linf" and max(args.attack_eps, args.attack_step) > 0.5:
        raise UserError(f"--attack-eps {args.attack_eps:g} / --attack-step {args.attack_step:g} look like 0-255 units; "
                        f"give them in [0, 1], e.g. --attack-eps 4/255 --attack-step 1/255")
    if args.attack != "none" and (args.attack_eps < 0 or args.attack_steps < 1):
        raise UserError("--attack pgd needs --attack-eps >= 0 and --attack-steps >= 1")
    if args.probe_data and not all(os.path.isdir(os.path.join(args.probe_data, s)) for s in ("train", "val")):
        raise UserError(f"--probe-data: {args.probe_data} needs train/ and val/ ImageFolder trees")
    if args.frost_dir and not os.path.isdir(args.frost_dir):
        raise UserError(f"--frost-dir: folder {args.frost_dir} does not exist")
    if args.frost_dir and not any(os.path.isfile(os.path.join(args.frost_dir, f)) for f in FROST_FILES):
        raise UserError(f"--frost-dir: {args.frost_dir} holds none of {', '.join(FROST_FILES)} (ImageNet-C's frost "
                        f"images); point it at them, or leave it out for the procedural frost")
    if args.mc_samples is not None and args.mc_samples < 1:
        raise UserError(f"--mc-samples {args.mc_samples}: give at least 1 pass")
    if args.pretrained and args.pretrained_file:
        raise UserError("--pretrained and --pretrained-file both given; keep one")
    return shifts, corruptions, severities, alphas


# ----------------------------------------------------------------------------- models

@dataclass
class Column:
    """One row of the results table: images in [0, 1] -> logits; the features a linear probe reads (None:
    no probe); `ident`, everything its numbers depend on (the cache key); what PGD differentiates (None:
    no gradient path, not attacked)."""
    name: str
    logits: Callable
    features: Callable | None
    ident: dict
    family: str
    info: dict = field(default_factory=dict)
    attack: Callable | None = None
    route: Callable | None = None       # a student's auto head: x -> (choice [B], [clean, robust, combined] logits)

    @property
    def n_counts(self):
        """Numbers counted per set: correct; with `route` also routed to each head, each head correct, oracle."""
        return 1 if self.route is None else 1 + len(ROUTE_FIELDS)


def file_ident(path):
    if not path:
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def listing_ident(folder):
    """A cheap fingerprint of an image folder's listing: the modification times of it and its class folders
    (which change when a file is added, removed or renamed in)."""
    h = hashlib.sha1(str(os.stat(folder).st_mtime_ns).encode())
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            h.update(f"{entry.name}:{entry.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def model_names(args):
    """--name labels, else <parent folder>/<stem> of a checkpoint or the timm name, made unique."""
    sources = args.checkpoint + args.model
    if len(args.name) > len(sources):
        raise UserError(f"--name: {len(args.name)} names for {len(sources)} models")
    names = list(args.name)
    for src in sources[len(names):]:
        stem = os.path.splitext(os.path.basename(src))[0]
        base = f"{os.path.basename(os.path.dirname(os.path.abspath(src)))}/{stem}" if src in args.checkpoint else src
        name, k = base, 2
        while name in names or name in args.name:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    if len(set(names)) < len(names):
        raise UserError("--name: model names must be unique")
    return names


def pre_logits(net, x):
    """A timm model's pre-logits features (its classifier's input) for images in [0, 1]."""
    return net.model.forward_head(net.model.forward_features(net.normalize(x)), pre_logits=True)


def zeroshot_logits(image_features, text_embeddings):
    """CLIP zero-shot logits (Radford et al. 2021): 100 * cos(image embedding, class text embedding), [B, C]."""
    return 100 * F.normalize(image_features.float(), dim=-1) @ F.normalize(text_embeddings.float(), dim=-1).T


def load_text_embeddings(path, n_classes):
    """The [C, D] class text-embedding matrix of --zeroshot-head (.npy, or a torch file with one tensor)."""
    try:
        w = torch.from_numpy(np.load(path)) if path.endswith(".npy") else torch.load(path, "cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--zeroshot-head: {path} is not a readable .npy or torch file ({type(e).__name__})") from None
    if isinstance(w, dict) and sum(torch.is_tensor(v) for v in w.values()) == 1:
        w = next(v for v in w.values() if torch.is_tensor(v))
    if not torch.is_tensor(w) or w.dim() != 2 or len(w) != n_classes:
        raise UserError(f"--zeroshot-head: {path} must hold one [C, D] tensor with C = {n_classes} classes")
    return w.float()


def width(fn, size, device):
    with torch.no_grad():
        return fn(torch.full((2, 3, *size), 0.5, device=device)).shape[-1]


def zeroshot_column(name, embeddings, text, size, device, ident, family, features=None, alpha=None):
    """Zero-shot column from the first candidate image embedding whose width is the text matrix's."""
    widths = [width(fn, size, device) for fn in embeddings]
    if text.shape[1] not in widths:
        raise UserError(f"--zeroshot-head: its [{text.shape[0]}, {text.shape[1]}] matrix does not fit {family}, whose "
                        f"features / outputs are {' / '.join(map(str, widths))} wide")
    i = widths.index(text.shape[1])
    return Column(name, lambda x: zeroshot_logits(embeddings[i](x), text), features, ident, family,
                  {"kind": "zeroshot", "embedding": ["features", "output"][i], "alpha": alpha})


def last_batch(fn):
    """fn, remembering its answer for the last input tensor: the columns of one student (its heads)
    then share a single forward pass per batch."""
    memo = {}

    def cached_fn(x):
        if memo.get("x") is not x:   # holding x keeps its identity from being reused by a new batch
            memo["x"], memo["out"] = x, fn(x)
        return memo["out"]
    return cached_fn


def student_columns(path, name, args, alphas, text, classes, space, device):
    """Columns of a distill_partial.py delta checkpoint: one per head (--head all: clean, robust, combined,
    auto) of the student as trained or of each WiSE-FT interpolation; plus its zero-shot columns."""
    from distill_partial import HEADS, answer, load_student, predict, select_head, wise_ft
    student, ckpt = load_student(path, args.base_file, "--checkpoint")
    if ckpt["num_classes"] != len(classes):
        raise UserError(f"{path} predicts {ckpt['num_classes']} classes but {space} has {len(classes)}; "
                        f"evaluate each model on its own label space")
    check_class_names(ckpt, classes, "--checkpoint", path, space, "evaluate it on its own classes")
    student = student.to(device).eval().requires_grad_(False)
    size, heads = ckpt["data_config"]["input_size"][-2:], ["clean", "robust", "combined", "auto"]
    heads = heads if args.head == "all" else [args.head]
    mc = args.mc_samples or ckpt.get("args", {}).get("mc_samples", 1)
    ident = {"name": name, "file": file_ident(path), "base": file_ident(args.base_file), "mc_samples": mc}
    zs = dict(ident, zeroshot=file_ident(args.zeroshot_head))
    cols = [] if text is None else [zeroshot_column(  # the frozen path: the same for every alpha
        f"{name}:zeroshot", [functools.partial(student.features, head="clean"), lambda x: student(x)[0]], text, size,
        device, dict(zs, path="frozen"), name)]
    for alpha in alphas or [None]:
        s = student if alpha is None else wise_ft(student, alpha)
        vname = name if alpha is None else f"{name}@wise{alpha:g}"
        heads_of = last_batch(functools.partial(s, mc_samples=mc))   # one forward for all heads

        def route(x, s=s, heads_of=heads_of):
            out = heads_of(x)
            return select_head(*out, s.tau)[1], [answer(*out, h, s.tau) for h in HEADS]
        for h in heads:
            cols.append(Column(vname if len(heads) == 1 else f"{vname}:{h}",
                               lambda x, s=s, h=h, heads_of=heads_of: answer(*heads_of(x), h, s.tau),
                               functools.partial(s.features, head="robust" if h == "auto" else h),
                               dict(ident, head=h, alpha=alpha), name,
                               dict(kind="delta", head=h, alpha=alpha, tau=s.tau, mc_samples=mc),
                               functools.partial(predict, s, head=h, grad=True), route if h == "auto" else None))
        if text is not None:
            cols.append(zeroshot_column(f"{vname}:zeroshot-branch", [functools.partial(s.features, head="robust"),
                                        lambda x, s=s: s(x)[1]], text, size, device,
                                        dict(zs, path="branch", alpha=alpha), name, alpha=alpha))
    return cols, ckpt["data_config"]


def load_columns(args, alphas, classes, space, device):
    """Every column, on `device` in eval mode with frozen parameters; and the first model's data config."""
    n_classes = len(classes)
    names = model_names(args)
    kinds = [load_checkpoint(p, "--checkpoint").get("kind") for p in args.checkpoint] + ["timm"] * len(args.model)
    if alphas and "delta" not in kinds:
        raise UserError(f"--wise-alpha needs a distill_partial.py (delta) checkpoint; these are "
                        f"{', '.join(sorted(set(kinds)))} models, with no branch to interpolate")
    text = load_text_embeddings(args.zeroshot_head, n_classes).to(device) if args.zeroshot_head else None
    cols, configs = [], []
    for src, name, kind in zip(args.checkpoint + args.model, names, kinds):
        if kind == "delta":
            new, cfg = student_columns(src, name, args, alphas, text, classes, space, device)
            cols, configs = cols + new, configs + [cfg]
            continue
        if kind == "model":
            net, ckpt = load_model(src)
            if ckpt["num_classes"] == n_classes:   # another count: refused below with the widths
                check_class_names(ckpt, classes, "--checkpoint", src, space, "evaluate it on its own classes")
            cfg, ident = ckpt["data_config"], {"name": name, "file": file_ident(src)}
        elif kind == "timm":
            kwargs, n = parse_kwargs(args.model_kwargs), n_classes if args.num_classes is None else args.num_classes
            # without weights: the same random init on every rank, in every run, wherever it stands in the list
            torch.manual_seed(args.seed)
            model = create_model(src, n, args.pretrained, args.pretrained_file, kwargs, arch_flag="--model")
            cfg = model_data_config(model, args.img_size or native_size(args.dataset))
            net = Normalized(model, cfg)
            ident = dict(name=name, arch=src, pretrained=args.pretrained, kwargs=kwargs, classes=n, seed=args.seed,
                         file=file_ident(args.pretrained_file), data_config=cfg)
        else:
            raise UserError(f"--checkpoint: {src} is a {kind} checkpoint; give one of train_teacher/distill_partial.py")
        net = net.to(device).eval().requires_grad_(False)
        configs.append(cfg)
        size, feats = cfg["input_size"][-2:], functools.partial(pre_logits, net)
        classify = width(net, size, device) == n_classes
        if classify:
            cols.append(Column(name, net, feats, ident, name, {"kind": kind}, net))
        elif kind == "model" or text is None:
            raise UserError(f"{src} predicts {width(net, size, device)} classes but {space} has {n_classes}; "
                            f"evaluate each model on its own label space")
        if text is not None:  # a feature tower without classifier: its zero-shot column gets the probe
            zs = zeroshot_column(f"{name}:zeroshot", [feats, net], text, size, device, dict(
                ident, zeroshot=file_ident(args.zeroshot_head)), name, None if classify else feats)
            zs.attack = zs.logits  # differentiable end to end
            cols.append(zs)
    if len({c.name for c in cols}) < len(cols):
        raise UserError("--name: the result columns must have unique names")
    return cols, configs[0]


# ----------------------------------------------------------------------------- sets and scoring

@dataclass
class Task:
    """One cached unit of work: a set (and corruption, severity) scored for every column."""
    set: str
    dataset: Callable                   # () -> Dataset of (image in [0, 1], label)
    corruption: str | None = None
    severity: int | None = None
    generated: bool = False             # corrupt the images on the fly
    columns: list | None = None         # the logit columns a 200-class set is scored on (-R, -A)
    source: str = ""


# Evaluation reads blocks of SEED_BLOCK consecutive images and seeds each block's corruption (and MC dropout,
# PGD starts) by its index: generated images do not depend on -b, nor on the number of processes.
SEED_BLOCK = 250


def corruption_seed(seed, *parts):
    """A stable 31-bit seed for (seed, *parts), e.g. (corruption, severity, block); hash() is salted per process."""
    return zlib.crc32(json.dumps([seed, *parts]).encode()) & 0x7FFFFFFF


def make_tasks(args, shifts, corruptions, severities, classes, eval_tf):
    """The tasks in evaluation order; a dataset is built only when its task is not cached."""
    n, seed, tf = args.test_subset, args.seed, Views(eval_tf)
    to_label = {c: i for i, c in enumerate(classes)}

    @functools.cache
    def clean():
        ds = (fashion_mnist(args.split, args.data_dir, tf) if args.dataset == "fashion-mnist"
              else ImageFolderSafe(clean_dir(args), tf, to_label, "--data-dir"))
        check_readable(ds, "--data-dir")
        return subset(ds, n, seed)

    def readable(ds):
        check_readable(ds, "--data-root")
        return ds

    def folder(path, labels, transform=tf):
        return lambda: subset(readable(ImageFolderSafe(path, transform, labels, "--data-root")), n, seed)

    clean_src = f"fashion-mnist {args.split}" if args.dataset == "fashion-mnist" else os.path.abspath(clean_dir(args) or "")
    tasks = [Task("clean", clean, source=clean_src)] if "clean" in shifts else []
    for c in corruptions if "c" in shifts else []:
        for sev in severities:
            if args.generate_c:
                tasks.append(Task("c", clean, c, sev, generated=True, source=clean_src))
            else:  # the released files are 224 px already: to_float only, no second resize
                path = os.path.join(shift_dir(args.data_root, "c"), c, str(sev))
                tasks.append(Task("c", folder(path, to_label, to_float), c, sev, source=os.path.abspath(path)))
    for s in [s for s in shifts if s in ("r", "sketch", "a", "v2")]:
        labels, columns = shift_labels(s)
        path = shift_dir(args.data_root, s)
        tasks.append(Task(s, folder(path, labels), columns=columns, source=os.path.abspath(path)))
    if "augmix" in shifts:   # the views the method trains on, with the default (ImageNet-C-free) op set
        tasks.append(Task("augmix", clean, "augmix", args.augmix_severity, generated=True, source=clean_src))
    return tasks + ([Task("pgd", clean, source=clean_src)] if args.attack == "pgd" else [])


def augmix_shift(x, severity, seed):
    """One AugMix view (data.augmix, its default op set) of each image of a float batch in [0, 1], seeded."""
    aug, state = augmix(severity), torch.get_rng_state()
    torch.manual_seed(seed)   # torchvision's AugMix draws from the global generator
    views = torch.stack([to_float(aug(img)) for img in x.mul(255).round().to(torch.uint8).cpu()]).to(x.device)
    torch.set_rng_state(state)
    return views


def score(cols, loader, task, device, autocast, seed, frost_dir, attack, rank, world, batch_size):
    """[counts of column 0..., counts of column 1..., ..., total] over one task, summed over ranks: per column
    the correct answers and, for a routed column, the ROUTE_FIELDS counts. The loader gives blocks of
    SEED_BLOCK images, each corrupted with its own seed; the models see batch_size of them at a time."""
    counts = [torch.zeros(c.n_counts, dtype=torch.long, device=device) for c in cols]   # no wait per batch
    total, t0 = 0, time.time()
    restrict = torch.tensor(task.columns, device=device) if task.columns else None
    pick = (lambda z: z[:, restrict]) if restrict is not None else (lambda z: z)
    bar = progress(loader, rank, " ".join(str(p) for p in (task.set, task.corruption, task.severity) if p))
    for i, batch in enumerate(bar):
        if batch is None:
            continue
        block = rank + i * world
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if task.set == "augmix":
            x = augmix_shift(x, task.severity, corruption_seed(seed, task.corruption, task.severity, block))
        elif task.generated:
            x = corrupt(x, task.corruption, task.severity, corruption_seed(seed, task.corruption, task.severity, block),
                        frost_dir)
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]   # one view: columns share its forward
            for j, col in enumerate(cols):
                # MC dropout and PGD starts draw the same numbers whichever other columns run (the first
                # batch of a block keeps the block's seed: a -b of 250 or more draws as one batch always did)
                torch.manual_seed(corruption_seed(seed, task.set, task.corruption, task.severity, block,
                                                  *([start] if start else [])))
                xj = pgd_attack(col.attack, xb, yb, **attack) if task.set == "pgd" else xb
                with torch.no_grad(), autocast():
                    got = [(pick(col.logits(xj)).argmax(1) == yb).sum()]
                    if col.route is not None:
                        choice, heads = col.route(xj)
                        ok = torch.stack([pick(z).argmax(1) == yb for z in heads])
                        got += [(choice == h).sum() for h in range(len(heads))] + list(ok.sum(1)) + [ok.any(0).sum()]
                counts[j] += torch.stack(got)
        total += len(y)
        bar.set_postfix(img_s=f"{total * world / (time.time() - t0):.0f}")
    return all_sum([v for c in counts for v in c.tolist()] + [total], device)


# ----------------------------------------------------------------------------- cache

def cached(folder, keys, sizes, compute, rank, device):
    """(counts, total) per key, counts a tuple of sizes[i] numbers. Rank 0 reads the cache and shares what it
    found, so every rank skips the same work (also where only rank 0 sees the folder); compute(missing indices)
    fills the rest, which rank 0 writes atomically: a killed run leaves no broken entry and resumes where it
    stopped."""
    paths = [os.path.join(folder, hashlib.sha1(json.dumps(k, sort_keys=True).encode()).hexdigest()[:24] + ".json")
             for k in keys]
    flat = []
    for path, size in zip(paths, sizes):
        hit = None
        if rank == 0 and os.path.isfile(path):
            with open(path) as f:
                hit = json.load(f)
            hit = hit if len(hit.get("counts", [])) == size else None   # an entry of another format: recount
        flat += [1, *hit["counts"], hit["total"]] if hit else [0] * (size + 2)
    flat = all_sum(flat if rank == 0 else [0] * len(flat), device)
    hits, at = [], 0
    for size in sizes:
        entry, at = flat[at:at + size + 2], at + size + 2
        hits.append((tuple(int(v) for v in entry[1:-1]), int(entry[-1])) if entry[0] else None)
    todo = [i for i, h in enumerate(hits) if h is None]
    for i, hit in zip(todo, compute(todo) if todo else []):
        hits[i] = hit
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
            # under a unique temporary name: two runs may share a cache
            write_atomic(paths[i], json.dumps({"key": keys[i], "counts": list(hit[0]), "total": hit[1]}))
    return hits


def evaluate_tasks(tasks, cols, args, cfg, device, rank, world):
    """counts[(column, set, corruption, severity)] = (correct, total), and routing[same key] = (ROUTE_FIELDS
    counts, total) for the routed columns, from the cache where possible."""
    autocast, _ = amp_setup(device, args.amp, args.amp_dtype)
    fp32, _ = amp_setup(device, False, args.amp_dtype)
    frost = "procedural" if not args.frost_dir else os.path.abspath(args.frost_dir)
    corrupt_code = file_ident(inspect.getsourcefile(corrupt))  # edited corruptions never reuse old numbers
    attack = dict(eps=args.attack_eps, step_size=args.attack_step, steps=args.attack_steps, norm=args.attack_norm)
    counts, routing = {}, {}
    for task in tasks:
        task_cols = [c for c in cols if task.set != "pgd" or c.attack is not None]
        key = dict(set=task.set, corruption=task.corruption, severity=task.severity, source=task.source,
                   seed=args.seed, subset=args.test_subset, generated=task.generated, data_config=cfg,
                   amp=[args.amp and device.type == "cuda", args.amp_dtype], frost=frost if task.generated else None,
                   code=corrupt_code if task.generated else None,
                   attack=attack if task.set == "pgd" else None,
                   block=SEED_BLOCK if task.generated or task.set == "pgd" else None)  # per-block seeds
        if os.path.isdir(task.source):   # images added or replaced on disk are scored anew
            key["listing"] = listing_ident(task.source)

        def compute(todo):
            loader = make_loader(task.dataset(), SEED_BLOCK, args.workers, False, rank, world,
                                 pin=device.type == "cuda")
            todo_cols = [task_cols[i] for i in todo]
            got = score(todo_cols, loader, task, device, fp32 if task.set == "pgd" else autocast, args.seed,
                        args.frost_dir, attack, rank, world, args.batch_size)
            if got[-1] == 0:
                raise UserError(f"no readable image in {task.source or task.set}: every one was skipped; replace "
                                f"the broken files")
            out, at = [], 0
            for c in todo_cols:
                out.append((tuple(int(v) for v in got[at:at + c.n_counts]), int(got[-1])))
                at += c.n_counts
            return out

        draws = lambda c: task.set == "pgd" or c.ident.get("mc_samples", 1) > 1   # drawn per batch of -b
        keys = [dict(c.ident, task=key, **({"batch": min(args.batch_size, SEED_BLOCK)} if draws(c) else {}))
                for c in task_cols]
        hits = cached(os.path.join(args.output, "cache"), keys,
                      [c.n_counts for c in task_cols], compute, rank, device)
        for c, (got, n) in zip(task_cols, hits):
            counts[(c.name, task.set, task.corruption, task.severity)] = (got[0], n)
            if c.route is not None:
                routing[(c.name, task.set, task.corruption, task.severity)] = (got, n)   # auto + ROUTE_FIELDS
    return counts, routing


# ----------------------------------------------------------------------------- transfer

def linear_probe(train_x, train_y, val_x, val_y, num_classes, weight_decay=1e-4, steps=200):
    """Fixed-feature transfer (Salman et al. 2020): val accuracy (%) of a logistic regression fitted by
    full-batch L-BFGS on standardised frozen features, with L2 penalty weight_decay / 2 * |W|^2."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xt, xv = (train_x - mean) / std, (val_x - mean) / std
    w = torch.zeros(xt.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, train_y) + weight_decay / 2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100.0 * (xv @ w + b).argmax(1).eq(val_y).float().mean().item()


@torch.no_grad()
def extract(fn, dataset, args, device, autocast, rank, world, desc):
    """Features and labels of a whole dataset, gathered from every rank in the single-process order."""
    blocks = []
    loader = make_loader(dataset, args.batch_size, args.workers, False, rank, world, pin=device.type == "cuda")
    for i, batch in enumerate(progress(loader, rank, desc)):
        if batch is not None:
            with autocast():
                blocks.append((rank + i * world, fn(batch[0].to(device)).float().cpu(), batch[1]))
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, blocks)
        blocks = [b for r in everyone for b in r]
    blocks.sort(key=lambda b: b[0])
    return torch.cat([b[1] for b in blocks]), torch.cat([b[2] for b in blocks])


def probe_all(cols, args, cfg, device, rank, world):
    """Linear-probe val accuracy per column that has features: counts[(column, 'probe', None, None)]."""
    autocast, _ = amp_setup(device, args.amp, args.amp_dtype)
    tf = Views(image_transforms("folder", cfg)[1])
    train_set = ImageFolderSafe(os.path.join(args.probe_data, "train"), tf, flag="--probe-data")
    val_set = ImageFolderSafe(os.path.join(args.probe_data, "val"), tf, train_set.class_to_idx, "--probe-data")
    n_classes = len(train_set.classes)
    train_set, val_set = subset(train_set, args.train_subset, args.seed), subset(val_set, args.val_subset, args.seed)
    probe_cols = [c for c in cols if c.features is not None]
    key = dict(task="probe", source=os.path.abspath(args.probe_data), wd=args.probe_wd, steps=args.probe_steps,
               subsets=[args.train_subset, args.val_subset], seed=args.seed, data_config=cfg,
               amp=[args.amp, args.amp_dtype])

    def compute(todo):
        for col in (probe_cols[i] for i in todo):
            xt, yt = extract(col.features, train_set, args, device, autocast, rank, world, f"probe {col.name} train")
            xv, yv = extract(col.features, val_set, args, device, autocast, rank, world, f"probe {col.name} val")
            acc = linear_probe(xt, yt, xv, yv, n_classes, args.probe_wd, args.probe_steps)
            yield (round(acc * len(yv) / 100),), len(yv)

    keys = [dict(c.ident, task=key) for c in probe_cols]
    hits = cached(os.path.join(args.output, "cache"), keys, [1] * len(keys), compute, rank, device)
    return {(c.name, "probe", None, None): (got[0], n) for c, (got, n) in zip(probe_cols, hits)}


# ----------------------------------------------------------------------------- report

def summarize(cols, counts, corruptions, severities, imagenet, baseline):
    """Per-column numbers (top-1 %, counts, corruption metrics) from counts[(column, set, corruption, severity)]."""
    out, errors = {}, {}
    for col in cols:
        m = out[col.name] = {"info": dict(col.info, family=col.family), "sets": {}}
        for (name, s, c, sev), (k, n) in counts.items():
            if name == col.name and s != "c":
                m["sets"][s] = {"top1": 100.0 * k / max(1, n), "correct": k, "total": n}
        cs = [c for c in corruptions if (col.name, "c", c, severities[0]) in counts]
        if cs:
            counts_c = {c: {s: counts[(col.name, "c", c, s)] for s in severities} for c in cs}
            acc = {c: {s: 100.0 * k / max(1, n) for s, (k, n) in v.items()} for c, v in counts_c.items()}
            main, extra = [c for c in cs if c in CORRUPTIONS], [c for c in cs if c in EXTRA_CORRUPTIONS]
            mean = lambda names: float(np.mean([acc[c][s] for c in names for s in severities])) if names else None
            m["c"] = {"top1": acc, "counts": counts_c, "mean_acc": mean(main), "extra_mean_acc": mean(extra),
                      "mean_err": 100 - mean(main) if main else None, "mce_corruptions": len(main)}
            errors[col.name] = {c: {s: 1 - a / 100 for s, a in acc[c].items()} for c in main}
    clean_err = {n: 1 - m["sets"]["clean"]["top1"] / 100 for n, m in out.items() if "clean" in m["sets"]}
    for name, err in errors.items():
        c, e0 = out[name]["c"], clean_err.get(name)
        if err and imagenet:   # AlexNet's errors average all 5 severities: none with fewer (not comparable)
            full = severities == [1, 2, 3, 4, 5]
            c["mce"] = mce(err, ALEXNET_ERR, err) if full else None
            c["relative_mce"] = relative_mce(err, e0, ALEXNET_ERR, ALEXNET_CLEAN_ERR, err) \
                if full and e0 is not None else None
        if err and errors.get(baseline):
            ref, ref0 = errors[baseline], clean_err.get(baseline)   # same corruptions and severities
            c["mce_vs_baseline"] = _finite(lambda: mce(err, ref, err))
            c["relative_mce_vs_baseline"] = _finite(lambda: relative_mce(err, e0, ref, ref0, err)) \
                if None not in (e0, ref0) else None
    return out


def routing_summary(routing, corruptions, severities):
    """Per routed column: for each set (clean, '<corruption>/<severity>', pooled 'C severity <s>' over the mCE
    corruptions, 'C all', 'extra all', r, ...) each head's top-1, the auto head's, the oracle's (any head
    right) and the % of images routed to each head; plus, over the severity-5 mCE sets where a new head beats
    the clean head, the mean % routed away from the clean head ('away_at_5_where_better')."""
    out = {}
    for (name, s, c, sev), (got, n) in routing.items():
        label = s if s != "c" else f"{c}/{sev}"
        row = dict(zip(("auto", *ROUTE_FIELDS), got), n=n)
        out.setdefault(name, {})[label] = row
    keys = ("auto", *ROUTE_FIELDS)
    pooled = lambda rows: {k: sum(r[k] for r in rows) for k in (*keys, "n")}
    result = {}
    for name, rows in out.items():
        main = [c for c in corruptions if c in CORRUPTIONS]
        extra = [c for c in corruptions if c in EXTRA_CORRUPTIONS]
        groups = {f"C severity {s}": [f"{c}/{s}" for c in main] for s in severities}
        groups.update({"C all": [f"{c}/{s}" for c in main for s in severities],
                       "extra all": [f"{c}/{s}" for c in extra for s in severities]})
        for label, members in groups.items():
            if members and all(m in rows for m in members):
                rows[label] = pooled([rows[m] for m in members])
        pct = {label: {"n": r["n"], **{k: 100.0 * r[k] / max(1, r["n"]) for k in keys}}
               for label, r in rows.items()}
        better = [pct[f"{c}/5"] for c in main if f"{c}/5" in pct and
                  max(pct[f"{c}/5"]["robust"], pct[f"{c}/5"]["combined"]) > pct[f"{c}/5"]["clean"]]
        result[name] = {"sets": pct, "away_at_5_where_better": float(np.mean([100 - r["to_clean"] for r in better]))
                        if better else None, "sets_at_5_where_better": len(better)}
    return result


def routing_table(name, r):
    """Markdown: one row per set of a routed column's diagnostics."""
    sets = r["sets"]
    pooled = lambda k: k.startswith(("C ", "extra "))
    order = sorted(sets, key=lambda k: (k != "clean", not pooled(k)))   # clean, pooled rows, then per set
    lines = [f"routing of {name} (top-1 % per head; oracle = any head right; % of images sent to each head)", "",
             "| set | clean head | robust | combined | auto | oracle | to clean | to robust | to combined |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in order:
        v = sets[k]
        lines.append(f"| {k} | {v['clean']:.2f} | {v['robust']:.2f} | {v['combined']:.2f} | {v['auto']:.2f} | "
                     f"{v['oracle']:.2f} | {v['to_clean']:.1f} | "
                     f"{v['to_robust']:.1f} | {v['to_combined']:.1f} |")
    if r["away_at_5_where_better"] is not None:
        lines.append(f"\nseverity 5, the {r['sets_at_5_where_better']} corruptions where a new head beats the clean "
                     f"head: {r['away_at_5_where_better']:.1f}% of images routed away from the clean head")
    return "\n".join(lines)


def _finite(fn):
    try:
        v = fn()
    except ZeroDivisionError:  # e.g. a perfect baseline: the ratio is undefined
        return None
    return v if math.isfinite(v) else None


def table_columns(imagenet, baseline, n_corruptions=15):
    """(header, getter) of the markdown table and the final line; n_corruptions: how many of the 15 mCE
    corruptions the C columns average."""
    c = lambda key: lambda m: m.get("c", {}).get(key)
    s = lambda key: lambda m: m["sets"].get(key, {}).get("top1")
    over = "" if n_corruptions == 15 else f" ({n_corruptions} of 15)"
    cols = [("clean", s("clean")), (f"C acc{over}", c("mean_acc"))]
    cols += [(f"mCE (AlexNet){over}", c("mce")), (f"rel mCE (AlexNet){over}", c("relative_mce"))] if imagenet else \
        [(f"C err{over}", c("mean_err"))]
    if baseline:   # relative mCE vs a baseline stays in results.json: its small denominators make it noisy
        cols += [(f"mCE vs {baseline}", c("mce_vs_baseline"))]
    return cols + [("extra acc", c("extra_mean_acc")), ("R", s("r")), ("Sketch", s("sketch")), ("A", s("a")),
                   ("V2", s("v2")), ("AugMix views", s("augmix")), ("PGD", s("pgd")), ("probe", s("probe"))]


def markdown_table(summary, columns):
    columns = [(h, f) for h, f in columns if any(f(m) is not None for m in summary.values())]
    lines = ["| model | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, m in summary.items():
        lines.append(f"| {name} | " + " | ".join("-" if f(m) is None else f"{f(m):.2f}" for _, f in columns) + " |")
    return "\n".join(lines)


def plot_severity(summary, corruptions, severities, path):
    """acc_vs_severity.png: a panel per corruption and one for the mean over the mCE ones; a line per model."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    main = [c for c in corruptions if c in CORRUPTIONS] or corruptions
    panels, ncol = corruptions + ["mean"], min(5, len(corruptions) + 1)
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(2.6 * ncol + 3, 2.2 * nrow + 0.5), layout="constrained")
    axes = list(fig.subplots(nrow, ncol, squeeze=False, sharey=True).flat)
    for ax, panel in zip(axes, panels):
        for i, (name, m) in enumerate((n, m) for n, m in summary.items() if "c" in m):
            acc = m["c"]["top1"]
            ys = [np.mean([acc[c][s] for c in main]) if panel == "mean" else acc[panel][s] for s in severities]
            ax.plot(severities, ys, f"C{i % 10}", ls=["-", "--", ":", "-."][i // 10 % 4], marker="o", label=name)
        ax.set_title(panel if panel != "mean" else f"mean of {len(main)}", fontsize=9)
        ax.set_xticks(severities)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    fig.supxlabel("severity")
    fig.supylabel("top-1 (%)")
    fig.savefig(path, dpi=90)


def plot_wise(summary, path):
    """wise_sweep.png: ID (clean top-1) vs OOD (mean corruption top-1, else the mean of the other sets)."""
    from matplotlib.figure import Figure
    lines = {}
    for m in summary.values():
        info, c = m["info"], m.get("c", {})
        ood = [c["mean_acc"]] if c.get("mean_acc") is not None else \
            [v["top1"] for k, v in m["sets"].items() if k in ("r", "sketch", "a", "v2")]
        if info.get("alpha") is not None and "clean" in m["sets"] and ood:
            key = info["family"] + (":zeroshot-branch" if info["kind"] == "zeroshot" else f":{info['head']}")
            lines.setdefault(key, []).append((info["alpha"], m["sets"]["clean"]["top1"], float(np.mean(ood))))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for key, pts in lines.items():
        pts.sort()
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=key)
        for alpha, x, y in pts:
            ax.annotate(f"{alpha:g}", (x, y), fontsize=7)
    ax.set(xlabel="ID: clean top-1 (%)", ylabel="OOD: corruption top-1 (%)", title="WiSE-FT sweep (labels: alpha)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


@torch.no_grad()
def eval_throughput(model, images, batch_size):
    """Inference images/s of `model` on `images` ([N, 3, H, W] on the model's device), after one warm-up batch."""
    sync = (lambda: torch.cuda.synchronize(images.device)) if images.is_cuda else (lambda: None)
    model(images[:batch_size])
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        model(images[i:i + batch_size])
    sync()
    return len(images) / (time.perf_counter() - t0)


def describe(args, summary, shifts, corruptions, severities, n_classes, cfg, imagenet, baseline, world, device):
    """results.json: the numbers and what is needed to read them."""
    generated = "c" in shifts and args.generate_c
    return {
        "args": vars(args), "torch": torch.__version__, "world_size": world, "baseline": baseline,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dataset": {"name": args.dataset, "classes": n_classes, "test_subset": args.test_subset, "transform": cfg,
                    "clean": clean_dir(args) if args.dataset == "folder" else f"fashion-mnist {args.split}"},
        "corruptions": {"source": None if "c" not in shifts else "generated" if generated else "ImageNet-C files",
                        "frost": None if not generated else args.frost_dir or "procedural",
                        "seed": f"corruption_seed({args.seed}, name, severity, block of {SEED_BLOCK})"
                        if generated else None, "names": corruptions, "severities": severities},
        "metrics": {"top1": "% correct; -R/-A on their 200 of the 1000 logits", "mean_acc": "over mCE corruptions and "
                    "severities", "mean_err": "100 - mean_acc", "mce": "100 mean_c sum_s E(s,c) / sum_s E_ref(s,c)",
                    "relative_mce": "100 mean_c sum_s (E(s,c) - E_clean) / sum_s (E_ref(s,c) - E_ref_clean)",
                    "reference": ("AlexNet (5-severity averages)" if imagenet else "-") +
                    (f"; *_vs_baseline: {baseline}" if baseline else ""),
                    "pgd": dict(eps=args.attack_eps, step=args.attack_step, steps=args.attack_steps,
                                norm=args.attack_norm) if args.attack == "pgd" else None},
        "models": summary}


# ----------------------------------------------------------------------------- main

def run(args):
    shifts, corruptions, severities, alphas = check_args(args)
    rank, world, device = setup_distributed(args.device)
    log = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    root = clean_dir(args) if args.dataset == "folder" else None
    if args.dataset == "fashion-mnist":
        classes, space = class_names("fashion-mnist", None), "the Fashion-MNIST test set"
    elif root and os.path.isdir(root):
        classes, space = check_image_folder(root, "--data-dir"), f"the clean set {root}"
    else:
        classes, space = timm_info("imagenet_synsets.txt"), "ImageNet (the label space of the --data-root sets)"
    if set(shifts) & {"r", "sketch", "a", "v2"} and len(classes) != 1000:
        raise UserError(f"--shifts r/sketch/a/v2 score the 1000 ImageNet classes; {space} has {len(classes)}")
    cols, cfg = load_columns(args, alphas, classes, space, device)
    imagenet = args.dataset == "folder" and len(classes) == 1000
    baseline = args.baseline or (None if imagenet else cols[0].name)
    if baseline not in [c.name for c in cols] + [None]:
        raise UserError(f"--baseline: {baseline!r} is none of the evaluated models: {', '.join(c.name for c in cols)}")
    log(f"{len(cols)} column(s) on {device} x {world}; corruptions " + ("not evaluated" if "c" not in shifts else
        f"generated (frost: {args.frost_dir or 'procedural'})" if args.generate_c else "read from disk"))

    tasks = make_tasks(args, shifts, corruptions, severities, classes, image_transforms(args.dataset, cfg)[1])
    counts, routing = evaluate_tasks(tasks, cols, args, cfg, device, rank, world)
    if args.probe_data:
        counts.update(probe_all(cols, args, cfg, device, rank, world))
    summary = summarize(cols, counts, corruptions, severities, imagenet, baseline)
    for name, r in routing_summary(routing, corruptions, severities).items():
        summary[name]["routing"] = r
    results = describe(args, summary, shifts, corruptions, severities, len(classes), cfg, imagenet, baseline, world,
                       device)
    columns = table_columns(imagenet, baseline, len([c for c in corruptions if c in CORRUPTIONS]))
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        if "c" in shifts:
            plot_severity(summary, corruptions, severities, os.path.join(args.output, "acc_vs_severity.png"))
        if alphas:
            plot_wise(summary, os.path.join(args.output, "wise_sweep.png"))
        write_atomic(os.path.join(args.output, "results.json"), json.dumps(results, indent=1, default=str))
    routing_md = "\n\n".join(routing_table(n, m["routing"]) for n, m in summary.items() if "routing" in m)
    if rank == 0 and routing_md:
        write_atomic(os.path.join(args.output, "routing.md"), routing_md + "\n")
    log(markdown_table(summary, columns) + ("\n\n" + routing_md if routing_md else ""))
    log("final: " + json.dumps({n: {h: f(m) for h, f in columns if f(m) is not None} for n, m in summary.items()}))
    return results


def main(argv=None):
    return run_main(run, argv, get_parser())


if __name__ == "__main__":
    main()
