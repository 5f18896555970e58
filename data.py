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
import gzip
import math
import multiprocessing
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
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
    return parser


def add_aug_args(parser):
    """AugMix flags (train_teacher.py and distill_partial.py)."""
    parser.add_argument("--aug-severity", type=int, default=3, help="AugMix op severity (1-10)")
    parser.add_argument("--aug-width", type=int, default=3, help="AugMix chains per image")
    parser.add_argument("--aug-depth", type=int, default=-1, help="AugMix ops per chain (-1: random 1-3)")
    parser.add_argument("--aug-all-ops", action="store_true", help="also use the ops that overlap ImageNet-C "
                        "(unfair for corruption benchmarks)")
    return parser


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
    """Decode an image file to a uint8 [3, H, W] tensor."""
    with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as deprecated (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(path, mode=ImageReadMode.RGB)


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


def skipped_images(dataset):
    """How many unreadable images a dataset (or a Subset of one) has skipped so far."""
    while isinstance(dataset, Subset):
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

class ShardSampler(Sampler):
    """Every rank takes indices rank, rank + world, ...: each image is evaluated exactly once
    (DistributedSampler pads with duplicates, which biases distributed accuracy)."""

    def __init__(self, n, rank=0, world=1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def collate_skip(batch):
    """default_collate without the None items an unreadable image leaves behind (None if none are left)."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def make_loader(dataset, batch_size, workers, train, rank=0, world=1, seed=0):
    """Train: shuffled, sharded over ranks (DistributedSampler also when alone: one code path), last
    partial batch dropped. Eval: in order, unpadded shards. Call set_loader_epoch before each epoch."""
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), rank, world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                      pin_memory=torch.cuda.is_available(), collate_fn=collate_skip,
                      generator=torch.Generator(), persistent_workers=False)


def set_loader_epoch(loader, epoch, seed):
    """Make an epoch's shuffling and augmentation a function of (seed, epoch) alone, so a resumed
    run sees exactly the data an uninterrupted one would have seen."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)  # worker seeds derive from this
