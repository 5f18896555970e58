"""Everything about images: datasets, transforms, robust augmentation, corruptions, loaders.

Images leave this module as float tensors in [0, 1]; models normalise inside their own wrapper
(train_teacher.Normalized), so a teacher and a student with different mean/std share one batch,
PGD works in pixel space and corruptions apply to pixels.

    from data import build_datasets, make_loader
    train_set, val_set = build_datasets("fashion-mnist", None, train_tf, eval_tf)

The embedded benchmark, Fashion-MNIST (MIT), is found in --data-dir, then in Debian's
/usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`), then downloaded by
torchvision where the network allows.
"""
import copy
import functools
import gzip
import math
import multiprocessing
import os
import sys
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torch.utils.data._utils.collate import default_collate
from torchvision import datasets as tv_datasets
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2


class UserError(Exception):
    """A mistake the user can fix. The scripts print its one sentence and exit with status 2."""


def add_data_args(parser):
    """The data flags every script shares (same names, same meaning)."""
    parser.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/ "
                        "(or where to look for --dataset files)")
    parser.add_argument("--dataset", default="folder", choices=["folder", "fashion-mnist"],
                        help="'folder': ImageFolder trees under --data-dir; 'fashion-mnist': the embedded benchmark")
    parser.add_argument("--train-subset", type=int, default=0, help="use only N training images (0 = all)")
    parser.add_argument("--val-subset", type=int, default=0, help="use only N validation images (0 = all)")
    parser.add_argument("-b", "--batch-size", type=int, default=128, help="images per batch and process")
    parser.add_argument("-j", "--workers", type=int, default=2, help="data loading processes per process")
    parser.add_argument("--img-size", type=int, default=None, help="model input size in pixels (ImageFolder images "
                        "are resized and cropped to it; default: the model's own, 32 for fashion-mnist)")
    return parser


def check_data_args(args):
    """The shared data flags' mistakes, caught before anything is loaded or written."""
    if args.batch_size < 1:
        raise UserError(f"-b/--batch-size {args.batch_size}: give at least 1 image per batch")
    if args.workers < 0:
        raise UserError(f"-j/--workers {args.workers}: give 0 (load in the main process) or more loader processes")
    for flag in ("train_subset", "val_subset", "test_subset"):
        n = getattr(args, flag, 0)
        if n < 0:
            raise UserError(f"--{flag.replace('_', '-')} {n}: give a number of images >= 0 (0 = all)")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size {args.img_size}: give the input size in pixels, e.g. 224 (or leave it out)")


def add_aug_args(parser):
    """AugMix flags (train_teacher.py and distill_partial.py)."""
    parser.add_argument("--aug-severity", type=int, default=3, help="AugMix op severity (1-10)")
    parser.add_argument("--aug-width", type=int, default=3, help="AugMix chains per image")
    parser.add_argument("--aug-depth", type=int, default=-1, help="AugMix ops per chain (-1: random 1-3)")
    parser.add_argument("--aug-all-ops", action="store_true", help="also use the ops that overlap ImageNet-C "
                        "(unfair for corruption benchmarks)")
    parser.add_argument("--aug-device", default="cpu", choices=["cpu", "cuda"], help="cpu: AugMix in the loader "
                        "workers; cuda: batched AugMix in the training loop on the training device (--device)")
    return parser


def check_aug_args(args):
    if not 1 <= args.aug_severity <= 10:
        raise UserError(f"--aug-severity {args.aug_severity}: AugMix severities run from 1 to 10 (3 is the paper's)")
    if args.aug_width < 1 or args.aug_depth == 0 or args.aug_depth < -1:
        raise UserError(f"--aug-width {args.aug_width} / --aug-depth {args.aug_depth}: give a width >= 1 and a depth "
                        f">= 1, or -1 for a random depth of 1-3")


# ----------------------------------------------------------------------------- datasets

FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_VAL = 5000  # last images of the training file, held out for validation/calibration
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path):
    """Read an IDX file (optionally gzipped), the format MNIST-like datasets ship in."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def _find_idx(folder, stem):
    for name in (stem + ".gz", stem):
        for sub in ("", "raw", os.path.join("FashionMNIST", "raw")):
            path = os.path.join(folder, sub, name)
            if os.path.isfile(path):
                return path
    return None


def find_fashion_mnist(data_dir=None):
    """Folder holding the four Fashion-MNIST IDX files: --data-dir, Debian's path, or a download."""
    for folder in (data_dir, FASHION_MNIST_DEBIAN):
        if folder and all(_find_idx(folder, s) for pair in _FMNIST_FILES.values() for s in pair):
            return folder
    root = data_dir or os.path.join(os.path.expanduser("~"), ".cache", "fashion-mnist")
    try:
        for train in (True, False):
            tv_datasets.FashionMNIST(root, train=train, download=True)
    except Exception as e:  # no network, or a partial download
        raise UserError(f"Fashion-MNIST not found in --data-dir or {FASHION_MNIST_DEBIAN} and the download "
                        f"failed ({type(e).__name__}); install it with `apt-get install dataset-fashion-mnist` "
                        f"or put the four IDX files in --data-dir") from None
    return root


class TensorImages(Dataset):
    """In-memory uint8 images [N, C, H, W] with labels; transform sees a uint8 [3, H, W] tensor."""

    def __init__(self, images, labels, classes, transform=None):
        self.images, self.labels, self.classes, self.transform = images, labels, list(classes), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i].expand(3, -1, -1)
        return (self.transform(img) if self.transform else to_float(img)), int(self.labels[i])


def fashion_mnist(split, data_dir=None, transform=None):
    """Fashion-MNIST split 'train' (55k), 'val' (the last 5k training images) or 'test' (10k).

    28x28 grey images are zero-padded to 32x32 (the usual CIFAR-sized layout); channels are
    repeated to 3 lazily, so the whole set costs 60 MB in memory.
    """
    folder = find_fashion_mnist(data_dir)
    images_file, labels_file = _FMNIST_FILES["test" if split == "test" else "train"]
    images = _read_idx(_find_idx(folder, images_file))
    labels = _read_idx(_find_idx(folder, labels_file)).long()
    if split == "train":
        images, labels = images[:-FASHION_MNIST_VAL], labels[:-FASHION_MNIST_VAL]
    elif split == "val":
        images, labels = images[-FASHION_MNIST_VAL:], labels[-FASHION_MNIST_VAL:]
    images = F.pad(images, (2, 2, 2, 2)).unsqueeze(1)  # [N, 1, 32, 32]
    return TensorImages(images, labels, FASHION_MNIST_CLASSES, transform)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".jpeg_")


def check_image_folder(root, flag="--data-dir"):
    """Fail early on the layouts that otherwise give a silent 0% run: missing, flat or empty class folders."""
    if not os.path.isdir(root):
        raise UserError(f"{flag}: folder {root} does not exist; point it at an ImageFolder tree (<split>/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    loose = [e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if loose and not classes:
        raise UserError(f"{flag}: {root} holds images directly (a flat folder); sort them into one sub-folder "
                        f"per class, e.g. with ImageNet's valprep.sh")
    if not classes:
        raise UserError(f"{flag}: {root} has no class sub-folders; expected {root}/<class>/<image>")
    for c in classes:
        if not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(os.path.join(root, c)) for f in files):
            raise UserError(f"{flag}: class folder {os.path.join(root, c)} has no images; remove it or fill it")
    return classes


def read_rgb(path):
    """Decode an image file to a uint8 [3, H, W] tensor: torchvision's decoders (JPEG, PNG, WebP, GIF),
    PIL for the other formats IMG_EXTENSIONS admits (BMP, TIFF)."""
    if not path.lower().endswith((".bmp", ".tif", ".tiff")):
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as deprecated (for TorchCodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(path, mode=ImageReadMode.RGB)
        # 16-bit PNGs decode to uint16: scaled to 8 bits, as every loader here expects
        return image if image.dtype == torch.uint8 else v2.functional.to_dtype(image, torch.uint8, scale=True)
    from PIL import Image
    with Image.open(path) as image:
        if image.mode.startswith("I;16"):   # 16-bit grey: scaled to 8 bits (PIL's convert would clip)
            grey = torch.from_numpy((np.array(image).astype(np.int32) >> 8).astype(np.uint8))
            return grey.expand(3, *grey.shape).contiguous()
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


class ImageFolderSafe(tv_datasets.DatasetFolder):
    """ImageFolder that skips (and counts) unreadable files instead of killing a long run.

    class_to_idx fixes the label of each folder name (needed for ImageNet-R/-A/-V2, whose folders
    are not the 1000 ImageNet classes in sorted order); by default folders are sorted.
    """

    def __init__(self, root, transform=None, class_to_idx=None, flag="--data-dir"):
        folders = check_image_folder(root, flag)
        if class_to_idx is not None:
            unknown = [c for c in folders if c not in class_to_idx]
            if unknown:
                raise UserError(f"{flag}: {root} has folders {unknown[:3]} that are not classes of this label space")
            class_to_idx = {c: class_to_idx[c] for c in folders}
        self._fixed = class_to_idx
        super().__init__(root, loader=read_rgb, extensions=IMG_EXTENSIONS, transform=transform)
        self.skipped = multiprocessing.Value("i", 0)  # shared with the loader's worker processes

    def find_classes(self, directory):
        if self._fixed is None:
            return super().find_classes(directory)
        return sorted(self._fixed), self._fixed

    def __getitem__(self, i):
        path, target = self.samples[i]
        try:
            img = read_rgb(path)
        except Exception as e:  # truncated JPEG, wrong extension, unreadable file...
            print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
            with self.skipped.get_lock():
                self.skipped.value += 1
            return None
        return (self.transform(img) if self.transform else to_float(img)), target


def check_readable(dataset, flag="--data-dir"):
    """At least one image of an ImageFolder decodes (else a run would report 0% on nothing). Stops at the
    first readable file, so a healthy folder costs one decode."""
    for path, _ in getattr(dataset, "samples", []):
        try:
            read_rgb(path)
            return
        except Exception:
            continue
    if hasattr(dataset, "samples"):
        raise UserError(f"{flag}: none of the {len(dataset.samples)} images in {dataset.root} can be read; "
                        f"replace the broken files")


def skipped_images(dataset):
    """How many unreadable images a dataset (or a Subset of one) has skipped so far."""
    while isinstance(dataset, (Subset, SeededSamples)):
        dataset = dataset.dataset
    skipped = getattr(dataset, "skipped", None)
    return skipped.value if skipped is not None else 0


def holdout(dataset, n, seed=0):
    """(rest, held_out): n items set aside, e.g. the clean slice that calibrates the head selector."""
    if n <= 0:
        return dataset, None
    if n >= len(dataset):
        raise UserError(f"--calib-size {n} leaves no training images out of {len(dataset)}; lower it")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return Subset(dataset, sorted(idx[n:])), Subset(dataset, sorted(idx[:n]))


def with_transform(dataset, transform):
    """The same images seen through another transform: a shallow copy, no re-scan of the folders."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    out = copy.copy(dataset)
    out.transform = transform
    return out


def subset(dataset, n, seed=0):
    """A fixed random subset of n items (ImageFolder samples are sorted by class, so never the first n)."""
    if not n or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, sorted(idx.tolist()))


def build_datasets(dataset, data_dir, train_transform, eval_transform, train_subset=0, val_subset=0):
    """(train, val) datasets: ImageFolder train/ and val/ under data_dir, or Fashion-MNIST train/val."""
    if dataset == "fashion-mnist":
        train = fashion_mnist("train", data_dir, train_transform)
        val = fashion_mnist("val", data_dir, eval_transform)
    else:
        class_names(dataset, data_dir)
        train = ImageFolderSafe(os.path.join(data_dir, "train"), train_transform)
        val = ImageFolderSafe(os.path.join(data_dir, "val"), eval_transform)
        if train.classes != val.classes:
            raise UserError(f"--data-dir: {data_dir}/train and {data_dir}/val have different class folders")
        check_readable(train)
        check_readable(val)
    return subset(train, train_subset), subset(val, val_subset)


def native_size(dataset):
    """Image size a dataset comes in (models are built for it), or None when the model decides."""
    return 32 if dataset == "fashion-mnist" else None


def class_names(dataset, data_dir):
    """The label space, known before any image is read: it sizes the model's head."""
    if dataset == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    if not data_dir:
        raise UserError("--data-dir is required with --dataset folder; give an ImageFolder root with "
                        "train/ and val/, or use --dataset fashion-mnist")
    return check_image_folder(os.path.join(data_dir, "train"))


# ----------------------------------------------------------------------------- ImageNet label spaces

def timm_info(filename):
    """Lines of a file timm ships in timm/data/_info (ImageNet synsets, the -R/-A class subsets)."""
    import timm.data
    with open(os.path.join(os.path.dirname(timm.data.__file__), "_info", filename)) as f:
        return [line.strip() for line in f if line.strip()]


def restricted_classes(name):
    """ImageNet-R ('r') or -A ('a'): (the 200 columns of the 1000 ImageNet logits the set is scored on,
    {folder wnid: its position among them}). Score with logits[:, columns].argmax(1) == label."""
    columns = [int(i) for i in timm_info(f"imagenet_{name}_indices.txt")]
    return columns, {wnid: i for i, wnid in enumerate(timm_info(f"imagenet_{name}_synsets.txt"))}


def shift_labels(shift):
    """(folder name -> label, logit columns or None) of an ImageNet shift set."""
    if shift in ("r", "a"):
        columns, to_label = restricted_classes(shift)
        return to_label, columns
    if shift == "v2":  # folders 0..999 are class indices; ImageFolder's string sort would put 10 before 2
        return {str(i): i for i in range(1000)}, None
    return {wnid: i for i, wnid in enumerate(timm_info("imagenet_synsets.txt"))}, None



# ----------------------------------------------------------------------------- transforms

def to_float(img):
    """uint8 [.., 3, H, W] -> float32 in [0, 1]."""
    return img.float().div_(255) if img.dtype == torch.uint8 else img.float()


def image_transforms(dataset, data_config):
    """(train, eval) geometric transforms on uint8 tensors, from the model's timm data config.

    Fashion-MNIST is already 32x32: random crop with padding + flip for training, nothing for eval
    (the model wrapper resizes if its input size differs). ImageFolder: RandomResizedCrop + flip;
    eval Resize(size / crop_pct) + CenterCrop(size), the timm/ImageNet protocol.
    """
    if dataset == "fashion-mnist":
        return v2.Compose([v2.RandomCrop(32, padding=2), v2.RandomHorizontalFlip()]), v2.Identity()
    size = data_config["input_size"][-1]
    interp = v2.InterpolationMode(data_config.get("interpolation", "bilinear"))
    train = v2.Compose([v2.RandomResizedCrop(size, interpolation=interp, antialias=True), v2.RandomHorizontalFlip()])
    resize = int(math.floor(size / data_config.get("crop_pct", 0.875)))
    evaluation = v2.Compose([v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(size)])
    return train, evaluation


def augmix(severity=3, width=3, depth=-1, alpha=1.0, all_ops=False):
    """torchvision's AugMix. all_ops=False drops contrast, color, brightness and sharpness, the ops
    that overlap ImageNet-C (Hendrycks et al. 2020, section 4), so corruption results stay fair."""
    return v2.AugMix(severity=severity, mixture_width=width, chain_depth=depth, alpha=alpha, all_ops=all_ops)


# AugMix on a whole batch, on the device that holds it (--aug-device cuda): the op set, magnitudes,
# severities, Dirichlet mixing weights and Beta skip weight of torchvision's v2.AugMix, with every
# random number drawn per image on the CPU (so CPU and CUDA draw the same choices). Ops work on floats
# in [0, 1]; posterize and equalize on the 8-bit levels, like torchvision's uint8 kernels. Not bit-equal
# to torchvision (which rounds to uint8 after every op), equal in distribution (test_smoke.py).
AUGMIX_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Posterize", "Solarize", "AutoContrast",
              "Equalize")
