"""Make a small model robust, cheaply: the teacher of the method (Jain et al., ICCV 2023).

Three recipes, alone or together:
  AugMix + Jensen-Shannon consistency (Hendrycks et al. 2020)   --aug augmix --jsd 12
  PGD adversarial training, Linf or L2 (Madry et al. 2018)      --adv pgd --adv-eps 8/255
  adversarial fine-tuning of a trained model with a slow-start,
  fast-decay learning rate (Jeddi et al. 2020)                  --pretrained --adv pgd --sched ssfd

    python train_teacher.py --arch resnet50 --pretrained --data-dir /data/imagenet --aug augmix --jsd 12
    torchrun --nproc_per_node=8 train_teacher.py --arch resnet50 --data-dir /data/imagenet --amp ...
    python train_teacher.py --dataset fashion-mnist --arch resnet18 --model-kwargs "layers=[1,1,1,1]" \
        --aug augmix --jsd 12 --epochs 3 --output runs/teacher       # CPU, minutes

Writes --output/{args.json, log.jsonl, last.pt, best.pt}; checkpoints hold plain tensors and
types (torch.load(..., weights_only=True)). The helpers here (model creation, the normalising
wrapper, PGD, learning-rate schedules, checkpoints, distributed set-up, evaluation) are shared by
distill_partial.py and evaluate.py.
"""
import argparse
import ast
import contextlib
import difflib
import json
import math
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (UserError, Views, add_aug_args, add_data_args, augmix_views, build_datasets, class_names,
                  device_views, image_transforms, make_loader, native_size, set_loader_epoch, skipped_images)

SCHEMA = "robustify/1"


def fraction(text):
    """A float that may be written as a fraction, e.g. 8/255."""
    num, _, den = text.partition("/")
    try:
        return float(num) / float(den or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255") from None


def add_model_args(parser, name_flags=("--arch", "--model"), default="resnet18"):
    parser.add_argument(*name_flags, dest="arch", default=default, help="timm model name")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra timm.create_model arguments, e.g. img_size=32 patch_size=4 depth=6")
    parser.add_argument("--pretrained", action="store_true", help="start from timm's hub weights")
    parser.add_argument("--pretrained-file", default=None, help="start from a local .pth/.safetensors state "
                        "dict or a checkpoint of this project")
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")


def add_train_args(parser, lr=0.1, opt="sgd", epochs=10, opts=("sgd", "adamw")):
    """The optimisation and run flags train_teacher.py and distill_partial.py share."""
    parser.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    parser.add_argument("--stop-after", type=int, default=0, help="leave after this epoch (e.g. a job time "
                        "limit); --resume continues the same schedule")
    parser.add_argument("--opt", default=opt, choices=opts, help="optimizer")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4 if opt == "sgd" else 0.05, help="weight decay")
    parser.add_argument("--sched", default="cosine", choices=["cosine", "step", "ssfd"],
                        help="learning-rate schedule (ssfd: slow start, fast decay, for fine-tuning)")
    parser.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up (cosine, step)")
    parser.add_argument("--ssfd-peak", type=float, default=0.3, help="fraction of training where ssfd peaks")
    parser.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA; bf16 unless --amp-dtype fp16)")
    parser.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"], help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CNNs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained module")
    parser.add_argument("--output", default="runs/teacher", help="folder for args.json, log.jsonl, checkpoints")
    parser.add_argument("--resume", default=None, help="checkpoint (last.pt) to continue from, exactly")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    add_device_arg(parser)
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (and cuBLAS "
                        "workspace, cuDNN settings): exact --resume on CUDA, at some speed")


def add_device_arg(parser):
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="where to run (auto: CUDA when available)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--init-checkpoint", default=None, help="fine-tune this project checkpoint (same arch)")
    add_train_args(p)
    p.add_argument("--aug", default="none", choices=["none", "augmix"], help="robust augmentation")
    add_aug_args(p)
    p.add_argument("--jsd", type=float, default=0.0, help="Jensen-Shannon consistency weight over clean + 2 "
                   "AugMix views (0 = off; 12 is the AugMix paper's)")
    p.add_argument("--adv", default="none", choices=["none", "pgd"], help="adversarial training")
    p.add_argument("--adv-norm", default="linf", choices=["linf", "l2"], help="PGD threat model")
    p.add_argument("--adv-eps", type=fraction, default=8 / 255, help="PGD radius in [0,1] pixel units")
    p.add_argument("--adv-step", type=fraction, default=2 / 255, help="PGD step size in [0,1] pixel units")
    p.add_argument("--adv-steps", type=int, default=7, help="PGD iterations")
    p.add_argument("--no-random-start", dest="random_start", action="store_false", help="PGD from the clean image")
    return p


