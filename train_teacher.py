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

Writes --output/{args.json, log.jsonl, last.pt, best.pt} once every flag is checked, holding a lock on
--output while it runs; a folder that holds a run needs --resume or --overwrite. Checkpoints hold plain
tensors and types (torch.load(..., weights_only=True)); --save-every N adds mid-epoch ones. The helpers here (model creation, the normalising
wrapper, PGD, learning-rate schedules, checkpoints, distributed set-up, evaluation) are shared by
distill_partial.py and evaluate.py.
"""
import argparse
import ast
import contextlib
import difflib
import fcntl
import json
import math
import os
import sys
import tempfile
import time
import uuid
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (UserError, Views, add_aug_args, add_data_args, augmix_views, build_datasets, check_aug_args,
                  check_data_args, class_names, device_views, image_transforms, make_loader, native_size,
                  set_loader_epoch, skipped_images)

SCHEMA = "robustify/1"


def fraction(text):
    """A float that may be written as a fraction, e.g. 8/255."""
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number or a fraction like 8/255")
    return value


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
    parser.add_argument("--overwrite", action="store_true", help="replace the run --output already holds")
    parser.add_argument("--save-every", type=int, default=0, help="also write last.pt every N steps (0: at epoch "
                        "ends only); --resume continues mid-epoch, exactly")
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
    p.add_argument("--jsd", type=float, nargs="?", const=12.0, default=0.0, help="Jensen-Shannon consistency "
                   "weight over clean + 2 AugMix views (0 = off; --jsd alone: 12, the AugMix paper's)")
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
    """One autocast context factory and a GradScaler that only switches on for fp16. Mixed precision is
    for CUDA (docs/DESIGN.md 5): on other devices --amp leaves the run in fp32."""
    dtype = torch.float16 if amp_dtype == "fp16" else torch.bfloat16
    amp = amp and device.type == "cuda"
    autocast = partial(torch.autocast, device.type, dtype=dtype, enabled=amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    return autocast, scaler


def temp_name(path):
    """A temporary name next to path, unique to this process and call: two writers never share one."""
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def write_atomic(path, text):
    """Write a text file under a unique temporary name, then rename: readers never see half a file."""
    tmp = temp_name(path)
    with open(tmp, "x") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(obj, path):
    """Atomic write under a unique temporary name: a crash mid-save never leaves a broken last.pt behind."""
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_run(output, ckpt, is_best):
    """best.pt (no optimizer state) before last.pt: a kill between the two leaves the previous last.pt,
    whose --resume redoes this epoch and writes the same best.pt again; never a last.pt that records
    a best.pt which is not on disk."""
    if is_best:
        save_checkpoint(dict(ckpt, optimizer=None, scaler=None, ranks=None), os.path.join(output, "best.pt"))
    save_checkpoint(ckpt, os.path.join(output, "last.pt"))


def restore_best(start, resume, output):
    """On --resume, make --output's best.pt the one the resumed last.pt records (best_step): keep it if it
    is (or is newer: this run writes it again), else copy the resumed folder's, else the last.pt itself
    when it is the best; a best.pt that cannot be re-derived is reported."""
    def step_of(path):
        try:
            return load_checkpoint(path, "best.pt")["step"] if os.path.isfile(path) else None
        except UserError:
            return None

    want, dst = start.get("best_step"), os.path.join(output, "best.pt")
    have = step_of(dst)
    if want is None or (have is not None and (have == want or have > start["step"])):
        return
    src = os.path.join(os.path.dirname(os.path.abspath(resume)), "best.pt")
    if step_of(src) == want:
        save_checkpoint(load_checkpoint(src, "best.pt"), dst)
    elif want == start["step"] and not start.get("batch"):
        save_checkpoint(dict(start, optimizer=None, scaler=None, ranks=None), dst)
    else:
        print(f"warning: the best.pt of step {want} recorded in {resume} is gone; this run writes a new one when "
              f"an epoch beats it", file=sys.stderr)


def rank_states(device, **counters):
    """Every rank's random state and epoch counters (a list indexed by rank), for a mid-epoch checkpoint."""
    state = dict(counters, cpu=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rank_state(states, rank, device):
    """This rank's random state back from a mid-epoch checkpoint; returns its epoch counters."""
    state = states[rank]
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    return state


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


RUN_FILES = ("last.pt", "best.pt", "log.jsonl")
# Flags a --resume may change: they cannot change the result (a longer --epochs is checked apart).
# The starting weights are in the resumed checkpoint already (distill_partial.py checks the base's fingerprint).
# --deterministic only picks reproducible kernels (CPU results are the same either way), so a run may be resumed
# with it added or dropped; --device and --aug-device decide where and how the numbers are computed (batched
# AugMix draws other views than the loader's), so they stay part of the recipe.
RESUME_FREE = {"workers", "output", "resume", "overwrite", "stop_after", "save_every", "data_dir", "epochs",
               "pretrained", "pretrained_file", "init_checkpoint", "deterministic"}   # the checkpoint holds the weights


def _log_step(line, default):
    """The step of one log.jsonl line; a line cut short by a crash counts as past any step (dropped)."""
    try:
        return json.loads(line).get("step", default) if line.strip() else math.inf
    except ValueError:
        return math.inf


def lock_holder(output):
    """pid of the live run holding --output's lock, else None (a killed run's lock is released by the OS)."""
    try:
        with open(os.path.join(output, ".lock")) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "?"
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        pass
    return None


def check_writable(output):
    """--output is a folder, or can be made one, where this process may write."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"--output: {output} is a file; give a folder (created if missing)")
    parent = os.path.abspath(output)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--output: {parent} is a file, so {output} cannot be created; give a folder path")
    try:   # a real probe: access() misses read-only mounts and pseudo file systems for root
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=parent))
    except OSError:
        raise UserError(f"--output: cannot write in {parent} (read-only or no permission); pick another folder") from None


def check_output(output, resume, overwrite):
    """--output mistakes, found before anything is loaded or written."""
    check_writable(output)
    holder = lock_holder(output)
    if holder:
        raise UserError(f"--output: {output} is in use by a running run (pid {holder}); wait for it to end or "
                        f"pick another --output")
    if resume and overwrite:
        raise UserError("--resume and --overwrite both given; keep --resume to continue a run, --overwrite to replace it")
    held = [f for f in ("last.pt", "best.pt") if os.path.exists(os.path.join(output, f))]
    same = resume and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(output)
    if held and not overwrite and not same:
        raise UserError(f"--output: {output} already holds a run ({', '.join(held)}); continue it with --resume "
                        f"{os.path.join(output, 'last.pt')}, replace it with --overwrite, or pick another --output")


def check_resume(ckpt, args, kind, script, world, parser, arch_flag="--arch"):
    """--resume continues the very run it names: a checkpoint of this script, with the same recipe.
    Only flags that cannot change the result may differ, and --epochs only grow. A flag added to the
    script after the run was made (absent from its saved args) must keep its default (from `parser`)."""
    if ckpt.get("kind") != kind:
        what = {"model": "a train_teacher.py model", "delta": "a distill_partial.py delta"}.get(ckpt.get("kind"),
                                                                                             f"a {ckpt.get('kind')}")
        raise UserError(f"--resume: {args.resume} is {what} checkpoint; {script} resumes from a last.pt it wrote itself")
    if ckpt.get("optimizer") is None:
        raise UserError(f"--resume: {args.resume} holds no optimizer state (a best.pt); resume from last.pt")
    saved, new = ckpt.get("args") or {}, vars(args)
    changed = [f"{arch_flag if k == 'arch' else '--' + k.replace('_', '-')} {new[k]} (was {saved[k]})"
               for k in saved if k in new and k not in RESUME_FREE and saved[k] != new[k]]
    changed += [f"--{k.replace('_', '-')} {new[k]} (the run predates the flag: {parser.get_default(k)})"
                for k in new if k not in saved and k not in RESUME_FREE and new[k] != parser.get_default(k)]
    if new["epochs"] < saved.get("epochs", 0):
        changed.append(f"--epochs {new['epochs']} (was {saved['epochs']}; only a longer run can continue it)")
    if ckpt.get("world", world) != world:
        changed.append(f"{world} processes (was {ckpt['world']})")
    if changed:
        raise UserError(f"--resume: {', '.join(changed)} differ from the run in {args.resume}; resume with its "
                        f"arguments (its args.json), or start a new run in another --output")


class RunLog:
    """Rank 0 locks --output for the run's lifetime, writes args.json and appends metrics to log.jsonl; other
    ranks stay silent. Built once every argument is checked: a failed start leaves --output untouched."""

    def __init__(self, output, rank, args, overwrite=False, resume_step=0):
        self.output, self.main, self.lock = output, rank == 0, None
        if not self.main:
            return
        try:
            os.makedirs(output, exist_ok=True)
            self.lock = open(os.path.join(output, ".lock"), "a+")
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.close()
                raise UserError(f"--output: {output} is in use by a running run; wait for it or pick another") from None
            self.lock.truncate(0)
            self.lock.write(f"{os.getpid()}\n")
            self.lock.flush()
            for name in os.listdir(output):   # temporary files of a killed writer (we hold the lock)
                if name.endswith(".tmp"):
                    os.remove(os.path.join(output, name))
            for name in RUN_FILES if overwrite else ():
                if os.path.exists(os.path.join(output, name)):
                    os.remove(os.path.join(output, name))
            self._keep_log_until(resume_step)
            write_atomic(os.path.join(output, "args.json"), json.dumps(vars(args), indent=2))
        except OSError as e:
            self.close()
            raise UserError(f"--output: cannot write in {output} ({e.strerror}); pick another folder") from None

    def _keep_log_until(self, step):
        """Drop the log lines of work the starting point does not hold (a fresh start: all; a --resume: what
        it redoes now)."""
        path = os.path.join(self.output, "log.jsonl")
        if step is None or not os.path.isfile(path):
            return
        with open(path) as f:
            kept = [line for line in f if _log_step(line, step + 1) <= step]
        write_atomic(path, "".join(kept))

    def close(self):
        """Release --output's lock (the OS also releases it when the process dies)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

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


def load_weights(model, path, flag="--pretrained-file"):
    """Load a local .pth/.safetensors state dict into a timm model, every key matched: only the classifier
    may be missing or of another class count (it keeps its fresh initialisation). timm's own loading is
    non-strict when the class count differs and would silently load nothing from misnamed keys."""
    import timm.models
    try:
        state = timm.models.load_state_dict(path, weights_only=True)
    except Exception as e:
        raise UserError(f"{flag}: {path} is not a readable state dict ({type(e).__name__}); give a .pth or "
                        f".safetensors file of {type(model).__name__} weights") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag}: {path} does not hold a state dict of tensors")
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:   # timm's conversion of original layouts (JAX, OpenAI CLIP) and position embeddings
        try:
            state = convert(state, model)
        except Exception:
            pass   # not that layout: matched as is below
    head = model.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    own = model.state_dict()
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in head)
    state = {k: v for k, v in state.items() if not (is_head(k) and k in own and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_head(k)]
    if missing or unexpected:
        show = lambda keys: ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        raise UserError(f"{flag}: {path} does not fit {type(model).__name__}: " +
                        "; ".join(part for part in (missing and f"missing {show(missing)}",
                                                    unexpected and f"unexpected {show(unexpected)}") if part) +
                        "; rename the keys to timm's (e.g. drop a prefix) or check --arch/--model-kwargs")


def check_class_names(ckpt, classes, flag, path, space, fix):
    """A checkpoint's classes must be `classes`, in the same order (not just as many)."""
    if ckpt.get("class_names", classes) != classes:
        raise UserError(f"{flag}: {path} was trained on other classes ({', '.join(map(str, ckpt['class_names'][:3]))}, "
                        f"...) than {space} ({', '.join(map(str, classes[:3]))}, ...); {fix}")


def unreadable_batch(world, rank):
    """A training batch all of whose images were unreadable: skipped alone; under torchrun one process
    skipping a step would leave the others waiting for it, so the run stops."""
    if world > 1:
        raise UserError(f"a whole training batch of rank {rank} is unreadable images; replace the broken files in "
                        f"--data-dir (or raise -b)")


def create_model(arch, num_classes, pretrained=False, pretrained_file=None, model_kwargs=None,
                 flag="--pretrained-file", class_names=None, arch_flag="--arch", **extra):
    """A bare timm model. Errors a user can cause are one sentence, raised before heavy work.
    model.timm_kwargs holds the keyword arguments it was built with (a checkpoint of this project
    brings its own); class_names, when given, must match such a checkpoint's classes."""
    import timm

    kwargs = dict(model_kwargs or {}, **extra)
    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.5)
        raise UserError(f"{arch_flag}: unknown model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                                  "; see timm.list_models()"))
    if pretrained_file and not os.path.isfile(pretrained_file):
        raise UserError(f"{flag}: {pretrained_file} does not exist")
    own = None
    if pretrained_file and pretrained_file.endswith((".pt", ".pth")):
        try:
            ckpt = torch.load(pretrained_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{flag}: {pretrained_file} is not a readable state dict ({type(e).__name__})") from None
        own = ckpt if isinstance(ckpt, dict) and ckpt.get("schema") == SCHEMA else None
        if own is not None and own.get("kind") != "model":
            raise UserError(f"{flag}: {pretrained_file} is a {own.get('kind')} checkpoint (a distill_partial.py "
                            f"branch), not full weights; give the base weights or a train_teacher.py checkpoint")
        if own is not None and own["arch"] != arch:
            raise UserError(f"{flag}: {pretrained_file} holds a {own['arch']}, not a {arch}")
        if own is not None and model_kwargs and dict(model_kwargs) != own["model_kwargs"]:
            raise UserError(f"--model-kwargs: {pretrained_file} was built with {own['model_kwargs']}, not "
                            f"{dict(model_kwargs)}; leave --model-kwargs out (the file brings its own)")
        if own is not None and class_names is not None and own["num_classes"] == num_classes:
            check_class_names(own, class_names, flag, pretrained_file, "the data's", "give weights for these classes")
    try:
        if own is not None:  # a checkpoint of this project: same model kwargs, keep or replace its head
            model = timm.create_model(arch, num_classes=own["num_classes"], **dict(own["model_kwargs"], **extra))
            model.load_state_dict(own["model"])
            if own["num_classes"] != num_classes:
                model.reset_classifier(num_classes)
        else:
            model = timm.create_model(arch, pretrained=pretrained and not pretrained_file, num_classes=num_classes,
                                      **kwargs)
    except TypeError as e:   # a keyword the model does not take
        raise UserError(f"--model-kwargs: {arch} rejects them ({str(e).splitlines()[0][:150]}); see its timm "
                        f"constructor for the accepted names") from None
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained and not pretrained_file:
            raise UserError(f"could not fetch pretrained weights for {arch} ({type(e).__name__}); check the network, "
                            f"or download them elsewhere and pass {flag} PATH") from None
        raise UserError(f"could not build {arch} from {pretrained_file or 'scratch'}: {str(e).splitlines()[0][:200]}") from None
    if pretrained_file and own is None:
        load_weights(model, pretrained_file, flag)
    model.timm_kwargs = dict(own["model_kwargs"]) if own is not None else dict(model_kwargs or {})
    return model


def model_data_config(model, image_size=None):
    """The preprocessing a timm model expects, as plain types (saved in every checkpoint).
    image_size overrides the input size, for datasets with a native size (Fashion-MNIST: 32)."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)   # a ViT built for one input size
    built = list(built) if built and not getattr(model.patch_embed, "dynamic_img_size", False) else None
    if image_size and built and built != [image_size, image_size]:
        raise UserError(f"--img-size {image_size}: this {type(model).__name__} is built for {built[0]}-px input; "
                        f"pass --img-size {built[0]}, or build it for {image_size} px with --model-kwargs "
                        f"img_size={image_size}")
    size = [3, image_size, image_size] if image_size else [3, *built] if built else list(cfg["input_size"])
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
        device = next(model.parameters()).device   # on the model's device: wrapping never moves either
        self.register_buffer("mean", torch.tensor(data_config["mean"], device=device).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"], device=device).view(1, -1, 1, 1),
                             persistent=False)

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
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
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
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0   # counted on the device: no wait per batch
    for batch in loader:
        if batch is None:
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast():
            correct += (model(x).argmax(1) == y).sum()
        total += len(y)
    correct, total = all_sum([correct.item(), total], device)
    if total == 0:
        raise UserError("no readable validation image: every one was skipped; replace the broken files in --data-dir")
    return 100.0 * correct / total


def restore_training(ckpt, path, opt, scaler):
    """Optimizer and scaler state back from a last.pt; returns (epochs done, step, best metric)."""
    if ckpt["optimizer"] is None:
        raise UserError(f"--resume: {path} holds no optimizer state (a best.pt); resume from last.pt")
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt["step"], ckpt["best_metric"]


def start_epoch(loader, epoch, seed, rank, skip_batches=0):
    """Everything random in an epoch (order, augmentation, dropout, PGD starts) follows from
    (seed, epoch, rank): resuming at an epoch boundary replays exactly what an uninterrupted run does.
    A mid-epoch resume skips the batches already trained on; its random state comes from the checkpoint."""
    torch.manual_seed(seed * 100_003 + epoch * 1_009 + rank)
    set_loader_epoch(loader, epoch, seed, skip_batches)


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


LOG_EVERY = 20   # training steps between progress-bar updates


def progress(loader, rank, desc):
    return tqdm(loader, desc=desc, disable=rank != 0, leave=False, dynamic_ncols=True)


def show_progress(bar, step, loss, lr, images, t0):
    """The bar's loss (this step's), lr and images/s since t0, every LOG_EVERY steps: reading a loss off the GPU
    waits for its step to finish, and doing that every step would idle the GPU while the host prepares the next."""
    if step % LOG_EVERY == 0 and not bar.disable:
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{images / (time.time() - t0):.0f}")


def check_train_args(args):
    """The shared data, model, optimisation and run flags (train_teacher.py, distill_partial.py): mistakes
    caught before anything is loaded or written."""
    check_data_args(args)
    check_aug_args(args)
    parse_kwargs(args.model_kwargs)
    for flag, value, ok, want in (
            ("--epochs", args.epochs, args.epochs >= 1, "at least 1"),
            ("--lr", args.lr, args.lr > 0, "a positive learning rate, e.g. 0.1 (SGD) or 1e-3 (AdamW)"),
            ("--momentum", args.momentum, 0 <= args.momentum < 1, "a value in [0, 1), e.g. 0.9"),
            ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "a value >= 0"),
            ("--smoothing", args.smoothing, 0 <= args.smoothing < 1, "a value in [0, 1), e.g. 0.1"),
            ("--warmup-epochs", args.warmup_epochs, 0 <= args.warmup_epochs <= args.epochs, "0 to --epochs"),
            ("--ssfd-peak", args.ssfd_peak, 0 < args.ssfd_peak < 1, "a fraction in (0, 1), e.g. 0.3"),
            ("--drop-path", args.drop_path, 0 <= args.drop_path < 1, "a rate in [0, 1)"),
            ("--stop-after", args.stop_after, args.stop_after >= 0, "0 (off) or an epoch"),
            ("--save-every", args.save_every, args.save_every >= 0, "0 (epoch ends only) or a number of steps")):
        if not (ok and math.isfinite(value)):
            raise UserError(f"{flag} {value:g}: give {want}")
    if args.pretrained_file and args.pretrained:
        raise UserError("--pretrained and --pretrained-file both given; keep one")
    for flag, path in (("--resume", args.resume), ("--pretrained-file", args.pretrained_file)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag}: file {path} does not exist")
    check_output(args.output, args.resume, args.overwrite)


def check_args(args):
    """Input mistakes, caught before any data or model is loaded."""
    check_train_args(args)
    if args.adv != "none":
        if args.adv_norm == "linf" and (args.adv_eps > 0.5 or args.adv_step > 0.5):
            raise UserError(f"--adv-eps {args.adv_eps:g} / --adv-step {args.adv_step:g} look like 0-255 units; give them "
                            f"in [0, 1], e.g. --adv-eps 8/255 --adv-step 2/255")
        if not (args.adv_eps > 0 and args.adv_step > 0) or args.adv_steps < 1:
            raise UserError("--adv pgd needs --adv-eps > 0, --adv-step > 0 and --adv-steps >= 1")
    if not (math.isfinite(args.jsd) and args.jsd >= 0) or (args.jsd and args.aug != "augmix"):
        raise UserError("--jsd needs AugMix views and a weight >= 0; add --aug augmix (e.g. --jsd 12)")
    if args.init_checkpoint and not os.path.isfile(args.init_checkpoint):
        raise UserError(f"--init-checkpoint: file {args.init_checkpoint} does not exist")


def run_main(fn, argv, parser):
    """Parse, run, and turn a UserError into one line on stderr and exit status 2 (no traceback)."""
    args = parser.parse_args(argv)
    try:
        return fn(args)
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:   # raised in a DataLoader worker, which wraps it: its own line only
            msg = msg.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if dist.is_initialized() and os.environ.get("ROBUSTIFY_KEEP_PG") != "1":
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- main

def model_checkpoint(args, kwargs, classes, cfg, net, opt, scaler, world):
    """The parts of a train_teacher.py checkpoint that do not depend on where in the run it is written."""
    return dict(schema=SCHEMA, kind="model", arch=args.arch, model_kwargs=kwargs, num_classes=len(classes),
                class_names=classes, data_config=cfg, model=net.model.state_dict(), optimizer=opt.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None, world=world, args=vars(args))


def train(args):
    check_args(args)
    rank, world, device = setup_distributed(args.device, args.deterministic)
    torch.manual_seed(args.seed)

    # The class count (from the folder names) decides the head; the model's data config the transforms.
    # Wrap order: build -> load weights into the bare module -> to(device) -> compile -> DDP.
    classes = class_names(args.dataset, args.data_dir)
    kwargs = parse_kwargs(args.model_kwargs)
    extra = {"drop_path_rate": args.drop_path} if args.drop_path else {}
    start = None
    if args.resume or args.init_checkpoint:
        flag = "--resume" if args.resume else "--init-checkpoint"
        start = load_checkpoint(args.resume or args.init_checkpoint, flag)
        if args.resume:
            check_resume(start, args, "model", "train_teacher.py", world, get_parser())
        elif start.get("kind") != "model":
            raise UserError(f"--init-checkpoint: {args.init_checkpoint} is a {start.get('kind')} checkpoint, not a "
                            f"train_teacher.py model")
        if start.get("arch") != args.arch or start.get("num_classes") != len(classes):
            raise UserError(f"{flag}: {args.resume or args.init_checkpoint} holds a {start.get('arch')} with "
                            f"{start.get('num_classes')} classes; this run builds a {args.arch} with {len(classes)}")
        if kwargs and kwargs != start["model_kwargs"]:
            raise UserError(f"--model-kwargs: {args.resume or args.init_checkpoint} holds a model built with "
                            f"{start['model_kwargs']}; leave --model-kwargs out (the checkpoint brings its own)")
        kwargs = start["model_kwargs"]
    # a starting checkpoint holds the weights: nothing to fetch or load before them
    model = create_model(args.arch, len(classes), args.pretrained and start is None,
                         args.pretrained_file if start is None else None, kwargs, class_names=classes, **extra)
    kwargs = model.timm_kwargs   # what it was built with (a --pretrained-file checkpoint brings its own)
    if start is not None:
        model.load_state_dict(start["model"])
    cfg = model_data_config(model, args.img_size or native_size(args.dataset))

    n_aug = 2 if args.jsd else (1 if args.aug == "augmix" else 0)
    train_tf, eval_tf = image_transforms(args.dataset, cfg)
    train_views, batch_aug = augmix_views(train_tf, n_aug, args.aug_device, args.aug_severity, args.aug_width,
                                    args.aug_depth, args.aug_all_ops)
    train_set, val_set = build_datasets(args.dataset, args.data_dir, train_views, Views(eval_tf),
                                        args.train_subset, args.val_subset)
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, args.batch_size, args.workers, True, rank, world, args.seed, pin)
    val_loader = make_loader(val_set, args.batch_size, args.workers, False, rank, world, pin=pin)
    if len(train_loader) == 0:
        raise UserError(f"-b/--batch-size {args.batch_size} x {world} processes is larger than the "
                        f"{len(train_set)} training images; lower it")
    log = RunLog(args.output, rank, args, args.overwrite, start["step"] if args.resume else 0)
    if args.resume and rank == 0:
        restore_best(start, args.resume, args.output)

    net = Normalized(model, cfg).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    fwd = torch.compile(net) if args.compile else net
    ddp = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else fwd

    opt = build_optimizer(net.parameters(), args.opt, args.lr, args.weight_decay, args.momentum, device)
    autocast, scaler = amp_setup(device, args.amp, args.amp_dtype)
    epoch, step, best, acc, best_step, skip = 0, 0, -1.0, None, None, 0
    if args.resume:
        epoch, step, best = restore_training(start, args.resume, opt, scaler)
        acc, best_step, skip = start["metric"], start.get("best_step"), start.get("batch", 0)
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
        start_epoch(train_loader, epoch, args.seed, rank, skip)
        net.train()
        t0, seen, skipped0 = time.time(), 0, skipped_images(train_set)
        loss_sum = torch.tensor(0.0, dtype=torch.float64, device=device)   # summed on the device: no wait per step
        if skip:   # mid-epoch resume: this rank's random state and epoch counters as they were
            mid = restore_rank_state(start["ranks"], rank, device)
            seen, skipped0 = mid["seen"], skipped0 - mid["skipped"]
            loss_sum.fill_(mid["loss_sum"])
        seen0 = seen   # images/s counts what this process trains
        bar = progress(train_loader, rank, f"epoch {epoch + 1}/{args.epochs}")
        for i, batch in enumerate(bar, skip):
            if batch is None:
                unreadable_batch(world, rank)
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
            loss_sum += loss.detach()
            show_progress(bar, step, loss, lr, seen - seen0, t0)
            if args.save_every and step % args.save_every == 0 and i + 1 < len(train_loader):
                ranks = rank_states(device, seen=seen, loss_sum=loss_sum.item(),
                                    skipped=skipped_images(train_set) - skipped0)
                if rank == 0:
                    save_run(args.output, dict(model_checkpoint(args, kwargs, classes, cfg, net, opt, scaler, world),
                                               epoch=epoch, step=step, batch=i + 1, ranks=ranks, metric=acc,
                                               best_metric=best, best_step=best_step), False)
        loss_sum = loss_sum.item()   # waits for the device's last steps, so that train_time counts them
        skip = 0
        epoch += 1
        train_time = time.time() - t0
        acc = evaluate(fwd, val_loader, device, autocast)
        skipped = all_sum([skipped_images(train_set) - skipped0], device)[0]
        is_best = acc > best
        best, best_step = max(best, acc), step if is_best else best_step
        train_loss = all_sum([loss_sum], device)[0] / max(1, world * len(train_loader))   # every rank's batches
        metrics = dict(epoch=epoch, step=step, lr=lr, train_loss=train_loss, val_acc=acc,
                       best_acc=best, epoch_time_s=round(train_time, 2), img_s=round((seen - seen0) / train_time, 1),
                       skipped_images=int(skipped))
        log(f"epoch {epoch}: loss {metrics['train_loss']:.4f}  val top-1 {acc:.2f}%  ({train_time:.0f}s, "
            f"{metrics['img_s']:.0f} img/s{f', {int(skipped)} unreadable images skipped' if skipped else ''})", **metrics)
        if rank == 0:
            save_run(args.output, dict(model_checkpoint(args, kwargs, classes, cfg, net, opt, scaler, world),
                                       epoch=epoch, step=step, batch=0, ranks=None, metric=acc, best_metric=best,
                                       best_step=best_step), is_best)
        if args.stop_after and epoch >= args.stop_after:
            break
    agree = ranks_agree(net, device)
    result = dict(arch=args.arch, epochs_done=epoch, step=step, lr=lr, val_acc=acc, best_acc=best,
                  train_time_s=round(time.time() - t_start, 2),
                  trainable_params=sum(p.numel() for p in net.parameters()), ranks_agree=agree)
    log("final: " + json.dumps(result), final=result)
    log.close()
    return result


def main(argv=None):
    return run_main(train, argv, get_parser())


if __name__ == "__main__":
    main()