AUGMIX_ALL_OPS = AUGMIX_OPS + ("Brightness", "Color", "Contrast", "Sharpness")  # these overlap ImageNet-C


def augmix_magnitudes(op, height, width, bins=10):
    """(magnitude of each severity bin, signed) of one op: torchvision's table (PARAMETER_MAX = 10 bins)."""
    lin = lambda top: torch.linspace(0.0, top, bins)  # noqa: E731
    table = {"ShearX": (lin(0.3), True), "ShearY": (lin(0.3), True), "TranslateX": (lin(width / 3.0), True),
             "TranslateY": (lin(height / 3.0), True), "Rotate": (lin(30.0), True),
             "Posterize": ((4 - torch.arange(bins) / ((bins - 1) / 4)).round(), False),
             "Solarize": (torch.linspace(1.0, 0.0, bins), False), "AutoContrast": (torch.zeros(bins), False),
             "Equalize": (torch.zeros(bins), False)}
    table.update({name: (lin(0.9), True) for name in ("Brightness", "Color", "Contrast", "Sharpness")})
    return table[op]


@functools.lru_cache(maxsize=16)
def _augmix_tables(names, height, width):
    """The magnitude tables of the ops `names` as one [ops, bins] tensor and their signed flags (cached:
    building them costs ~20 small tensors per op and call; callers only read them)."""
    tables, signed = zip(*(augmix_magnitudes(n, height, width) for n in names))
    return torch.stack(tables).float(), torch.tensor(signed)