# ----------------------------------------------------------------------------- runtime

def check_gpu_count(local_world, gpus):
    """torchrun with more processes on this node than it has GPUs: one sentence naming the fix, raised
    by every rank before any CUDA call (instead of 'invalid device ordinal' on some ranks and a hang)."""
    if local_world > gpus:
        raise UserError(f"torchrun started {local_world} processes on this node, which has {gpus} GPU(s); "
                        f"use --nproc_per_node={gpus} or fewer, or --device cpu")


def set_deterministic():
    """Deterministic algorithms, so a resumed CUDA run ends with the uninterrupted run's weights.
    cuBLAS reads its workspace setting when it starts, so this runs before any CUDA work. Ops with no
    deterministic kernel warn instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def setup_distributed(device="auto", deterministic=False):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE; plain python runs as rank 0 of 1.
    device 'auto' takes CUDA when available; 'cpu' keeps everything on the CPU even there. gloo on
    CPU, nccl on CUDA. Safe to call twice (a driver may run several mains in one process)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if deterministic:
        set_deterministic()
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if device != "cpu" and torch.cuda.is_available():
        check_gpu_count(int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count())
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_sum(values, device):
    """Sum a list of numbers over ranks (a no-op alone)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def ranks_agree(module, device):
    """True when every rank holds the same trainable parameters (DDP's promise, checked cheaply)."""
    with torch.no_grad():
        s = sum(p.double().sum() * (i + 1) for i, p in enumerate(module.parameters()) if p.requires_grad)
    s = torch.as_tensor(s, dtype=torch.float64, device=device).reshape(1)
    if not dist.is_initialized():
        return True
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, dist.ReduceOp.MIN)
    dist.all_reduce(hi, dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def amp_setup(device, amp, amp_dtype):
    """One autocast context factory and a GradScaler that only switches on for fp16."""
    dtype = torch.float16 if amp_dtype == "fp16" else torch.bfloat16
    autocast = partial(torch.autocast, device.type, dtype=dtype, enabled=amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    return autocast, scaler


def save_checkpoint(obj, path):
    """Atomic write: a crash mid-save never leaves a broken last.pt behind."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, flag="--resume"):
    if not os.path.isfile(path):
        raise UserError(f"{flag}: file {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__}); pass a last.pt/best.pt "
                        f"written by this project") from None
    if not isinstance(ckpt, dict) or ckpt.get("schema") != SCHEMA:
        raise UserError(f"{flag}: {path} is not a checkpoint of this project (schema {SCHEMA})")
    return ckpt


class RunLog:
    """Rank 0 writes args.json and appends metrics to log.jsonl; other ranks stay silent."""

    def __init__(self, output, rank, args):
        self.output, self.main = output, rank == 0
        if self.main:
            os.makedirs(output, exist_ok=True)
            with open(os.path.join(output, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)

    def __call__(self, msg=None, **metrics):
        if not self.main:
            return
        if msg:
            print(msg, flush=True)
        if metrics:
            with open(os.path.join(self.output, "log.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")


# ----------------------------------------------------------------------------- models

def parse_kwargs(items):
    """['img_size=32', 'layers=[1,1,1,1]', 'global_pool=avg'] -> dict with Python literals."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--model-kwargs: {item!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def create_model(arch, num_classes, pretrained=False, pretrained_file=None, model_kwargs=None, **extra):
    """A bare timm model. Errors a user can cause are one sentence, raised before heavy work."""
    import timm

    kwargs = dict(model_kwargs or {}, **extra)
    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.5)
        raise UserError(f"unknown model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                     "; see timm.list_models()"))
    if pretrained_file and not os.path.isfile(pretrained_file):
        raise UserError(f"--pretrained-file: {pretrained_file} does not exist")
    own = None
    if pretrained_file and pretrained_file.endswith((".pt", ".pth")):
        try:
            ckpt = torch.load(pretrained_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--pretrained-file: {pretrained_file} is not a readable state dict ({type(e).__name__})") from None
        own = ckpt if isinstance(ckpt, dict) and ckpt.get("schema") == SCHEMA else None
        if own is not None and own["arch"] != arch:
            raise UserError(f"--pretrained-file: {pretrained_file} holds a {own['arch']}, not a {arch}")
    try:
        if own is not None:  # a checkpoint of this project: same model kwargs, keep or replace its head
            model = timm.create_model(arch, num_classes=own["num_classes"], **dict(own["model_kwargs"], **extra))
            model.load_state_dict(own["model"])
            if own["num_classes"] != num_classes:
                model.reset_classifier(num_classes)
        elif pretrained_file:
            model = timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                      pretrained_cfg_overlay=dict(file=pretrained_file), **kwargs)
        else:
            model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained and not pretrained_file:
            raise UserError(f"could not fetch pretrained weights for {arch} ({type(e).__name__}); check the network, "
                            f"or download them elsewhere and pass --pretrained-file PATH") from None
        raise UserError(f"could not build {arch} from {pretrained_file or 'scratch'}: {str(e).splitlines()[0][:200]}") from None
    return model


def model_data_config(model, image_size=None):
    """The preprocessing a timm model expects, as plain types (saved in every checkpoint).
    image_size overrides the input size, for datasets with a native size (Fashion-MNIST: 32)."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    size = [3, image_size, image_size] if image_size else list(cfg["input_size"])
    return {"input_size": size, "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "interpolation": cfg["interpolation"], "crop_pct": float(cfg["crop_pct"])}


class Normalized(nn.Module):
    """Model taking images in [0, 1]: resize to its input size if needed, normalise, run.

    Normalisation inside the model lets PGD and corruptions work in pixel space and lets a teacher
    and a student with different mean/std/size share one batch.
    """

    def __init__(self, model, data_config):
        super().__init__()
        self.model = model
        self.size = tuple(data_config["input_size"][-2:])
        self.mode = "bicubic" if data_config.get("interpolation") == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x):
        if x.shape[-2:] != self.size:
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x):
        return self.model(self.normalize(x))


def load_model(path, flag="--checkpoint"):
    """(Normalized model in eval mode, checkpoint) from a train_teacher.py checkpoint."""
    ckpt = load_checkpoint(path, flag)
    if ckpt.get("kind") != "model":
        raise UserError(f"{flag}: {path} is a {ckpt.get('kind')} checkpoint, not a full model")
    model = create_model(ckpt["arch"], ckpt["num_classes"], model_kwargs=ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    return Normalized(model, ckpt["data_config"]).eval(), ckpt


# ----------------------------------------------------------------------------- training pieces

def lr_at(step, total, base_lr, sched="cosine", warmup=0, peak=0.3):
    """Learning rate as a pure function of the global step (nothing to lose on resume).

    cosine/step: linear warm-up over `warmup` steps, then cosine to 0 / x0.1 at 50% and 75%.
    ssfd (slow start, fast decay; Jeddi et al. 2020, our reconstruction): linear rise from
    base_lr/100 to base_lr at fraction `peak` of training, then exponential decay to base_lr/1000
    at the end. No plateau at the peak, which is what causes robust overfitting.
    """
    t = step / max(1, total)
    if sched == "ssfd":
        if t < peak:
            return base_lr * (0.01 + 0.99 * t / peak)
        return base_lr * math.exp(-math.log(1000) * (t - peak) / max(1e-8, 1 - peak))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if sched == "step":
        return base_lr * (0.1 ** ((t >= 0.5) + (t >= 0.75)))
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def pgd_attack(model, x, y, eps, step_size, steps, norm="linf", random_start=True):
    """Untargeted PGD (Madry et al. 2018) in [0, 1] pixel space, in fp32.

    The caller puts the model in eval mode (frozen BN statistics) and passes the bare module,
    not its DDP wrapper. Returns adversarial images within the eps ball of x and inside [0, 1].
    """
    def project(d):
        if norm == "linf":
            return d.clamp(-eps, eps)
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return d * (eps / n).clamp(max=1.0)

    x = x.detach().float()
    delta = torch.zeros_like(x)
    if random_start:
        delta = (torch.rand_like(x) * 2 - 1) * eps if norm == "linf" else project(torch.randn_like(x) * eps)
        delta = (x + delta).clamp(0, 1) - x
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta).float(), y)
            grad, = torch.autograd.grad(loss, delta)
            if norm == "linf":
                delta = delta.detach() + step_size * grad.sign()
            else:
                g = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta.detach() + step_size * grad / g
            delta = (x + project(delta)).clamp(0, 1) - x
    return (x + delta).detach()


def build_optimizer(params, opt, lr, weight_decay, momentum=0.9, device=None):
    """SGD (Nesterov) or AdamW, fused on CUDA. No decay on biases and norm weights (1-D tensors)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    fused = device is not None and device.type == "cuda"
    if opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def module_device(module):
    """The device a module's parameters (or buffers) live on: helpers send their inputs there."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model, loader, device=None, autocast=contextlib.nullcontext):
    """Top-1 accuracy (%) over the loader; every rank scores its own unpadded shard, sums are reduced.
    Inputs go to `device`, by default the model's."""
    device = device or module_device(model)
    model.eval()
    correct = total = 0
    for batch in loader:
        if batch is None:
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast():
            correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    correct, total = all_sum([correct, total], device)
    return 100.0 * correct / max(1, total)


def restore_training(ckpt, path, opt, scaler):
    """Optimizer and scaler state back from a last.pt; returns (epochs done, step, best metric)."""
    if ckpt["optimizer"] is None:
        raise UserError(f"--resume: {path} holds no optimizer state (a best.pt); resume from last.pt")
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt["step"], ckpt["best_metric"]


def start_epoch(loader, epoch, seed, rank):
    """Everything random in an epoch (order, augmentation, dropout, PGD starts) follows from
    (seed, epoch, rank): resuming at an epoch boundary replays exactly what an uninterrupted run does."""
    torch.manual_seed(seed * 100_003 + epoch * 1_009 + rank)
    set_loader_epoch(loader, epoch, seed)


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def progress(loader, rank, desc):
    return tqdm(loader, desc=desc, disable=rank != 0, leave=False, dynamic_ncols=True)


def check_args(args):
    """Input mistakes, caught before any data or model is loaded."""
    if args.adv != "none":
        if args.adv_norm == "linf" and (args.adv_eps > 0.5 or args.adv_step > 0.5):
            raise UserError(f"--adv-eps {args.adv_eps:g} / --adv-step {args.adv_step:g} look like 0-255 units; give them "
                            f"in [0, 1], e.g. --adv-eps 8/255 --adv-step 2/255")
        if args.adv_eps <= 0 or args.adv_steps < 1:
            raise UserError("--adv pgd needs --adv-eps > 0 and --adv-steps >= 1")
    if args.jsd and args.aug != "augmix":
        raise UserError("--jsd needs AugMix views; add --aug augmix")
    if args.pretrained_file and args.pretrained:
        raise UserError("--pretrained and --pretrained-file both given; keep one")
    for flag in ("resume", "init_checkpoint", "pretrained_file"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UserError(f"--{flag.replace('_', '-')}: file {path} does not exist")
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")


def run_main(fn, argv, parser):
    """Parse, run, and turn a UserError into one line on stderr and exit status 2 (no traceback)."""
    args = parser.parse_args(argv)
    try:
        return fn(args)
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if dist.is_initialized() and os.environ.get("ROBUSTIFY_KEEP_PG") != "1":
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- main

def train(args):
    check_args(args)
    rank, world, device = setup_distributed(args.device, args.deterministic)
    log = RunLog(args.output, rank, args)
    torch.manual_seed(args.seed)

    # The class count (from the folder names) decides the head; the model's data config the transforms.
    # Wrap order: build -> load weights into the bare module -> to(device) -> compile -> DDP.
    classes = class_names(args.dataset, args.data_dir)
    kwargs = parse_kwargs(args.model_kwargs)
    extra = {"drop_path_rate": args.drop_path} if args.drop_path else {}
    model = create_model(args.arch, len(classes), args.pretrained, args.pretrained_file, kwargs, **extra)
    start = None
    if args.resume or args.init_checkpoint:
        flag = "--resume" if args.resume else "--init-checkpoint"
        start = load_checkpoint(args.resume or args.init_checkpoint, flag)
        if start.get("arch") != args.arch or start.get("num_classes") != len(classes):
            raise UserError(f"{flag}: {args.resume or args.init_checkpoint} holds a {start.get('arch')} with "
                            f"{start.get('num_classes')} classes; this run builds a {args.arch} with {len(classes)}")
        model.load_state_dict(start["model"])
    cfg = model_data_config(model, native_size(args.dataset))

    n_aug = 2 if args.jsd else (1 if args.aug == "augmix" else 0)
    train_tf, eval_tf = image_transforms(args.dataset, cfg)
    train_views, batch_aug = augmix_views(train_tf, n_aug, args.aug_device, args.aug_severity, args.aug_width,
                                    args.aug_depth, args.aug_all_ops)
    train_set, val_set = build_datasets(args.dataset, args.data_dir, train_views, Views(eval_tf),
                                        args.train_subset, args.val_subset)
    train_loader = make_loader(train_set, args.batch_size, args.workers, True, rank, world, args.seed)
    val_loader = make_loader(val_set, args.batch_size, args.workers, False, rank, world)
    if len(train_loader) == 0:
        raise UserError(f"-b/--batch-size {args.batch_size} x {world} processes is larger than the "
                        f"{len(train_set)} training images; lower it")

    net = Normalized(model, cfg).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    fwd = torch.compile(net) if args.compile else net
    ddp = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else fwd

    opt = build_optimizer(net.parameters(), args.opt, args.lr, args.weight_decay, args.momentum, device)
    autocast, scaler = amp_setup(device, args.amp, args.amp_dtype)
    epoch, step, best, acc = 0, 0, -1.0, None
    if args.resume:
        epoch, step, best = restore_training(start, args.resume, opt, scaler)
        acc = start["metric"]
    total = args.epochs * len(train_loader)
    warmup = int(args.warmup_epochs * len(train_loader))
    lr = lr_at(step, total, args.lr, args.sched, warmup, args.ssfd_peak)
    if args.jsd:
        from timm.loss import JsdCrossEntropy
        criterion = JsdCrossEntropy(num_splits=3, alpha=args.jsd, smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    log(f"{args.arch}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, {len(train_set)} train / "
        f"{len(val_set)} val images, {len(classes)} classes, {world} process(es) on {device}")

    t_start = time.time()
    while epoch < args.epochs:
        start_epoch(train_loader, epoch, args.seed, rank)
        net.train()
        t0, seen, loss_sum, skipped0 = time.time(), 0, 0.0, skipped_images(train_set)
        bar = progress(train_loader, rank, f"epoch {epoch + 1}/{args.epochs}")
        for batch in bar:
            if batch is None:
                continue
            views, y = batch
            x = device_views(views, device, batch_aug, n_aug)   # --aug-device cuda: AugMix views made here
            y = y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if args.adv == "pgd":
                net.eval()  # attack with frozen BN statistics, on the bare module, in fp32
                x = pgd_attack(net, x, y.repeat(1 + n_aug), args.adv_eps, args.adv_step, args.adv_steps,
                               args.adv_norm, args.random_start)
                net.train()
            lr = lr_at(step, total, args.lr, args.sched, warmup, args.ssfd_peak)
            set_lr(opt, lr)
            with autocast():
                logits = ddp(x)
            loss = criterion(logits.float(), y if args.jsd else y.repeat(1 + n_aug))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            seen += len(y) * world
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{seen / (time.time() - t0):.0f}")
        epoch += 1
        train_time = time.time() - t0
        acc = evaluate(fwd, val_loader, device, autocast)
        skipped = all_sum([skipped_images(train_set) - skipped0], device)[0]
        is_best = acc > best
        best = max(best, acc)
        metrics = dict(epoch=epoch, step=step, lr=lr, train_loss=loss_sum / max(1, len(train_loader)), val_acc=acc,
                       best_acc=best, epoch_time_s=round(train_time, 2), img_s=round(seen / train_time, 1),
                       skipped_images=int(skipped))
        log(f"epoch {epoch}: loss {metrics['train_loss']:.4f}  val top-1 {acc:.2f}%  ({train_time:.0f}s, "
            f"{metrics['img_s']:.0f} img/s{f', {int(skipped)} unreadable images skipped' if skipped else ''})", **metrics)
        if rank == 0:
            ckpt = dict(schema=SCHEMA, kind="model", arch=args.arch, model_kwargs=kwargs, num_classes=len(classes),
                        class_names=classes, data_config=cfg, model=net.model.state_dict(),
                        optimizer=opt.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else None,
                        epoch=epoch, step=step, metric=acc, best_metric=best, args=vars(args))
            save_checkpoint(ckpt, os.path.join(args.output, "last.pt"))
            if is_best:
                save_checkpoint(dict(ckpt, optimizer=None, scaler=None), os.path.join(args.output, "best.pt"))
        if args.stop_after and epoch >= args.stop_after:
            break
    agree = ranks_agree(net, device)
    result = dict(arch=args.arch, epochs_done=epoch, step=step, lr=lr, val_acc=acc, best_acc=best,
                  train_time_s=round(time.time() - t_start, 2),
                  trainable_params=sum(p.numel() for p in net.parameters()), ranks_agree=agree)
    log("final: " + json.dumps(result), final=result)
    return result


def main(argv=None):
    return run_main(train, argv, get_parser())


if __name__ == "__main__":
    main()