def _affine_theta(ops, mags, h, w):
    """affine_grid's [n, 2, 3] matrices (float32, CPU) of the geometric ops (index ops into AUGMIX_OPS[:5],
    magnitudes mags, both on the CPU) as torchvision's F.affine / F.rotate define them: coordinates of pixel
    centres relative to the image centre, each output position mapped to the input position it samples."""
    m = mags.double()
    zero = torch.zeros_like(m)
    inv = torch.eye(3, dtype=torch.float64).repeat(len(ops), 1, 1)  # output position -> input position
    inv[:, 0, 1] = torch.where(ops == 0, m, zero)   # ShearX about the top-left corner (center=[0, 0])
    inv[:, 1, 0] = torch.where(ops == 1, m, zero)   # ShearY
    inv[:, 0, 2] = torch.where(ops == 0, m * h / 2, zero) - torch.where(ops == 2, m.trunc(), zero)  # TranslateX
    inv[:, 1, 2] = torch.where(ops == 1, m * w / 2, zero) - torch.where(ops == 3, m.trunc(), zero)  # TranslateY
    rot = ops == 4   # Rotate: counter-clockwise by m degrees about the centre
    a = torch.deg2rad(m[rot])
    inv[rot, 0, 0], inv[rot, 0, 1], inv[rot, 1, 0], inv[rot, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    scale = torch.tensor([w / 2, h / 2, 1.0], dtype=torch.float64)  # pixels -> affine_grid's [-1, 1] units
    return (inv / scale[:, None] * scale[None, :])[:, :2].float()


def _affine(x, theta):
    """x [n, 3, H, W] resampled as F.affine_grid(theta, align_corners=False) + bilinear grid_sample with zero
    fill. The grid is built by broadcasting: affine_grid's [n, H*W, 3] x [n, 3, 2] product runs as a slow
    float32 GEMM with an inner size of 3 (a third of AugMix's device time at 224 px)."""
    n, _, h, w = x.shape
    xs = torch.arange(w, device=x.device, dtype=torch.float32).mul_(2 / w).add_(1 / w - 1)   # pixel centres
    ys = torch.arange(h, device=x.device, dtype=torch.float32).mul_(2 / h).add_(1 / h - 1).view(h, 1)
    t = theta.view(n, 2, 3, 1, 1)
    grid = torch.stack([t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2],
                        t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _grey(x):
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _equalize(x):
    """torchvision's (PIL's) histogram equalisation of the 8-bit levels, per image and channel."""
    b, c, h, w = x.shape
    q = (x * 255).round().long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    cum = hist.cumsum(1)
    step = (h * w - hist.gather(1, cum.argmax(1, keepdim=True))) // 255
    lut = ((cum[:, :-1] + step // 2) // step.clamp_min(1)).clamp(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return out.view(b, c, h, w).float() / 255


def augmix_op(x, name, mags):
    """One AugMix op on a float batch [n, 3, H, W] in [0, 1], magnitude mags[i] for image i (the geometric
    ops take them on the CPU, the others on either device)."""
    n = len(x)
    if name in AUGMIX_OPS[:5]:
        theta = _affine_theta(torch.full((n,), AUGMIX_OPS.index(name)), mags.cpu(), *x.shape[-2:])
        return _affine(x, theta.to(x.device))
    m = mags.to(x.device, torch.float32).view(n, 1, 1, 1)
    if name == "Posterize":  # keep the top `bits` bits of each 8-bit level
        step = 2.0 ** (8 - m)
        return torch.floor((x * 255).round() / step) * step / 255
    if name == "Solarize":
        return torch.where(x >= m, 1 - x, x)
    if name == "AutoContrast":
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        flat = hi == lo
        return ((x - torch.where(flat, 0, lo)) / torch.where(flat, 1, hi - lo)).clamp(0, 1)
    if name == "Equalize":
        return _equalize(x)
    f = 1 + m
    if name == "Brightness":
        return (x * f).clamp(0, 1)
    if name == "Color":
        return (x * f + _grey(x) * (1 - f)).clamp(0, 1)
    if name == "Contrast":
        return (x * f + _grey(x).mean(dim=(1, 2, 3), keepdim=True) * (1 - f)).clamp(0, 1)
    if name == "Sharpness":  # blend with a 3x3 smoothing (1s around a 5, /13); borders keep the image
        kernel = torch.ones(3, 3, device=x.device)
        kernel[1, 1] = 5
        smooth = x.clone()
        smooth[..., 1:-1, 1:-1] = _conv_planes(x, kernel / 13)
        return (x * f + smooth * (1 - f)).clamp(0, 1)
    raise ValueError(f"unknown AugMix op {name!r}")


def augmix_batch(x, severity=3, width=3, depth=-1, alpha=1.0, all_ops=False, generator=None):
    """AugMix (Hendrycks et al. 2020) of every image of a batch [B, 3, H, W] (uint8, or float in [0, 1]) on
    its device; same dtype out. Per image: skip weight m ~ Beta(alpha, alpha), chain weights ~
    Dirichlet(alpha), `width` chains of `depth` ops (-1: 1-3 at random), each op uniform from the set,
    its magnitude uniform from the first `severity` of 10 bins, signed ops negated with odds 1/2;
    out = m * x + (1 - m) * sum_i w_i chain_i(x). Random numbers come from `generator` (a CPU one; the
    global CPU generator by default), so CPU and CUDA make the same choices."""
    names = AUGMIX_ALL_OPS if all_ops else AUGMIX_OPS
    b, _, h, w = x.shape
    gen = dict(generator=generator)
    skip = torch._sample_dirichlet(torch.full((b, 2), float(alpha)), **gen)
    weights = torch._sample_dirichlet(torch.full((b, width), float(alpha)), **gen) * skip[:, 1:]
    depths = torch.full((b, width), depth) if depth > 0 else torch.randint(1, 4, (b, width), **gen)
    n_steps = int(depths.max())
    ops = torch.randint(len(names), (b, width, n_steps), **gen)
    bins = torch.randint(severity, (b, width, n_steps), **gen)
    signs = torch.where(torch.rand((b, width, n_steps), **gen) <= 0.5, -1.0, 1.0)
    table, signed = _augmix_tables(names, h, w)
    mags = table[ops, bins] * torch.where(signed[ops], signs, 1.0)

    # The chains side by side as one batch (row i * B + image), one op kind at a time, each updated in place.
    # Every row set, affine matrix and weight is made on the CPU and sent in one transfer: a transfer per op
    # would wait for the device each time and leave it idle while Python prepares the next op.
    ops, mags = ops.transpose(0, 1).reshape(width * b, n_steps), mags.transpose(0, 1).reshape(width * b, n_steps)
    depths = depths.t().reshape(width * b)
    live = depths[:, None] > torch.arange(n_steps)
    geometric = (live & (ops < 5)).t()  # [step, row]: the affine matrices of every step in one call
    thetas = _affine_theta(ops.t()[geometric], mags.t()[geometric], h, w).split(geometric.sum(1).tolist())
    plan, rows, values = [], [], []
    for d in range(n_steps):
        for k in [None, *range(5, len(names))]:   # None: the five geometric ops, one grid_sample
            sel = torch.nonzero(geometric[d] if k is None else live[:, d] & (ops[:, d] == k))[:, 0]
            if len(sel):
                v = thetas[d].flatten() if k is None else mags[sel, d].float()
                plan.append((k, len(sel), len(v)))
                rows.append(sel)
                values.append(v)
    rows = _to_device(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long), x.device)
    values = _to_device(torch.cat([*values, skip[:, 0].float(), weights.t().flatten().float()]), x.device)
    xf = to_float(x)
    aug = xf.repeat(width, 1, 1, 1)
    i = j = 0
    for k, n, nv in plan:
        idx, v = rows[i:i + n], values[j:j + nv]
        sub = aug.index_select(0, idx)
        aug.index_copy_(0, idx, _affine(sub, v.view(n, 2, 3)) if k is None else augmix_op(sub, names[k], v))
        i, j = i + n, j + nv
    mix = values[j:j + b].view(b, 1, 1, 1) * xf
    mix += (values[j + b:].view(width, b, 1, 1, 1) * aug.view(width, *x.shape)).sum(0)
    return (mix * 255).to(torch.uint8) if x.dtype == torch.uint8 else mix.to(x.dtype)


def _to_device(t, device):
    """A fresh CPU tensor on the device without waiting for it (pinned memory, asynchronous copy)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class BatchAugMix:
    """augmix_batch with fixed settings: the --aug-device cuda counterpart of augmix()."""

    def __init__(self, severity=3, width=3, depth=-1, alpha=1.0, all_ops=False):
        self.kwargs = dict(severity=severity, width=width, depth=depth, alpha=alpha, all_ops=all_ops)

    def __call__(self, x, generator=None):
        return augmix_batch(x, generator=generator, **self.kwargs)


def augmix_views(base, n_aug, aug_device, severity=3, width=3, depth=-1, all_ops=False):
    """(loader transform, batched AugMix or None). --aug-device cpu: the loader workers make the n_aug
    AugMix views; cuda: they yield the clean crop only and the training loop makes the views on its
    device (device_views)."""
    if aug_device == "cpu" or not n_aug:
        return Views(base, augmix(severity, width, depth, all_ops=all_ops), n_aug), None
    return Views(base), BatchAugMix(severity, width, depth, all_ops=all_ops)


def device_views(views, device, batch_aug=None, n_aug=0):
    """One tensor [clean; aug_1; ...; aug_n] on the device, from a batch's views; with batch_aug the
    loader sent the clean crops only and the n_aug AugMix views are made here, on the device."""
    views = list(views) if isinstance(views, (list, tuple)) else [views]
    views = [v.to(device, non_blocking=True) for v in views]
    if batch_aug is not None:
        views += [batch_aug(views[0]) for _ in range(n_aug)]
    return torch.cat(views)


class Views:
    """Transform returning the clean view and n_aug AugMix views of one image, as floats in [0, 1].

    n_aug=0 gives a single tensor; n_aug>=1 a tuple (clean, aug_1, ..., aug_n) of the same crop,
    which is what the JSD loss (two augmented views) and the distillation (one) need.
    """

    def __init__(self, base, aug=None, n_aug=0):
        self.base, self.aug, self.n_aug = base, aug, n_aug

    def __call__(self, img):
        img = self.base(img)
        if not self.n_aug:
            return to_float(img)
        return (to_float(img), *(to_float(self.aug(img)) for _ in range(self.n_aug)))


# ----------------------------------------------------------------------------- loaders

class BlockSampler(Sampler):
    """Eval batches of one rank: blocks r, r + world, ... of `block` consecutive images. Every image is
    counted once (no padding), and block k holds the same images for any number of processes, so a
    per-block corruption seed gives identical images alone and under torchrun."""

    def __init__(self, n, block, rank=0, world=1):
        self.blocks = [list(range(i, min(i + block, n))) for i in range(rank * block, n, world * block)]

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self):
        return len(self.blocks)


def collate_skip(batch):
    """default_collate without the None items an unreadable image leaves behind (None if none are left)."""
    batch = [b for b in batch if b is not None]
    sizes = sorted({tuple(b[0].shape[-2:]) for b in batch if torch.is_tensor(b[0])})
    if len(sizes) > 1:   # on-disk sets are read without a resize (ImageNet-C's files are all 224 px)
        raise UserError(f"images of one set differ in size ({sizes[0]} and {sizes[-1]}): an on-disk corruption "
                        f"set must hold images of one size (224 px for ImageNet-C); regenerate or resize it")
    return default_collate(batch) if batch else None


class SeededSamples(Dataset):
    """Training items as (epoch seed, index) -> the item, its random augmentation drawn from a generator
    seeded by (epoch seed, index) alone. The draws then do not depend on which process loads the
    item or what was loaded before it, so a run resumed mid-epoch (its sampler skipping the consumed
    batches) sees the same images as an uninterrupted one; the caller's random state is left untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        seed, i = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 1_000_003 + i) % (1 << 63))
            return self.dataset[i]


class ResumableSampler(DistributedSampler):
    """DistributedSampler yielding (epoch seed, index) for SeededSamples; `start` items of this rank's
    epoch order are skipped (set_loader_epoch's skip_batches), while len() stays the whole epoch."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        epoch_seed = self.seed * 100_003 + self.epoch
        return iter([(epoch_seed, i) for i in list(super().__iter__())[self.start:]])


def make_loader(dataset, batch_size, workers, train, rank=0, world=1, seed=0, pin=False):
    """Train: shuffled, sharded over ranks (one code path also when alone), last partial batch dropped,
    augmentation seeded per item; call set_loader_epoch before each epoch. Eval: blocks of consecutive
    images, unpadded, each image on exactly one rank. pin: page-locked batches (when training on CUDA;
    never on the CPU, where it only touches CUDA, which a forked child cannot)."""
    common = dict(num_workers=workers, pin_memory=pin, collate_fn=collate_skip)
    if not train:
        return DataLoader(dataset, batch_sampler=BlockSampler(len(dataset), batch_size, rank, world), **common)
    sampler = ResumableSampler(dataset, world, rank, seed)
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, drop_last=True,
                      generator=torch.Generator(), **common)


def set_loader_epoch(loader, epoch, seed, skip_batches=0):
    """Make an epoch's shuffling and augmentation a function of (seed, epoch) alone, so a resumed run
    sees exactly the data an uninterrupted one would have seen; skip_batches: already trained on."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = skip_batches * loader.batch_size
    loader.generator.manual_seed(seed * 100_003 + epoch)  # worker seeds derive from this


# ----------------------------------------------------------------------------- ImageNet-C corruptions
# The 15 mCE corruptions (CORRUPTIONS) and the 4 held-out ones (EXTRA_CORRUPTIONS) follow the
# definitions and per-severity constants of the reference code (make_imagenet_c.py, imagenet_c/
# corruptions.py, make_tinyimagenet_c.py, make_cifar_c.py in github.com/hendrycks/robustness),
# re-written for whole batches: convolutions with explicit kernels (FFT for the large ones), separable
# Gaussians as matrix products, grid_sample/gather for warps and shuffles; no PIL, OpenCV, Wand, scipy.
# Gaussian/defocus/zoom blur, brightness, saturate, contrast match the reference functions to float
# round-off, JPEG bit for bit (libjpeg on the CPU, its arithmetic in torch ops on other devices),
# pixelate to 1/255, glass_blur's sequential sweep exactly, motion blur is ImageMagick's kernel, spatter
# follows OpenCV's Canny, distance transform and equalisation step by step. Departures, each documented
# in its function: elastic_transform interpolates once instead of twice, frost falls back to a
# procedural texture without the frost photographs.
#
# Constants by image size: the reference set whose size is nearest to side = min(H, W) on a log scale,
#   side <= 45:        CIFAR-10-C constants (make_cifar_c.py, 32 px), lengths scaled by side / 32;
#   46 <= side <= 119: Tiny ImageNet-C constants (make_tinyimagenet_c.py, 64 px), lengths scaled by side / 64;
#   side >= 120:       ImageNet-C constants (make_imagenet_c.py, 224 px), lengths scaled by side / 224.
# Lengths are blur radii and sigmas, glass-blur deltas, motion-blur radius/sigma, snow flake zoom,
# elastic displacement, spatter blob size, frost crop scale. Noise strengths, zoom factors,
# pixelate ratios, JPEG qualities and blend weights are used as published. The plasma map of fog is
# drawn at the next power of two >= the image side, as the reference does (256 for 224, 32 for 32).
#
# Deterministic given seed: every random draw comes from a seeded CPU torch.Generator and is then moved
# to x.device, so CPU and CUDA corrupt an image identically up to float round-off.
#
# Fidelity: test_fidelity.py pins every corruption's damage per severity (PSNR, mean absolute difference)
# to the original make_imagenet_c.py (224 px) and make_cifar_c.py (32 px), within 1 dB and 10%.
# Frost: ImageNet-C blends six frost photographs (frost1.png ... frost6.jpg, shipped with the imagenet_c
# and imagecorruptions packages); pass their folder as frost_dir to use them. Without them a procedural
# texture with the photographs' colour statistics is used: as damaging, but not the same pictures.
# Generated images are not the released files: those were drawn with numpy's RNG and saved as JPEG.

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")          # the 15 of mCE, this order
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # tuning only


# ----------------------------------------------------------------------------- helpers

def _reference_size(x):
    """32 (CIFAR-10-C), 64 (Tiny ImageNet-C) or 224 (ImageNet-C): the nearest on a log scale to min(H, W)."""
    side = min(x.shape[-2:])
    return min((32, 64, 224), key=lambda ref: abs(math.log(side / ref)))


def _pick(x, imagenet, tiny, cifar, severity):
    """(constants of the nearest reference size for this severity, factor for their pixel lengths)."""
    ref = _reference_size(x)
    table = {224: imagenet, 64: tiny, 32: cifar}[ref]
    return table[severity - 1], min(x.shape[-2:]) / ref


def _gaussian_matrix(n, sigma, device, truncate=4.0, mode="nearest"):
    """[n, n] matrix G with G @ v = scipy.ndimage.gaussian_filter1d(v, sigma, mode=mode, truncate=truncate);
    mode 'nearest' (skimage.filters.gaussian's default) or 'reflect' (d c b a | a b c d | d c b a)."""
    r = int(truncate * sigma + 0.5)
    if r == 0:
        return torch.eye(n, device=device)
    t = torch.arange(-r, r + 1, device=device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    j = torch.arange(n, device=device)[:, None] + t[None, :]
    if mode == "nearest":
        j = j.clamp(0, n - 1)
    else:  # reflection has period 2n, which also covers kernels wider than the signal
        j = j % (2 * n)
        j = torch.where(j >= n, 2 * n - 1 - j, j)
    return torch.zeros(n, n, device=device).scatter_add_(1, j, (w / w.sum()).expand(n, -1).contiguous())


def _separable(x, mat_h, mat_w):
    """mat_h @ x @ mat_w.T on the last two dims, as two large matrix products."""
    y = (x @ mat_w.T).transpose(-1, -2) @ mat_h.T
    return y.transpose(-1, -2)


def _gaussian_blur(x, sigma, truncate=4.0, mode="nearest"):
    """skimage.filters.gaussian (per channel) on [B, C, H, W]; exact borders for any sigma. Short
    kernels with 'nearest' borders: two 1-D convolutions of the replicated borders (a few flops a
    pixel); otherwise products with [n, n] matrices (any reach, 'reflect' too)."""
    h, w = x.shape[-2:]
    r = int(truncate * sigma + 0.5)
    if mode == "nearest" and 0 < r <= 16:
        t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        g = g / g.sum()
        y = _conv_planes(F.pad(x, (r, r, 0, 0), mode="replicate"), g[None, :])
        return _conv_planes(F.pad(y, (0, 0, r, r), mode="replicate"), g[:, None])
    return _separable(x, _gaussian_matrix(h, sigma, x.device, truncate, mode),
                      _gaussian_matrix(w, sigma, x.device, truncate, mode))


def _fast_len(n):
    """Smallest m >= n with no prime factor above 5 (quick FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _conv_planes(xp, kernel):
    """Correlate every [H, W] plane of xp [B, C, H + kh - 1, W + kw - 1] with kernel [kh, kw] or
    per-image kernels [B, kh, kw] (valid borders). The batch is folded into the channels: oneDNN's
    grouped convolution is ~30x faster on one image of B * C planes than on B images of C planes."""
    b, c, hp, wp = xp.shape
    kh, kw = kernel.shape[-2:]
    weight = kernel.expand(b * c, kh, kw) if kernel.dim() == 2 else kernel.repeat_interleave(c, 0)
    y = F.conv2d(xp.reshape(1, b * c, hp, wp), weight[:, None], groups=b * c)
    return y.view(b, c, hp - kh + 1, wp - kw + 1)


def _filter2d(x, kernel, pad_mode="reflect"):
    """Correlate each channel of x [B, C, H, W] with kernel [k, k] or per-image kernels [B, k, k] (k odd),
    like cv2.filter2D; borders padded with pad_mode ('reflect' = OpenCV's BORDER_REFLECT_101,
    'replicate' = ImageMagick's edge pixels). Direct up to 13 x 13, by FFT above (its cost does not
    depend on k)."""
    k = kernel.shape[-1]
    r = k // 2
    h, w = x.shape[-2:]
    if pad_mode == "reflect" and r >= min(h, w):
        pad_mode = "replicate"  # torch cannot reflect a border wider than the image
    xp = F.pad(x, (r, r, r, r), mode=pad_mode)
    if k <= 13:
        return _conv_planes(xp, kernel)
    size = (_fast_len(h + 2 * r), _fast_len(w + 2 * r))
    kern = kernel.flip(-1, -2)  # correlation = convolution with the flipped kernel
    kern = kern[:, None] if kern.dim() == 3 else kern
    y = torch.fft.irfft2(torch.fft.rfft2(xp, s=size) * torch.fft.rfft2(kern, s=size), s=size)
    return y[..., 2 * r:2 * r + h, 2 * r:2 * r + w]  # full convolution is offset by the kernel width


def _motion_taps(radius, sigma, angles):
    """ImageMagick's MotionBlurImage kernel (what Wand's motion_blur runs) as taps: width 2*ceil(radius)+1
    taps on a one-sided line at `angle` degrees (one per image), tap i at offset round(i*(cos, sin)) with
    weight exp(-i^2 / (2 sigma^2)), normalised. Returns offsets oy, ox [B, width] and weights [width]."""
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, device=angles.device, dtype=torch.float32)
    w = torch.exp(-i ** 2 / (2 * max(sigma, 1e-6) ** 2))
    th = angles.float()[:, None] * (math.pi / 180)
    ox = torch.ceil(i * torch.cos(th) - 0.5).long()  # ImageMagick rounds with ceil(v - 0.5)
    oy = torch.ceil(i * torch.sin(th) - 0.5).long()
    return oy, ox, w / w.sum()


def _motion_kernels(radius, sigma, angles):
    """The taps of _motion_taps as one [k, k] correlation kernel per angle -> [B, k, k], centred."""
    oy, ox, w = _motion_taps(radius, sigma, angles)
    b, width = oy.shape
    c = width - 1
    kern = torch.zeros(b, 2 * c + 1, 2 * c + 1, device=angles.device)
    bi = torch.arange(b, device=angles.device)[:, None].expand(-1, width)
    kern.index_put_((bi, c + oy, c + ox), w.expand(b, -1), accumulate=True)
    return kern


def _motion_blur(x, radius, sigma, angles):
    """Motion-blur x [B, C, H, W] with one angle (degrees) per image; edge pixels extend the border."""
    if radius <= 0:
        return x
    return _filter2d(x, _motion_kernels(radius, sigma, angles), pad_mode="replicate")


def _clipped_zoom(x, zoom):
    """Zoom into the centre by `zoom` >= 1 and keep the size (the reference clipped_zoom: crop
    ceil(side/zoom), scipy zoom with order 1, i.e. bilinear with aligned corners, trim the middle)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    oh, ow = max(h, round(ch * zoom)), max(w, round(cw * zoom))
    up = F.interpolate(x[..., top:top + ch, left:left + cw], size=(oh, ow), mode="bilinear",
                       align_corners=True)
    th, tw = (oh - h) // 2, (ow - w) // 2
    return up[..., th:th + h, tw:tw + w]


# Random numbers of the corruptions: a counter-based generator, so that each device makes them where they are
# used and every device makes the same ones. Two 32-bit keys come from the seeded CPU generator `gen`; each
# element's number is a keyed hash of its index: a Weyl step (index * golden ratio + key 1) through
# lowbias32 (C. Wellons' integer hash, a bijection of 32-bit words) with key 2 XORed in halfway. int32
# multiplies wrap identically on the CPU and on CUDA, so the uniforms are bit-identical everywhere, and
# normals (Box-Muller) equal up to the last bit of log/cos/sin. Drawing on the CPU and moving the numbers
# (as before) cost ~70 ms per 64 images at 224 px on a GPU host, more than a ViT-L forward pass; this is
# ~17 elementwise int32 passes: on the CPU 2.2x faster than torch.rand with 2 threads, 1.3x with one.
_GOLDEN, _M1, _M2 = 0x9E3779B1 - (1 << 32), 0x7FEB352D, 0x846CA68B - (1 << 32)   # as int32
_RAND_CHUNK = 1 << 17  # numbers per CPU thread and piece: the piece's int32 passes stay in L2


def _xorshift_(x, shift, tmp):
    """x ^= x >>> shift (logical shift: >> on int32 copies the sign, so the copies are masked off)."""
    torch.bitwise_right_shift(x, shift, out=tmp)
    return x.bitwise_xor_(tmp.bitwise_and_((1 << (32 - shift)) - 1))


def _hash_(x, k2, tmp, bits=False):
    """x = counter * golden + key 1 (int32) -> its U(0, 1) number, in place (k2: int or int32 tensor);
    bits: its 23 bits v instead (int32), the number being (v + 1/2) / 2^23."""
    _xorshift_(x, 16, tmp).mul_(_M1).bitwise_xor_(k2)
    _xorshift_(x, 15, tmp).mul_(_M2)
    _xorshift_(x, 16, tmp)
    x.bitwise_right_shift_(9).bitwise_and_(0x7FFFFF)  # the top 23 bits
    if bits:
        return x
    # as the mantissa of a float in [1, 2), then minus (1 - 2^-24): (v + 1/2) / 2^23
    return x.bitwise_or_(0x3F800000).view(torch.float32).sub_(1 - 2 ** -24)


def _rand_keys(gen):
    """The two int32 keys of one draw, from the seeded CPU generator."""
    return torch.randint(-(1 << 31), 1 << 31, (2,), generator=gen).tolist()


def _rand(shape, gen, device, bits=False):
    """U(0, 1) on a 2^-23 grid, (v + 1/2) / 2^23 for 23 hashed bits v (exact in float32: never 0 or 1), keyed
    by gen: the same numbers on every device. bits: v instead (int32)."""
    return _hashed(math.prod(shape), _rand_keys(gen), torch.device(device), bits).view(shape)


def _hashed(n, keys, device, bits=False):
    """The n numbers (or bits) of one key pair. On the CPU they are made in cache-sized pieces, so the
    passes stay in cache (the numbers do not depend on the piece size)."""
    _int32_room(n, "random numbers")  # the counters are int32
    k1, k2 = keys
    chunk = max(1, min(n, _RAND_CHUNK * torch.get_num_threads() if device.type == "cpu" else n))
    out = torch.empty(n, dtype=torch.int32, device=device)
    weyl = torch.arange(chunk, dtype=torch.int32, device=device).mul_(_GOLDEN)
    tmp = torch.empty(chunk, dtype=torch.int32, device=device)
    for start in range(0, n, chunk):
        x = out[start:start + chunk]
        torch.add(weyl[:len(x)], _int32(start * _GOLDEN + k1), out=x)   # (start + i) * golden + key 1
        _hash_(x, k2, tmp[:len(x)], bits)
    return out if bits else out.view(torch.float32)


def _rand_many(shapes, gen, device, small=1 << 14):
    """[_rand(shape, gen, device) for shape in shapes], the same numbers; the draws of fewer than `small`
    numbers made together, with a key pair per number (a draw's fixed cost is ~20 tensor operations)."""
    device, keys = torch.device(device), [_rand_keys(gen) for _ in shapes]
    sizes = [math.prod(shape) for shape in shapes]
    few = [i for i, n in enumerate(sizes) if n < small]
    out = {i: _hashed(sizes[i], keys[i], device) for i in range(len(sizes)) if sizes[i] >= small}
    if few:
        counts = torch.tensor([sizes[i] for i in few], device=device)
        first = counts.cumsum(0) - counts
        keys_each = torch.tensor([keys[i] for i in few], dtype=torch.int32, device=device).repeat_interleave(counts, 0)
        k1, k2 = keys_each.unbind(1)
        counter = torch.arange(int(counts.sum()), device=device) - first.repeat_interleave(counts)  # within its draw
        x = counter.int().mul_(_GOLDEN).add_(k1)
        out.update(zip(few, _hash_(x, k2, torch.empty_like(x)).split([sizes[i] for i in few])))
    return [out[i].view(shape) for i, shape in enumerate(shapes)]


def _int32_room(n, what):
    """int32 counters and indices hold fewer than 2^31 items: more at once are refused before any work."""
    if n >= 1 << 31:
        raise UserError(f"{n} {what} at once; corrupt fewer images per call (at most 2^31)")


def _int32(v):
    """v wrapped to a signed 32-bit integer (as int32 arithmetic would leave it)."""
    return (v + (1 << 31)) % (1 << 32) - (1 << 31)


def _randn(shape, gen, device):
    """N(0, 1) from _rand by Box-Muller, both of each pair's outputs used."""
    n = math.prod(shape)
    half = (n + 1) // 2
    u = _rand((2 * half,), gen, device)
    r, a = u[:half].log_().mul_(-2).sqrt_(), u[half:].mul_(2 * math.pi)
    cos = a.cos()
    a.sin_().mul_(r)  # in u's own memory: r sin(a), then r cos(a)
    r.mul_(cos)
    return u[:n].view(shape)


def _uniform(shape, low, high, gen, device):
    return _rand(shape, gen, device) * (high - low) + low


# ----------------------------------------------------------------------------- noise

def gaussian_noise(x, severity, gen):
    """x + N(0, c^2) per pixel and channel."""
    c, _ = _pick(x, (.08, .12, .18, .26, .38), (.04, .08, .12, .15, .18), (.04, .06, .08, .09, .10), severity)
    return _randn(x.shape, gen, x.device).mul_(c).add_(x).clamp_(0, 1)


@functools.lru_cache(maxsize=64)
def _poisson_tables(top, levels, bins, device):
    """For each level g = 0..levels: CDF of Poisson(top * g / levels) at k = 0..k_max (float32, [levels + 1,
    k_max + 1]); the exact quantiles of the uniform bin edges j / bins ([levels + 1, bins + 1]); and per
    bin [levels + 1, bins] one int32 that settles a draw U = (v + 1/2) / 2^23 in it (v = j * span + r,
    span = 2^23 / bins): with q its lower edge's quantile, q * span when the upper edge's is q too, q *
    span + span - t when it is q + 1 and U > CDF(q) from r = t on (then (entry + r) >> log2(span) is q +
    [r >= t]), and (-1 - q) * span where the CDF crosses the bin twice or more (a search decides)."""
    k_max = int(top + 7 * math.sqrt(top) + 10)  # CDF(k_max) rounds to 1 in float32 for every level
    rate = torch.arange(levels + 1, device=device, dtype=torch.float64)[:, None] * (top / levels)
    k = torch.arange(k_max + 1, device=device, dtype=torch.float64)
    logp = k * rate.clamp_min(1e-300).log() - rate - torch.lgamma(k + 1)
    cdf = torch.where(rate > 0, logp.exp(), (k == 0).double()).cumsum(1).float()
    cdf[:, -1] = 1
    edges = torch.arange(bins + 1, device=device, dtype=torch.float32) / bins
    quantile = torch.searchsorted(cdf, edges.expand(levels + 1, -1).contiguous())
    lower, steps = quantile[:, :-1], quantile.diff(dim=1)
    span = (1 << 23) // bins
    # U > CDF(q) <=> j * span + r + 1/2 > CDF(q) * 2^23 <=> r >= t (exact in float64)
    t = (cdf.gather(1, lower).double() * 2 ** 23 - torch.arange(bins, device=device) * span - 0.5).floor() + 1
    entry = torch.where(steps == 0, lower * span, torch.where(steps == 1, lower * span + span - t.long(),
                                                              (-1 - lower) * span))
    return cdf, quantile.int(), entry.int()


def _poisson(x, top, gen, levels=255, bins=1024):
    """Exact Poisson(top * x) draws (int) for x in [0, 1], by inversion with tables, at about the cost of
    the uniforms (torch.poisson draws one by one: 2-3x slower on the CPU, and it has no CPU-seeded path
    to CUDA).

    top * x = top * (g + f) / levels with g an integer level and 0 <= f < 1 (f = 0 for 8-bit images),
    so Poisson(top * x) = Poisson(top * g / levels) + Poisson(top * f / levels), independent. The first
    term inverts one uniform U with each level's CDF (_poisson_tables): the exact quantiles of the bin
    edges j / bins bracket U's quantile, so U's bin settles most draws by one look-up and one addition
    on U's bits, a binary search the rest (bins the CDF crosses twice or more: its tails). The second
    term, small, inverts a second uniform by sequential search; it is drawn only when some f exceeds
    1e-3 (levels within 1e-3 of an integer count as 8-bit input: rate error < 4e-6 top)."""
    shift = 23 - int(math.log2(bins))
    if bins != 1 << (23 - shift):
        raise ValueError(f"_poisson: bins must be a power of 2 up to 2^23, got {bins}")
    cdf, quantile, entry = _poisson_tables(top, levels, bins, x.device)
    row_len = cdf.shape[1]
    level = x.flatten() * levels
    g = level.add(1e-3).int()  # floor: level >= 0
    v = _rand(level.shape, gen, x.device, bits=True)  # U = (v + 1/2) / 2^23: its bin is v >> shift
    cell = torch.bitwise_right_shift(v, shift).add_(g, alpha=bins)  # in row g of the [levels + 1, bins] table
    draw = entry.view(-1).index_select(0, cell).add_(v.bitwise_and_((1 << shift) - 1)).bitwise_right_shift_(shift)
    idx = (draw < 0).nonzero()[:, 0]
    if len(idx):
        cell = cell[idx]  # v holds r = v mod span now: U = ((j << shift) + r + 1/2) / 2^23, exactly
        u = cell.sub(g[idx], alpha=bins).mul_(1 << shift).add_(v[idx]).float().add_(0.5).mul_(2 ** -23)
        row, lo = g[idx] * row_len, -1 - draw[idx]
        hi = quantile.view(-1)[cell + cell // bins + 1]  # the upper edge: row g, column j + 1 of [levels + 1, bins + 1]
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            ok = cdf.view(-1)[row + mid] >= u
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid + 1)
        draw[idx] = lo
    frac = level.sub_(g)
    if float(frac.amax()) > 1e-3:  # not 8-bit: add Poisson(top * f / levels)
        frac = frac.clamp_(min=0) * (top / levels)
        u2 = _rand(level.shape, gen, x.device)
        p = torch.exp(-frac)
        idx = (u2 > p).nonzero()[:, 0]
        p, total, u2, frac = p[idx], p[idx], u2[idx], frac[idx]
        for n in range(1, 4 * int(top / levels) + 20):  # the tail beyond is below float resolution
            if not len(idx):
                break
            draw.index_add_(0, idx, torch.ones_like(idx, dtype=draw.dtype))
            p = p * frac / n
            total = total + p
            more = u2 > total
            idx, p, total, u2, frac = idx[more], p[more], total[more], u2[more], frac[more]
    return draw.view(x.shape)


def shot_noise(x, severity, gen):
    """Poisson(x * c) / c: photon noise with c photons for a white pixel."""
    c, _ = _pick(x, (60, 25, 12, 5, 3), (250, 100, 50, 30, 15), (500, 250, 100, 75, 50), severity)
    return torch.div(_poisson(x, c, gen), c).clamp_(0, 1)


def impulse_noise(x, severity, gen):
    """Salt and pepper (skimage random_noise 's&p'): a fraction c of the values, channels independent,
    set to 0 or 1 with equal odds."""
    c, _ = _pick(x, (.03, .06, .09, .17, .27), (.01, .02, .05, .08, .14), (.01, .02, .03, .05, .07), severity)
    u = _rand(x.shape, gen, x.device)
    salt = torch.lt(u, c / 2, out=torch.empty_like(u))  # comparisons into float, not bool: 2x faster on the CPU
    keep = torch.ge(u, c, out=torch.empty_like(u)).add_(salt)  # 1 where x stays or turns 1, 0 where it turns 0
    return torch.clamp(x, salt, keep)  # (x in [0, 1]) a clamp instead of torch.where: 2x faster again


def speckle_noise(x, severity, gen):
    """x + x * N(0, c^2): noise proportional to intensity."""
    c, _ = _pick(x, (.15, .2, .35, .45, .6), (.15, .2, .25, .3, .35), (.06, .1, .12, .16, .2), severity)
    return _randn(x.shape, gen, x.device).mul_(c).mul_(x).add_(x).clamp_(0, 1)


# ----------------------------------------------------------------------------- blur

def gaussian_blur(x, severity, gen):
    """skimage Gaussian blur with sigma c (pixels; 'nearest' borders, truncated at 4 sigma)."""
    c, s = _pick(x, (1, 2, 3, 4, 6), (.5, .75, 1, 1.25, 1.5), (.4, .6, .7, .8, 1), severity)
    return _gaussian_blur(x, c * s).clamp_(0, 1)


def _disk(radius, alias_blur, device):
    """The reference's defocus kernel: a normalised disk on an integer grid (at least 17x17), smoothed by
    a 3x3 (radius <= 8) or 5x5 Gaussian of sigma alias_blur (cv2.GaussianBlur, reflect-101 borders),
    cropped to its non-zero support (weights below 1e-30 count as zero)."""
    half = 8 if radius <= 8 else math.ceil(radius)
    ksize = 3 if radius <= 8 else 5
    t = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()
    g = torch.exp(-(torch.arange(ksize, device=device) - (ksize - 1) / 2) ** 2 / (2 * alias_blur ** 2))
    g = g / g.sum()
    p = ksize // 2
    disk = F.conv2d(F.pad(disk[None, None], (p, p, p, p), mode="reflect"), (g[:, None] * g[None, :])[None, None])[0, 0]
    disk = torch.where(disk < 1e-30, 0, disk)  # denormal weights: invisible in float32, slow on the CPU
    nz = torch.nonzero(disk)
    r = int((nz - half).abs().max()) if len(nz) else 0
    return disk[half - r:half + r + 1, half - r:half + r + 1]


def defocus_blur(x, severity, gen):
    """Convolution with an anti-aliased disk of radius c[0] (alias blur c[1])."""
    c, s = _pick(x, ((3, .1), (4, .5), (6, .5), (8, .5), (10, .5)),
                 ((.5, .6), (1, .1), (1.5, .1), (2.5, .01), (3, .1)),
                 ((.3, .4), (.4, .5), (.5, .6), (1, .2), (1.5, .1)), severity)
    return _filter2d(x, _disk(c[0] * s, c[1], x.device)).clamp_(0, 1)


@functools.lru_cache(maxsize=16)
def _sweep_order(h, w, delta):
    """The reference's glass-blur sweep: rows h-delta .. delta+1 bottom to top, in each the columns
    w-delta .. delta+1 right to left. Returns (the visited flat positions in the order their offsets
    are drawn, the visit time of every pixel [h * w], h * w for pixels never visited). The draw order
    is by wave number (last column - q) + 2*delta*(last row - r), the order of an earlier wave-by-wave
    implementation: a convention (any fixed order draws the same distribution) that the pinned outputs
    and the measured numbers depend on."""
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    visited = (rows > delta) & (rows <= h - delta) & (cols > delta) & (cols <= w - delta)
    visit = torch.where(visited, (h - delta - rows) * w + (w - delta - cols), h * w).flatten()
    wave = (w - delta - cols) + 2 * delta * (h - delta - rows)
    pos = torch.arange(h * w)[visited.flatten()].flip(0)  # in sweep order, which breaks the wave ties
    return pos[torch.argsort(wave.flatten()[pos], stable=True)], visit


def _follow_copies(src, visit):
    """The sweep of the reference done at once: pixel p, at time visit[p], takes the value that pixel
    src[p] holds then (src[p] = p for pixels never visited). Each pixel is written once, at its visit,
    so it ends with the original value of src[p] if src[p] is visited later (or never), else with what
    src[p] took: follow those links to their end by pointer doubling (chains are short). Returns, for
    each pixel, the pixel whose original value it ends with."""
    ident = torch.arange(len(src), device=src.device, dtype=src.dtype)
    hop = torch.where(visit.index_select(0, src) < visit, src, ident)  # index_select: ~3x faster than x[i]
    while not torch.equal(jump := hop.index_select(0, hop), hop):
        hop = jump
    return src.index_select(0, hop)


def glass_blur(x, severity, gen):
    """Gaussian blur (sigma c[0]), c[2] sweeps of local pixel moves within c[1] pixels, blur again.

    The reference visits every pixel from the bottom-right to the top-left in a Python loop and "swaps"
    it with the pixel at a random offset in [-max_delta, max_delta) on each axis. Its swap,
    x[h, w], x[h', w'] = x[h', w'], x[h, w], assigns numpy views, so it copies the neighbour into (h, w)
    and leaves the neighbour as it was: each visited pixel takes the value its neighbour holds at that
    moment (seconds per 224 px image). Here the same copies, with the same distribution, are composed
    into one map of pixel indices for the whole batch at once (_follow_copies: a handful of gathers on
    any device); then one gather moves the pixels. Lengths scale with the image side."""
    c, s = _pick(x, ((.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
                 ((.1, 1, 1), (.5, 1, 1), (.6, 1, 2), (.7, 2, 1), (.9, 2, 2)),
                 ((.05, 1, 1), (.25, 1, 1), (.4, 1, 1), (.25, 1, 2), (.4, 1, 2)), severity)
    sigma, delta, rounds = c[0] * s, max(1, round(c[1] * s)), c[2]
    b, ch, h, w = x.shape
    x = torch.floor(_gaussian_blur(x, sigma).clamp(0, 1) * 255) / 255  # the reference goes through uint8 here
    pos, visit = _sweep_order(h, w, delta)
    dev, total = x.device, b * h * w
    _int32_room(total, "glass_blur pixels")
    # pixel indices in int32: the gathers below are random reads, and half the bytes stay in cache
    visit = visit.to(dev, torch.int32).repeat(b)
    here = (pos.to(dev)[:, None] + torch.arange(b, device=dev) * (h * w)).flatten()  # images inner
    here32 = here.int()  # (index_copy_ takes int64 indices only)
    perm = torch.arange(total, device=dev, dtype=torch.int32)  # the source pixel now at flat position p (image-major)
    for _ in range(rounds):
        off = _rand((len(pos), b, 2), gen, dev).mul_(2 * delta).int().sub_(delta)   # uniform in [-delta, delta)
        moved = here32 + (off[..., 1] * w + off[..., 0]).flatten()  # (dy, dx) as the reference draws (dx, dy)
        src = torch.arange(total, device=dev, dtype=torch.int32).index_copy_(0, here, moved)
        perm = perm.index_select(0, _follow_copies(src, visit))
    x = x.transpose(0, 1).reshape(ch, total).index_select(1, perm)
    x = x.view(ch, b, h, w).transpose(0, 1).contiguous()
    return _gaussian_blur(x, sigma).clamp_(0, 1)


def motion_blur(x, severity, gen):
    """ImageMagick motion blur (radius c[0], sigma c[1]) at a uniform random angle in [-45, 45) degrees,
    one angle per image."""
    c, s = _pick(x, ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
                 ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
                 ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)), severity)
    angles = _uniform((x.shape[0],), -45, 45, gen, x.device)
    return _motion_blur(x, c[0] * s, c[1] * s, angles).clamp(0, 1)


def zoom_blur(x, severity, gen):
    """Average of the image and its centre zooms by each factor in np.arange(1, stop, step)."""
    small = ((1.06, .01), (1.11, .01), (1.16, .01), (1.21, .01), (1.26, .01))  # Tiny and CIFAR alike
    c, _ = _pick(x, ((1.11, .01), (1.16, .01), (1.21, .02), (1.26, .02), (1.31, .03)), small, small, severity)
    zooms = np.arange(1, c[0], c[1])
    out = x.clone()
    for z in zooms:
        out += _clipped_zoom(x, float(z))
    return out.div_(len(zooms) + 1).clamp_(0, 1)


# ----------------------------------------------------------------------------- weather

def snow(x, severity, gen):
    """Flakes: N(c[0], c[1]) noise zoomed by c[2], values below c[3] dropped, motion-blurred (radius c[4],
    sigma c[5], angle in [-135, -45)), added twice (once rotated 180 degrees) to the image whitened
    towards 1.5*gray + 0.5 with weight 1 - c[6]."""
    c, s = _pick(x, ((.1, .3, 3, .5, 10, 4, .8), (.2, .3, 2, .5, 12, 4, .7), (.55, .3, 4, .9, 12, 8, .7),
                     (.55, .3, 4.5, .85, 12, 8, .65), (.55, .3, 2.5, .85, 12, 12, .55)),
                 ((.1, .2, 1, .6, 8, 3, .8), (.1, .2, 1, .5, 10, 4, .8), (.15, .3, 1.75, .55, 10, 4, .7),
                  (.25, .3, 2.25, .6, 12, 6, .65), (.3, .3, 1.25, .65, 14, 12, .6)),
                 ((.1, .2, 1, .6, 8, 3, .95), (.1, .2, 1, .5, 10, 4, .9), (.15, .3, 1.75, .55, 10, 4, .9),
                  (.25, .3, 2.25, .6, 12, 6, .85), (.3, .3, 1.25, .65, 14, 12, .8)), severity)
    b, _, h, w = x.shape
    flakes = c[0] + c[1] * _randn((b, 1, h, w), gen, x.device)
    flakes = _clipped_zoom(flakes, max(1.0, c[2] * s))
    flakes = flakes.masked_fill_(flakes < c[3], 0)
    flakes = flakes.clamp_(0, 1).mul_(255).floor_().div_(255)  # the reference saves the layer as 8-bit PNG
    angles = _uniform((b,), -135, -45, gen, x.device)
    flakes = _motion_blur(flakes, c[4] * s, c[5] * s, angles)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = torch.mul(x, c[6]).add_(torch.maximum(x, gray.mul_(1.5).add_(0.5)).mul_(1 - c[6]))
    return x.add_(flakes).add_(flakes.flip(-1, -2)).clamp_(0, 1)


FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
_frost_cache = {}  # (path, mtime, H, W, factor) -> float [3, h, w] on the CPU, resized for that size


def _frost_image(path, h, w, factor):
    """A frost photograph as float [3, h', w'] in [0, 1], resized by `factor` but never below h x w."""
    key = (path, os.path.getmtime(path), h, w, factor)
    if key not in _frost_cache:
        img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB).float() / 255
        fh, fw = img.shape[-2:]
        factor = max(factor, h / fh, w / fw)
        size = (max(h, round(fh * factor)), max(w, round(fw * factor)))
        if size != (fh, fw):
            img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        _frost_cache[key] = img.clamp(0, 1)
    return _frost_cache[key]


# Crops of the five frost photographs the reference draws from (frost1.png ... frost5.jpg), measured on
# 300 random 224 px crops each: mean colour, spread of the crop means, and spread within a crop (0-1).
# The 0.2x resized 32 px crops of CIFAR-10-C agree within 0.01 (0.02 for the spread of means).
FROST_PHOTO_STATS = (((.298, .577, .642), .037, (.092, .055, .052)),
                     ((.776, .793, .829), .025, (.077, .079, .082)),
                     ((.776, .793, .830), .024, (.076, .078, .081)),
                     ((.567, .625, .675), .025, (.102, .103, .108)),
                     ((.394, .439, .486), .045, (.141, .139, .137)))


def _procedural_frost(b, h, w, gen, device):
    """Stand-in for the frost photographs: a texture of cloudy ice covered with straight crystal
    needles in three directions (sizes relative to the image), given per image the colour statistics of
    a crop of one of the five photographs the reference draws from (FROST_PHOTO_STATS: mean colour with
    its crop-to-crop spread, and the spread within a crop). So the blend c[0] * x + c[1] * frost damages
    images as much as the photographs do (test_fidelity.py); its look is not theirs."""
    side = min(h, w)
    cloud = _rand((b, 1, 17, 17), gen, device) * 0.1  # value noise, 4 octaves
    for cells, weight in ((2, .4), (4, .3), (8, .2)):
        n = _rand((b, 1, cells + 1, cells + 1), gen, device)
        cloud += weight * F.interpolate(n, size=(17, 17), mode="bicubic", align_corners=True)
    cloud = F.interpolate(cloud, size=(h, w), mode="bicubic", align_corners=True)
    cloud = cloud.sub_(0.2).div_(0.6).clamp_(0, 1)
    # 150 seeds per image, each the origin of crystal needles in three directions (motion-blur taps of
    # radius 0.2 side, weights scaled to 1 at the seed), stamped with one scatter-add
    _int32_room(b * h * w, "frost pixels")
    seed_at = (_rand((b, 150, 1, 2), gen, device) * torch.tensor([h, w], device=device)).int()
    strength = _rand((b, 150, 1), gen, device)
    taps = [_motion_taps(0.2 * side, 0.1 * side, _uniform((b,), 0, 360, gen, device)) for _ in range(3)]
    dy, dx = (torch.cat([t[k] for t in taps], 1)[:, None].int() for k in (0, 1))  # [b, 1, 3 * width]
    weight = torch.cat([t[2] / t[2][0] for t in taps])  # [3 * width]
    y, x = seed_at[..., 0] - dy, seed_at[..., 1] - dx  # [b, 150, 3 * width]; correlation flips the taps
    outside = (y < 0) | (y >= h) | (x < 0) | (x >= w)
    image = torch.arange(b, device=device, dtype=torch.int32)[:, None, None]
    at = ((image * h + y) * w + x).masked_fill_(outside, b * h * w)
    needles = torch.zeros(b * h * w + 1, device=device)  # the last slot takes the taps off the image
    needles.index_add_(0, at.view(-1), (strength * weight).expand_as(at).reshape(-1))
    needles = needles[:-1].view(b, 1, h, w)
    needles = _gaussian_blur(needles, 0.3 + 0.5 * side / 224).clamp_(0, 1).sqrt_()
    lit = cloud.mul(0.7).add_(0.3)  # in place from here on: tex = 0.35 cloud + 0.6 needles (0.3 + 0.7 cloud)
    tex = cloud.mul_(0.35).add_(needles.mul_(0.6).mul_(lit))
    centre, spread = tex.mean(dim=(2, 3), keepdim=True), tex.std(dim=(2, 3), keepdim=True)
    tex = tex.sub_(centre).div_(spread.clamp_min(1e-6))
    stats = torch.tensor([[*mean, spread, *sd] for mean, spread, sd in FROST_PHOTO_STATS])
    pick = stats[torch.randint(len(stats), (b,), generator=gen, device=gen.device)]  # [b, 7]
    mean = pick[:, :3] + pick[:, 3:4] * torch.randn((b, 1), generator=gen, device=gen.device)
    mean, sd = mean.to(device)[:, :, None, None], pick[:, 4:].to(device)[:, :, None, None]
    return torch.mul(sd, tex).add_(mean).clamp_(0, 1)


def frost(x, severity, gen, frost_dir=None):
    """c[0] * x + c[1] * frost, frost a random crop of one of the ImageNet-C frost photographs.

    With frost_dir holding frost1.png, frost2.png, frost3.png, frost4.jpg, frost5.jpg, frost6.jpg those
    files are used: a file chosen at random per image (like the reference, only the first five of the
    six are ever drawn; fewer files present -> those present), resized by side/224 (ImageNet-C),
    0.3 * side/64 (Tiny ImageNet-C) or 0.2 * side/32 (CIFAR-10-C), randomly cropped.
    Without frost_dir, or if it holds none of the files, a procedural frost texture is used instead;
    its results are not comparable to the released ImageNet-C."""
    c, s = _pick(x, ((1, .4), (.8, .6), (.7, .7), (.65, .7), (.6, .75)),
                 ((1, .3), (.9, .4), (.8, .45), (.75, .5), (.7, .55)),
                 ((1, .2), (1, .3), (.9, .4), (.85, .4), (.75, .45)), severity)
    b, _, h, w = x.shape
    paths = [os.path.join(frost_dir, f) for f in FROST_FILES] if frost_dir else []
    paths = [p for p in paths if os.path.isfile(p)][:5]
    if not paths:
        layer = _procedural_frost(b, h, w, gen, x.device)
    else:
        factor = {224: 1.0, 64: 0.3, 32: 0.2}[_reference_size(x)] * s  # how much the reference shrinks them
        imgs = [_frost_image(p, h, w, factor) for p in paths]
        pick = torch.randint(len(imgs), (b,), generator=gen, device=gen.device)
        u = torch.rand((b, 2), generator=gen, device=gen.device)
        layer = torch.empty(b, 3, h, w)
        iy, ix = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
        for k, img in enumerate(imgs):  # one gather per file, all its images at once
            rows = torch.nonzero(pick == k)[:, 0]
            if len(rows):
                y0 = (u[rows, 0] * max(1, img.shape[1] - h)).long()[:, None, None]
                x0 = (u[rows, 1] * max(1, img.shape[2] - w)).long()[:, None, None]
                layer[rows] = img[:, y0 + iy, x0 + ix].transpose(0, 1)
        layer = layer.to(x.device)
    return torch.add(c[0] * x, layer, alpha=c[1]).clamp_(0, 1)


def _plus_rolled(a, b, shift, dim):
    """a + b.roll(shift, dim) for shift +-1, without making the rolled copy."""
    n, out = a.shape[dim], torch.empty_like(a)
    lo, hi = (1, 0) if shift == 1 else (0, 1)  # out[i] = a[i] + b[i - shift] away from the wrapped end
    torch.add(a.narrow(dim, lo, n - 1), b.narrow(dim, hi, n - 1), out=out.narrow(dim, lo, n - 1))
    end = n - 1 if shift == -1 else 0
    torch.add(a.narrow(dim, end, 1), b.narrow(dim, (end - shift) % n, 1), out=out.narrow(dim, end, 1))
    return out


def _plasma_fractal(b, mapsize, wibbledecay, gen, device):
    """Diamond-square height map [b, mapsize, mapsize] in [0, 1] (the reference's plasma_fractal),
    vectorised over the batch and over each level's squares and diamonds: each level turns the n x n
    grid of corners into the 2n x 2n grid of corners, square centres and the two kinds of diamonds."""
    levels = mapsize.bit_length() - 1  # grids of 1, 2, ..., mapsize / 2 corners; three draws each
    noise = iter(_rand_many([(b, 1 << k, 1 << k) for k in range(levels) for _ in range(3)], gen, device))
    wibble = 100.0

    def wibbled_mean(total):
        return total.div_(4).add_(next(noise).mul_(2 * wibble).sub_(wibble).mul_(wibble))  # + wibble * U(-w, w)

    corner = torch.zeros(b, 1, 1, device=device)
    for _ in range(levels):
        centre = wibbled_mean(_plus_rolled(s := _plus_rolled(corner, corner, -1, 1), s, -1, 2))
        top = wibbled_mean(_plus_rolled(_plus_rolled(centre, centre, 1, 1) + corner, corner, -1, 2))
        left = wibbled_mean(_plus_rolled(_plus_rolled(centre, centre, 1, 2) + corner, corner, -1, 1))
        rows = (torch.stack([corner, top], -1).flatten(-2), torch.stack([left, centre], -1).flatten(-2))
        corner = torch.stack(rows, 2).flatten(1, 2)  # [b, 2n, 2n]: corners and tops, then lefts and centres
        wibble /= wibbledecay
    m = corner - corner.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def fog(x, severity, gen):
    """(x + c[0] * plasma) * max / (max + c[0]), plasma a diamond-square fractal with roughness c[1]."""
    c, _ = _pick(x, ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
                 ((.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
                 ((.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)), severity)
    b, _, h, w = x.shape
    mapsize = 1 << math.ceil(math.log2(max(h, w)))
    plasma = _plasma_fractal(b, mapsize, c[1], gen, x.device)[:, None, :h, :w]
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.add(x, plasma, alpha=c[0]).mul_(top / (top + c[0])).clamp_(0, 1)


def _dilate3(m):
    """3x3 maximum filter of [..., H, W] (borders padded with 0) as two passes of shifted maxima,
    several times cheaper than max_pool2d on the CPU (and bool maps far cheaper than float)."""
    p = F.pad(m, (1, 1, 1, 1))
    m = torch.maximum(torch.maximum(p[..., :-2, :], p[..., 1:-1, :]), p[..., 2:, :])
    return torch.maximum(torch.maximum(m[..., :-2], m[..., 1:-1]), m[..., 2:])


def _box3(x):
    """cv2.blur(x, (3, 3)): 3x3 mean, reflect-101 borders (sums of shifted slices: avg_pool2d is
    several times slower on the CPU)."""
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    p = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    return (p[..., :-2] + p[..., 1:-1] + p[..., 2:]).div_(9)


def _canny(img, low, high):
    """cv2.Canny(img, low, high) on integer-valued [B, 1, H, W]: 3x3 Sobel (replicated borders), L1
    magnitude, non-maximum suppression along the gradient direction quantised as OpenCV does, then
    hysteresis (weak edges kept when 8-connected to a strong one). Returns a bool edge map."""
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[-1., 0, 1], [-2, 0, 2], [-1, 0, 1]], device=img.device)
    dx = _conv_planes(p, sobel)
    dy = _conv_planes(p, sobel.T)
    ax, ay = dx.abs(), dy.abs()
    mag = ax + ay
    m = F.pad(mag, (1, 1, 1, 1))  # OpenCV's magnitude buffer has zero borders

    def at(oy, ox):
        return m[..., 1 + oy:m.shape[-2] - 1 + oy, 1 + ox:m.shape[-1] - 1 + ox]

    tg22 = ax * 0.4142135623730950  # OpenCV: |dy| < |dx| tan(22.5) horizontal, > |dx| tan(67.5) vertical
    tg67 = ax * 2.4142135623730950
    horizontal = (mag > at(0, -1)) & (mag >= at(0, 1))
    vertical = (mag > at(-1, 0)) & (mag >= at(1, 0))
    same = (dx * dy) >= 0  # OpenCV's s = +1: compare with (y-1, x-1) and (y+1, x+1)
    diagonal = torch.where(same, (mag > at(-1, -1)) & (mag > at(1, 1)), (mag > at(-1, 1)) & (mag > at(1, -1)))
    peak = torch.where(ay < tg22, horizontal, torch.where(ay > tg67, vertical, diagonal)) & (mag > low)
    edges = peak & (mag > high)
    while True:  # grow the strong edges through the weak ones (bool maps: 30x faster than float)
        grown = _dilate3(edges) & peak
        if torch.equal(grown, edges):
            return edges
        edges = grown


def _distance_to(edges, cap):
    """Euclidean distance of each pixel to the nearest True pixel of edges [B, 1, H, W], cut at cap
    (cv2.distanceTransform(255 - edges, DIST_L2, 5) then THRESH_TRUNC at cap): per-row distances to the
    nearest edge, then the minimum over rows within cap, in exact integers (int16 where they fit: half
    the memory traffic of float32)."""
    h = edges.shape[-2]
    r = int(cap) + 1
    dtype = torch.int16 if 2 * r * r < 2 ** 15 else torch.int32
    left = torch.where(edges, 0, r).to(dtype)  # distance to the nearest edge on the left, then right
    right = left.clone()
    step = 1
    while step < r:  # by doubling: after steps 1, 2, ..., s every distance below 2 s is exact
        left[..., step:] = torch.minimum(left[..., step:], left[..., :-step] + step)
        right[..., :-step] = torch.minimum(right[..., :-step], right[..., step:] + step)
        step *= 2
    row = torch.minimum(left, right).clamp_(max=r)
    row = row * row
    padded = F.pad(row, (0, 0, r, r), value=r * r)
    best, shifted = row.clone(), torch.empty_like(row)
    for dy in range(1, r):  # rows dy >= r away add dy^2 >= r^2 >= best: never nearer
        torch.minimum(padded[..., r - dy:r - dy + h, :], padded[..., r + dy:r + dy + h, :], out=shifted)
        torch.minimum(best, shifted.add_(dy * dy), out=best)  # the nearer of the rows above and below
    return best.float().sqrt_().clamp_(max=cap)


def spatter(x, severity, gen):
    """Water (severities 1-3) or mud (4-5) splashes: N(c[0], c[1]) noise blurred with sigma c[2],
    kept above c[3].

    Mud: the mask blurred with sigma c[4], kept above 0.8, brown. Water follows the reference step by
    step: the liquid layer as uint8, its Canny edges, the distance to them (Euclidean, cut at 20 px;
    OpenCV's 5x5 chamfer differs by < 2%), 3x3 mean, uint8, histogram equalisation per image, the
    emboss kernel saturated to uint8, 3x3 mean; liquid times that map, scaled to a maximum of c[4], adds
    pale turquoise. Lengths (blur sigma, the 20 px cut) scale with the image side."""
    c, s = _pick(x, ((.65, .3, 4, .69, .6, 0), (.65, .3, 3, .68, .6, 0), (.65, .3, 2, .68, .5, 0),
                     (.65, .3, 1, .65, 1.5, 1), (.67, .4, 1, .65, 1.5, 1)),
                 ((.62, .1, .7, .7, .6, 0), (.65, .1, .8, .7, .6, 0), (.65, .3, 1, .69, .6, 0),
                  (.65, .1, .7, .68, .6, 1), (.65, .1, .5, .67, .6, 1)),
                 ((.62, .1, .7, .7, .5, 0), (.65, .1, .8, .7, .5, 0), (.65, .3, 1, .69, .5, 0),
                  (.65, .1, .7, .69, .6, 1), (.65, .1, .5, .68, .6, 1)), severity)
    b, _, h, w = x.shape
    liquid = c[0] + c[1] * s * _randn((b, 1, h, w), gen, x.device)  # std scaled so the blurred field
    liquid = _gaussian_blur(liquid, c[2] * s)  # (and so the splash density) does not depend on the size
    liquid = liquid.masked_fill_(liquid < c[3], 0)
    if c[5] == 1:  # mud
        m = _gaussian_blur((liquid > c[3]).float(), c[4] * s)
        m = torch.where(m < 0.8, 0, m)
        brown = torch.tensor([63, 42, 20], device=x.device).view(1, 3, 1, 1) / 255
        return (x * (1 - m) + brown * m).clamp(0, 1)
    liquid = liquid.clamp_(0, 1).mul_(255).floor_()  # uint8, as the reference
    dist = _distance_to(_canny(liquid, 50, 150), 20 * s)
    dist = _box3(dist).floor_()
    idx = dist.view(b, -1).long()  # cv2.equalizeHist, per image
    hist = torch.zeros(b, int(idx.max()) + 1, device=x.device).scatter_add_(1, idx, torch.ones_like(dist.view(b, -1)))
    cdf = hist.cumsum(1)
    first = torch.where(cdf > 0, cdf, cdf.new_tensor(float("inf"))).amin(1, keepdim=True)
    lut = torch.round((cdf - first) * 255 / (h * w - first).clamp_min(1)).clamp(0, 255)
    dist = lut.gather(1, idx).view(b, 1, h, w)
    emboss = torch.tensor([[-2., -1, 0], [-1, 1, 1], [0, 1, 2]], device=x.device)
    dist = _filter2d(dist, emboss).clamp_(0, 255)  # cv2.filter2D, reflect-101 borders
    m = liquid.mul_(_box3(dist))
    m = m.div_(m.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)).mul_(c[4])
    turquoise = torch.tensor([175, 238, 238], device=x.device).view(1, 3, 1, 1) / 255
    return torch.addcmul(x, m, turquoise).clamp_(0, 1)


# ----------------------------------------------------------------------------- digital

def brightness(x, severity, gen):
    """HSV value + c. With hue and saturation fixed every channel is proportional to the value V, so the
    HSV round trip is x * V'/V (grey V' where V = 0)."""
    c, _ = _pick(x, (.1, .2, .3, .4, .5), (.1, .2, .3, .4, .5), (.05, .1, .15, .2, .3), severity)
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    black = torch.eq(v, 0, out=torch.empty_like(v)).mul_(v2)  # v2 where V = 0 (x is 0 there), else 0
    return torch.addcmul(black, x, v2 / v.clamp_min(1e-12)).clamp_(0, 1)  # no 3-channel torch.where


def contrast(x, severity, gen):
    """(x - mean) * c + mean, mean per image and channel."""
    c, _ = _pick(x, (.4, .3, .2, .1, .05), (.4, .3, .2, .1, .05), (.75, .5, .4, .3, .15), severity)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return torch.lerp(mean, x, c)  # (x - mean) * c + mean, inside [0, 1] already


def saturate(x, severity, gen):
    """HSV saturation * c[0] + c[1]. With hue and value fixed, V - channel is proportional to S.
    Grey pixels have hue 0 in skimage, so a positive c[1] tints them red, as in the reference."""
    c, _ = _pick(x, ((.3, 0), (.1, 0), (2, 0), (5, .1), (20, .2)), ((.3, 0), (.1, 0), (2, 0), (5, .1), (30, .2)),
                 ((.3, 0), (.1, 0), (1.5, 0), (2, .1), (2.5, .2)), severity)
    v = x.amax(dim=1, keepdim=True)
    delta = v - x.amin(dim=1, keepdim=True)
    sat = delta / v.clamp_min(1e-12)  # 0 where delta is
    sat2 = (sat * c[0] + c[1]).clamp(0, 1)
    colour = v - (v - x) * (sat2 / sat.clamp_min(1e-12))  # grey pixels (x = v): v
    if c[1] > 0:  # grey pixels turn hsv2rgb at hue 0: (v, v (1 - sat2), v (1 - sat2))
        coloured = torch.gt(delta, 0, out=torch.empty_like(delta))
        grey = (v * (1 - sat2)).mul_(1 - coloured)
        colour[:, 1:] = torch.addcmul(grey, colour[:, 1:], coloured)  # no 3-channel torch.where
    return colour.clamp_(0, 1)


def elastic_transform(x, severity, gen):
    """Random affine (the three control points moved by up to c[2] px, reflect-101 borders) followed by a
    smooth displacement field: uniform(-1, 1) noise, Gaussian-blurred with sigma c[1] (reflect, truncated
    at 3 sigma), times c[0].

    Both warps are composed into one grid_sample (the reference interpolates twice). Lengths scale
    with the image; alpha scales with the square of the factor because blurred unit noise shrinks as
    1/sigma, so the displacement in pixels then scales linearly."""
    # (alpha, sigma, jitter) as fractions of the reference side; ImageNet-C writes 244 for 224
    # ("ultimately nothing is incorrect"), so its fractions multiply 244.
    frac, s = _pick(x, ((2, .7, .1), (2, .08, .2), (.05, .01, .02), (.07, .01, .02), (.12, .01, .02)),
                    ((0, 0, .08), (.05, .3, .06), (.1, .08, .06), (.1, .03, .03), (.16, .03, .02)),
                    ((0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05), (.1, .03, .03)), severity)
    unit = {224: 244, 64: 64, 32: 32}[_reference_size(x)]
    alpha, sigma, jitter = frac[0] * unit * s * s, frac[1] * unit * s, frac[2] * unit * s
    b, ch, h, w = x.shape
    dev = x.device
    # affine from three points around the centre to their jittered copies (cv2.getAffineTransform)
    cx, cy, sq = w // 2, h // 2, min(h, w) // 3
    pts = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], device=dev, dtype=torch.float32)
    moved = pts + _uniform((b, 3, 2), -jitter, jitter, gen, dev)
    src = torch.cat([pts, torch.ones(3, 1, device=dev)], 1).expand(b, 3, 3)
    affine = torch.zeros(b, 3, 3, device=dev)
    affine[:, :2] = torch.linalg.solve(src, moved).transpose(1, 2)
    affine[:, 2, 2] = 1
    inverse = torch.linalg.inv(affine)  # warpAffine samples the source at M^-1 (dst)
    noise = _uniform((b, 2, h, w), -1, 1, gen, dev)
    disp = _gaussian_blur(noise, sigma, truncate=3, mode="reflect").mul_(alpha) if alpha > 0 and sigma > 0 \
        else torch.zeros_like(noise)
    gy, gx = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    px, py = gx + disp[:, 0], gy + disp[:, 1]  # [b, h, w]: where the affine-warped image is read
    sx = inverse[:, 0, 0, None, None] * px + inverse[:, 0, 1, None, None] * py + inverse[:, 0, 2, None, None]
    sy = inverse[:, 1, 0, None, None] * px + inverse[:, 1, 1, None, None] * py + inverse[:, 1, 2, None, None]
    grid = torch.stack([sx.mul_(2).div_(w - 1).sub_(1), sy.mul_(2).div_(h - 1).sub_(1)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True).clamp_(0, 1)


def _box_resize_matrix(n_out, n_in, device):
    """[n_out, n_in] matrix of PIL's BOX resampling along one axis (averages the input pixels whose
    centres fall in each output pixel's box; nearest pixel when enlarging)."""
    scale = n_in / n_out
    centre = (torch.arange(n_out, device=device) + 0.5) * scale
    t = (torch.arange(n_in, device=device)[None, :] + 0.5 - centre[:, None]) / max(scale, 1.0)
    m = ((t > -0.5) & (t <= 0.5)).float()
    return m / m.sum(1, keepdim=True)


@functools.lru_cache(maxsize=64)
def _box_rows(n_out, n_in, device):
    """For _box_down_rows: each input row's box, the rows that fall in a box (None: all of them; PIL's
    boxes skip a row now and then) and 1 / the boxes' sizes [n_out, 1]."""
    inside = _box_resize_matrix(n_out, n_in, device) > 0
    used = inside.any(0)
    keep = None if used.all() else used.nonzero()[:, 0]
    box = inside.float().argmax(0)
    return (box if keep is None else box[keep]), keep, 1 / inside.sum(1, keepdim=True).float()


def _box_down_rows(x, n_out):
    """PIL BOX downscale of the rows (dim -2) of x to n_out: every row added into its box's sum in
    one pass (a matrix product would mostly multiply zeros), then divided by the box size."""
    n_in = x.shape[-2]
    if n_in % n_out == 0:  # whole boxes: a mean over a reshape
        return x.unflatten(-2, (n_out, n_in // n_out)).mean(-2)
    box, keep, inv_size = _box_rows(n_out, n_in, x.device)
    y = x.new_zeros(x.shape[:-2] + (n_out, x.shape[-1]))
    return y.index_add_(-2, box, x if keep is None else x.index_select(-2, keep)).mul_(inv_size)


@functools.lru_cache(maxsize=64)
def _box_col_pieces(n_out, n_in, device, pieces=4):
    """PIL BOX downscale of columns as `pieces` small matrix products: boxes hold consecutive columns,
    so each quarter of the output columns reads one stretch of the input's, a quarter of the work of
    the whole [n_in, n_out] product (whose other entries are zeros). -> [(first, end, matrix)]"""
    m = _box_resize_matrix(n_out, n_in, device)
    first = (m > 0).float().argmax(1).tolist() + [n_in]
    cuts = [round(p * n_out / pieces) for p in range(pieces + 1)]
    return [(first[a], first[b], m[a:b, first[a]:first[b]].T.contiguous()) for a, b in zip(cuts, cuts[1:]) if b > a]


def pixelate(x, severity, gen):
    """PIL BOX resize to c * size and back. Going back is nearest-neighbour on the same pixel grid, so
    the result is each box's mean spread over the box: rows summed by one index_add, columns by four small
    matrix products, then torch's 'nearest-exact' upsampling (the same source pixel as PIL's)."""
    c, _ = _pick(x, (.6, .5, .4, .3, .25), (.9, .8, .7, .6, .5), (.95, .9, .85, .75, .65), severity)
    h, w = x.shape[-2:]
    rows = _box_down_rows(x, int(h * c))
    small, col = rows.new_empty(rows.shape[:-1] + (int(w * c),)), 0
    for a, b, m in _box_col_pieces(int(w * c), w, x.device):  # each piece's product straight into its columns
        torch.matmul(rows[..., a:b], m, out=small[..., col:col + m.shape[1]])
        col += m.shape[1]
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


# Baseline JPEG as libjpeg(-turbo) runs it with PIL's and torchvision's defaults: JFIF YCbCr, 4:2:0
# chroma, the "islow" integer DCT both ways, Annex K tables scaled by quality and capped at 255, fancy
# (triangular) chroma upsampling. The entropy coding in between is lossless, so it is left out.
JPEG_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
             14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
             49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
JPEG_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
               47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def _jpeg_table(base, quality, device):
    """libjpeg's jpeg_set_quality(quality, force_baseline=TRUE) for one table, as [8, 1, 8] (row, -, col)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    q = [min(max((b * scale + 50) // 100, 1), 255) for b in base]
    return torch.tensor(q, device=device, dtype=torch.float64).view(8, 1, 8)


@functools.lru_cache(maxsize=None)
def _islow_matrices():
    """The integer matrices of libjpeg's jfdctint.c / jidctint.c butterflies (13-bit constants): each
    pass is floor((M @ v + 2^(s-1)) / 2^s) for a shift s, so one matrix product emulates it exactly."""
    c = dict(a=2446, b=16819, c=25172, d=12299, e=7373, f=20995, g=16069, h=3196, i=9633, j=4433, k=6270,
             m=15137)  # FIX(0.298631336), FIX(2.053119869), ... as in the C files

    def odd(t4, t5, t6, t7):  # shared odd part: inputs (tmp4..tmp7) of the forward, (in7, in5, in3, in1)
        z1, z2, z3, z4 = t4 + t7, t5 + t6, t4 + t6, t5 + t7
        z5 = (z3 + z4) * c["i"]
        z1, z2, z3, z4 = z1 * -c["e"], z2 * -c["f"], z3 * -c["g"] + z5, z4 * -c["h"] + z5
        return t4 * c["a"] + z1 + z3, t5 * c["b"] + z2 + z4, t6 * c["c"] + z2 + z3, t7 * c["d"] + z1 + z4

    def forward(d):  # -> (out0..out7) before descaling; out0, out4 carry no constant factor
        t = [d[i] + d[7 - i] for i in range(4)] + [d[3 - i] - d[4 + i] for i in range(4)]  # tmp0-3, tmp4-7
        t10, t13, t11, t12 = t[0] + t[3], t[0] - t[3], t[1] + t[2], t[1] - t[2]
        z1 = (t12 + t13) * c["j"]
        o7, o5, o3, o1 = odd(t[4], t[5], t[6], t[7])
        return [t10 + t11, o1, z1 + t13 * c["k"], o3, t10 - t11, o5, z1 - t12 * c["m"], o7]

    def inverse(d):
        z1 = (d[2] + d[6]) * c["j"]
        t2, t3 = z1 - d[6] * c["m"], z1 + d[2] * c["k"]
        t0, t1 = (d[0] + d[4]) * 8192, (d[0] - d[4]) * 8192
        t10, t13, t11, t12 = t0 + t3, t0 - t3, t1 + t2, t1 - t2
        o0, o1, o2, o3 = odd(d[7], d[5], d[3], d[1])
        return [t10 + o3, t11 + o2, t12 + o1, t13 + o0, t13 - o0, t12 - o1, t11 - o2, t10 - o3]

    eye = np.eye(8, dtype=np.int64)
    fdct = np.array([forward(list(eye[i])) for i in range(8)]).T  # [out, in]
    idct = np.array([inverse(list(eye[i])) for i in range(8)]).T
    return fdct, idct


def _jpeg_blocks(plane, q):
    """Quantise and reconstruct level-shifted samples [n, H, W] (H, W multiples of 8) in 8x8 blocks
    with table q; float64 keeps every integer of the islow passes exact."""
    n, h, w = plane.shape
    fdct, idct = (torch.tensor(m, device=plane.device, dtype=torch.float64) for m in _islow_matrices())
    dc = torch.tensor([1., 0, 0, 0, 1, 0, 0, 0], device=plane.device, dtype=torch.float64)
    # forward rows: out0/out4 are shifted left by 2 (exact), the others descaled by 11 bits
    rows = fdct * torch.where(dc > 0, 4.0, 1.0)[:, None]
    t = (plane.double().view(n, h, w // 8, 8) @ rows.T).add_((1 - dc) * 1024).mul_(torch.where(dc > 0, 1, 2.0 ** -11))
    t = fdct @ t.floor_().view(n, h // 8, 8, w)  # columns: out0/out4 descaled by 2 bits, the others by 15
    shift = torch.where(dc > 0, 2.0, 15.0).view(8, 1, 1)
    t = t.view(n, h // 8, 8, w // 8, 8).add_(2 ** (shift - 1)).mul_(2 ** -shift).floor_()
    # quantise: round half away from zero of t / (8 q) (+0.5 keeps the floor exact), then dequantise
    t = t.abs().add_(q * 4 + 0.5).div_(q * 8).floor_().mul_(t.sign()).mul_(q)
    t = (idct @ t.view(n, h // 8, 8, w)).add_(1024).mul_(2 ** -11).floor_()  # columns, then rows (+3 bits)
    t = (t.view(n, h // 8, 8, w // 8, 8) @ idct.T).add_(2 ** 17 + 128 * 2 ** 18).mul_(2 ** -18).floor_()
    return t.view(n, h, w).clamp_(0, 255).float()


def _jpeg_emulate(x, quality):
    """libjpeg's lossy steps on [B, 3, H, W] in [0, 1] with torch ops, equal to PIL's and torchvision's
    JPEG round trip pixel for pixel (test_corruptions.py): for devices other than the CPU, where a
    trip through libjpeg would cost more than the model's forward pass."""
    b, _, h, w = x.shape
    v = x.mul(255).round_()
    if h % 2 or w % 16:  # libjpeg copies the last column to whole MCUs and the last row to an even count
        v = F.pad(v, (0, -w % 16, 0, h % 2), mode="replicate")
    red, green, blue = v.unbind(1)

    def fix(a):  # libjpeg's 16-bit fixed point
        return float(int(a * 65536 + 0.5))

    luma = (red * fix(.299)).add_(green, alpha=fix(.587)).add_(blue, alpha=fix(.114))
    luma = luma.add_(32768 - 128 * 65536).mul_(1 / 65536).floor_()  # level-shifted by -128
    cb = (blue * fix(.5)).sub_(red, alpha=fix(.16874)).sub_(green, alpha=fix(.33126))
    cr = (red * fix(.5)).sub_(green, alpha=fix(.41869)).sub_(blue, alpha=fix(.08131))
    chroma = torch.stack([cb, cr], 1).add_(32767).mul_(1 / 65536).floor_()  # -128..127
    chroma = chroma[..., 0::2, :] + chroma[..., 1::2, :]  # 2x2 sums, + 1 or 2 by column, >> 2
    chroma = chroma[..., 0::2] + chroma[..., 1::2]
    bias = torch.tensor([1. + 512, 2 + 512], device=x.device).repeat(chroma.shape[-1] // 2)
    chroma = chroma.add_(bias).mul_(0.25).floor_().sub_(128)
    if h % 16:  # then each plane's last row to whole blocks (chroma: after downsampling)
        luma = F.pad(luma[:, None], (0, 0, 0, -luma.shape[-2] % 16), mode="replicate")[:, 0]
        chroma = F.pad(chroma, (0, 0, 0, -chroma.shape[-2] % 8), mode="replicate")
    hh, hw = chroma.shape[-2:]
    luma = _jpeg_blocks(luma, _jpeg_table(JPEG_LUMA, quality, x.device))[:, :h, :w]
    chroma = _jpeg_blocks(chroma.reshape(2 * b, hh, hw), _jpeg_table(JPEG_CHROMA, quality, x.device))
    chroma = chroma.view(b, 2, hh, hw)[..., :(h + 1) // 2, :(w + 1) // 2]
    if w > 4:  # fancy upsampling = bilinear x2 with copied edges: (9, 3, 3, 1) / 16, + 8 or 7 by column, >> 4
        up = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)[..., :h, :w].mul_(16)
        up = up.add_(torch.tensor([8. - 2048, 7 - 2048], device=x.device).repeat((w + 1) // 2)[:w])
        cb, cr = up.mul_(1 / 16).floor_().unbind(1)
    else:  # libjpeg replicates chroma at most 2 samples wide
        cb, cr = chroma.repeat_interleave(2, -1).repeat_interleave(2, -2)[..., :h, :w].sub(128).unbind(1)
    red = (cr * 91881).add_(32768).mul_(1 / 65536).floor_().add_(luma)
    green = (cb * -22554).sub_(cr, alpha=46802).add_(32768).mul_(1 / 65536).floor_().add_(luma)
    blue = (cb * 116130).add_(32768).mul_(1 / 65536).floor_().add_(luma)
    return torch.stack([red, green, blue], 1).clamp_(0, 255).mul_(1 / 255)


_JPEG_THREAD_PIXELS = 1 << 18  # pixels a thread must get before splitting the batch pays for the thread


def _jpeg_round_trip(images, quality, out, i):
    out[i] = torchvision.io.decode_jpeg(torchvision.io.encode_jpeg(images, quality=quality))


def jpeg_compression(x, severity, gen):
    """JPEG encode/decode at quality c: libjpeg through torchvision on the CPU, the same arithmetic in
    torch ops elsewhere (_jpeg_emulate, identical output). On the CPU the batch is split over torch's
    threads: libjpeg runs without the GIL, and the pixels are handed over interleaved (HWC), the layout
    libjpeg reads and writes, so torchvision copies nothing and the helper threads run libjpeg only (a
    torch kernel there would start an OpenMP pool per thread)."""
    c, _ = _pick(x, (25, 18, 15, 10, 7), (65, 58, 50, 40, 25), (80, 65, 58, 50, 40), severity)
    if x.device.type != "cpu":
        return _jpeg_emulate(x, c)
    u8 = x.mul(255).round_().to(torch.uint8, memory_format=torch.channels_last)
    n = max(1, min(torch.get_num_threads(), len(u8), u8.numel() // (3 * _JPEG_THREAD_PIXELS)))
    parts = [list(p) for p in u8.tensor_split(n)]
    out = [None] * n
    helpers = [threading.Thread(target=_jpeg_round_trip, args=(p, c, out, i)) for i, p in enumerate(parts[1:], 1)]
    for t in helpers:
        t.start()
    _jpeg_round_trip(parts[0], c, out, 0)
    for t in helpers:
        t.join()
    if None in out:  # a helper thread raised (Python printed its traceback)
        raise RuntimeError("jpeg_compression: libjpeg failed on part of the batch (see the traceback above).")
    u8 = torch.stack([img for part in out for img in part], out=u8)
    return u8.to(torch.float32, memory_format=torch.contiguous_format).mul_(1 / 255)


# ----------------------------------------------------------------------------- dispatch

CORRUPTION_FNS = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur,
    "zoom_blur": zoom_blur, "snow": snow, "frost": frost, "fog": fog, "brightness": brightness,
    "contrast": contrast, "elastic_transform": elastic_transform, "pixelate": pixelate,
    "jpeg_compression": jpeg_compression, "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur, "spatter": spatter, "saturate": saturate,
}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, frost_dir: str | None = None) -> torch.Tensor:
    """Apply ImageNet-C corruption `name` at `severity` (1-5) to a batch.

    x: float [B, 3, H, W] in [0, 1], any H, W >= 32, on any device. Returns the same shape, dtype and
    device, values in [0, 1], computed in float32. Deterministic given seed and independent of the device
    up to float round-off: random numbers come from a counter-based generator (_rand) keyed by a seeded
    CPU torch.Generator and made on x.device (the global RNG is never touched). frost_dir: folder with
    the ImageNet-C frost images (see frost)."""
    if name not in CORRUPTION_FNS:
        raise ValueError(f"Unknown corruption {name!r}: choose one of {', '.join(CORRUPTION_FNS)}.")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"Severity must be an integer from 1 to 5 for {name!r}, got {severity!r}.")
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"corrupt expects a float tensor [B, 3, H, W] in [0, 1], got {x.dtype} "
                         f"{tuple(x.shape)}; convert grey images with x.expand(-1, 3, -1, -1).")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        xf = x.float()
        low, high = xf.aminmax()
        if low < 0 or high > 1:
            xf = xf.clamp(0, 1)
        # xf may be the caller's tensor: corruption functions never write into their input
        fn = CORRUPTION_FNS[name]
        out = fn(xf, int(severity), gen, frost_dir) if name == "frost" else fn(xf, int(severity), gen)
        return out.to(x.dtype)  # every corruption returns values in [0, 1]


def measure_corruption_throughput(size: int, batch_size: int = 64, device="cpu", repeats: int = 2,
                                  images: torch.Tensor | None = None) -> dict[str, float]:
    """images/s for each of the 19 corruptions on random [0,1] images of size x size, over severities
    1-5 together (one call each; one warm-up call first; the best of `repeats` rounds, as shared
    machines only ever add time). images: a float batch [B, 3, size, size] to time instead (JPEG's cost
    depends on the content: noise codes slower than photographs)."""
    from torch.utils import benchmark  # torch's timer (syncs CUDA); keeps this file's imports to the list above

    if images is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(0)
        x = torch.rand((batch_size, 3, size, size), generator=gen, device=device)
    else:
        x = images.to(device)
    result = {}
    for name in CORRUPTIONS + EXTRA_CORRUPTIONS:
        corrupt(x, name, 3)
        timer = benchmark.Timer("for s in range(1, 6): corrupt(x, name, s)",
                                globals={"corrupt": corrupt, "x": x, "name": name},
                                num_threads=torch.get_num_threads())
        result[name] = 5 * len(x) / min(timer.timeit(1).mean for _ in range(repeats))
    return result
