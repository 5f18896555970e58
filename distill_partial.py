"""Robustify a large pre-trained model by tuning a copy of its last K blocks with a robust teacher.

The method of Jain, Behl, Rawat, Vineet, "Efficiently Robustify Pre-trained Models" (ICCV 2023), as
reconstructed in docs/DESIGN.md section 3 (the paper has no public code):

    h  = trunk(x)                     # frozen, no autograd, once per view
    clean    = h0(tail(h))            # the original model, bit for bit (zero-shot/transfer kept)
    f  = branch(h)                    # trainable deep copy of tail (last K blocks + norm/pool)
    robust   = h_r(f); combined = h_m(f)          # two new heads, initialised from h0
    q  = w * softmax(teacher(x')/T) + (1 - w) * softmax(clean(x')/T)   # uncertainty-aware KD target,
         w = (1 - u_teacher) / ((1 - u_teacher) + (1 - u_student)), u = entropy / log C
    L  = (1-lam) CE(robust(x'), y) + lam T^2 KL(q || robust(x')/T) + CE(combined(x), y) + CE(combined(x'), y)
    inference: s = KL(p_clean || p_robust); s <= tau -> clean head, else the lower-entropy of robust/combined

    python distill_partial.py --student vit_l16 --pretrained --teacher runs/teacher/best.pt --tune-last 4 \
        --data-dir /data/imagenet --amp
    torchrun --nproc_per_node=8 distill_partial.py ...          # same flags
    python distill_partial.py --dataset fashion-mnist --student vit_small_patch16_224 \
        --pretrained-file runs/student_pre/best.pt --teacher runs/teacher/best.pt --tune-last 2   # CPU

Baselines, same script: complete AugMix fine-tuning (--tune-last all --teacher none), partial tuning
without a teacher (--teacher none), FTP (--opt ftp), WiSE-FT (wise_ft(), swept in evaluate.py).
The checkpoint holds only the delta (branch, two heads, tau) plus what rebuilds the rest.
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import re
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (UserError, Views, add_aug_args, add_data_args, build_datasets, class_names, holdout,
                  image_transforms, make_loader, native_size, skipped_images, with_transform)
from data import augmix_views, device_views  # own line: eases merging the import above
from train_teacher import (SCHEMA, Normalized, RunLog, add_model_args, add_train_args, all_sum, amp_setup,
                           check_resume, check_train_args, create_model, load_checkpoint, load_model, lr_at,
                           model_data_config, parse_kwargs, progress, rank_states, ranks_agree, restore_best,
                           restore_rank_state, restore_training, run_main, save_run, set_lr, setup_distributed,
                           show_progress, start_epoch, unreadable_batch)

STUDENT_ALIASES = {
    "vit_b16": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_l16": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "vit_h14": "vit_huge_patch14_clip_224.laion2b_ft_in12k_in1k",
    "clip_b16": "vit_base_patch16_clip_224.openai_ft_in1k",
    "clip_l14": "vit_large_patch14_clip_224.openai_ft_in1k",
}
HEADS = ("clean", "robust", "combined")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    add_model_args(p, ("--student",), default="vit_l16")
    p.add_argument("--teacher", default="none", help="robust teacher: a train_teacher.py checkpoint, a timm name "
                   "(hub weights), or 'none' (the no-teacher baselines)")
    p.add_argument("--tune-last", default="4", help="blocks to tune in the branch: K, or 'all' (complete fine-tuning)")
    p.add_argument("--tune-first", type=int, default=None, help="instead: the branch is a copy of the first K blocks, "
                   "whose output runs through the frozen later blocks (see BranchStudent)")
    p.add_argument("--kd-target", default="uncertainty", choices=["uncertainty", "teacher"],
                   help="the KD target on the AugMix view: the uncertainty-weighted mix of teacher and frozen "
                   "student, or the teacher alone")
    p.add_argument("--kd-temp", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--kd-weight", type=float, default=0.5, help="lam: weight of the KD term in the robust loss")
    p.add_argument("--jsd", type=float, nargs="?", const=12.0, default=0.0, help="Jensen-Shannon consistency "
                   "weight over the combined head's clean view and 2 AugMix views (0 = off, 1 view; --jsd alone: 12, "
                   "AugMix's recipe, e.g. for complete AugMix fine-tuning)")
    p.add_argument("--branch-dropout", type=float, default=0.1, help="dropout on branch features before the "
                   "new heads (also the MC dropout of --mc-samples)")
    p.add_argument("--mc-samples", type=int, default=1, help="MC-dropout passes for head selection")
    p.add_argument("--calib-size", type=int, default=1000, help="clean training images held out to calibrate tau")
    p.add_argument("--tau-quantile", type=float, default=0.95, help="tau = this quantile of KL(clean||robust) "
                   "on the held-out slice")
    add_train_args(p, lr=1e-4, opt="adamw", epochs=3, opts=("adamw", "sgd", "ftp"))
    p.set_defaults(output="runs/student", weight_decay=None)   # 0.05; FTP: 0 (it pulls toward the start, not 0)
    add_aug_args(p)
    return p


# ----------------------------------------------------------------------------- the branch student

def student_blocks(model):
    """('vit', blocks) for timm's VisionTransformer (CLIP towers included; not the distilled DeiT with its
    two heads), ('cnn', blocks) for timm's ResNet family (the residual blocks of layer1..layer4 in
    order); None for other models (BEiT, EVA, ConvNeXt, ...: only --tune-last all works for them)."""
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(model, VisionTransformer) and getattr(model, "dist_token", None) is None:
        return "vit", list(model.blocks)
    stem_parts = ("conv1", "bn1", "act1", "maxpool", "global_pool", "fc")
    if all(hasattr(model, a) for a in stem_parts + tuple(f"layer{i}" for i in range(1, 5))):
        return "cnn", [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    return None, []


def pool_tokens(h, pool_type, prefix, include_prefix):
    """timm's global_pool_nlc (not in every timm 1.0.x): pool a ViT's tokens [B, N, D] to [B, D]."""
    if pool_type == "token":
        return h[:, 0]
    h = h if include_prefix else h[:, prefix:]
    if pool_type == "avg":
        return h.mean(1)
    if pool_type == "max":
        return h.amax(1)
    if pool_type == "avgmax":
        return 0.5 * (h.amax(1) + h.mean(1))
    return h


def depth(model):
    return len(student_blocks(model)[1])


class Tail(nn.Module):
    """The last k blocks of a timm model and what follows them up to the head's input (final norm,
    pooling). With k = depth it is the whole feature extractor (complete fine-tuning).
    Built from references: a deepcopy of a Tail copies exactly those modules, nothing more."""

    def __init__(self, model, k):
        super().__init__()
        family, blocks = student_blocks(model)
        self.family, self.full = family, k == len(blocks)
        if self.full:
            self.model = model
            return
        self.blocks = nn.Sequential(*blocks[len(blocks) - k:])
        if family == "vit":
            self.norm, self.fc_norm, self.head_drop = model.norm, model.fc_norm, model.head_drop
            self.attn_pool = model.attn_pool
            self.pool_type, self.prefix = model.global_pool, model.num_prefix_tokens
            self.include_prefix = getattr(model, "pool_include_prefix", False)
        else:
            self.global_pool, self.drop_rate = model.global_pool, float(model.drop_rate)

    def forward(self, h):
        if self.full:
            return self.model.forward_head(self.model.forward_features(h), pre_logits=True)
        h = self.norm(self.blocks(h)) if self.family == "vit" else self.blocks(h)
        if self.family == "cnn":
            return F.dropout(self.global_pool(h), self.drop_rate, self.training)
        if self.attn_pool is not None:
            h = self.attn_pool(h if self.include_prefix else h[:, self.prefix:])
        elif self.pool_type:
            h = pool_tokens(h, self.pool_type, self.prefix, self.include_prefix)
        return self.head_drop(self.fc_norm(h))


def stem(model, x):
    """What comes before the first block of a timm ViT (patch and position embedding) or ResNet."""
    if student_blocks(model)[0] == "vit":
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    return model.maxpool(model.act1(model.bn1(model.conv1(x))))


def trunk(model, x, k):
    """Stem and the first depth-k blocks of a timm model (nothing when k = depth)."""
    family, blocks = student_blocks(model)
    if k == len(blocks):
        return x
    x = stem(model, x)
    for blk in blocks[:len(blocks) - k]:
        x = blk(x)
    return x


class BranchStudent(nn.Module):
    """Frozen pre-trained model + trainable branch with robust and combined heads. Takes images in [0, 1];
    forward returns (clean, robust, combined) logits.

    at="end" (docs/DESIGN.md 3): the branch is a copy of the last k blocks (+ final norm/pool), fed by the frozen
    trunk's features. at="start" (the variant docs/DESIGN.md 3 invites us to measure): the branch is a copy of the
    first k blocks, fed by the frozen stem, and its output runs through the frozen later blocks (their weights
    fixed, gradients flowing through them). Input-level corruptions damage early features, which a copy of
    the last blocks cannot undo (surgical fine-tuning, Lee et al., ICLR 2023: for input-level shifts tuning the
    first block beats tuning the last). Either way the clean head is the original model, bit for bit."""

    def __init__(self, model, data_config, k, branch_dropout=0.0, at="end"):
        super().__init__()
        family, blocks = student_blocks(model)
        flag = "--tune-first" if at == "start" else "--tune-last"
        if not isinstance(model.get_classifier(), nn.Module):
            raise UserError(f"{flag} {k}: {type(model).__name__} has several classifiers "
                            f"({type(model.get_classifier()).__name__}); give a student with one")
        if k not in ("all", len(blocks)) and family is None:   # a saved delta of 'all' holds k = len(blocks) = 0
            raise UserError(f"{flag} {k}: {type(model).__name__} is neither a timm ViT nor a ResNet-style CNN; "
                            f"only --tune-last all works for it")
        k = len(blocks) if k == "all" else int(k)
        if family is not None and not 1 <= k <= len(blocks) - (at == "start"):
            raise UserError(f"{flag} {k}: the student has {len(blocks)} blocks; give 1..{len(blocks) - (at == 'start')}"
                            + (" (at least one block must stay after the copy)" if at == "start" else " or 'all'"))
        self.k, self.n_blocks, self.at = k, len(blocks), at
        self.tau, self.p_drop = float("inf"), branch_dropout
        self.wrap = Normalized(model, data_config)   # resize + normalise; holds the frozen model
        model.requires_grad_(False)
        if at == "start":
            self.front = nn.Sequential(*blocks[:k])       # the original first k blocks (references, frozen)
            self.tail = Tail(model, len(blocks) - k)      # the frozen later blocks, shared by both paths
            self.branch = copy.deepcopy(self.front).requires_grad_(True)
        else:
            self.tail = Tail(model, k)
            self.branch = copy.deepcopy(self.tail).requires_grad_(True)
            if self.branch.full:   # the whole model was copied: its classifier is replaced by the new heads
                self.branch.model.reset_classifier(0)
        self.head_clean = model.get_classifier()
        self.head_robust = copy.deepcopy(self.head_clean).requires_grad_(True)
        self.head_combined = copy.deepcopy(self.head_clean).requires_grad_(True)
        self.eval()
        self._check_clean_path(flag)

    @torch.no_grad()
    def _check_clean_path(self, flag):
        """The clean head must be the original model: one image through both, refused if they differ
        (a timm variant whose forward does more than stem -> blocks -> norm -> pool)."""
        x = torch.rand(1, 3, *self.wrap.size, generator=torch.Generator().manual_seed(0))
        x = x.to(next(self.model.parameters()).device)
        clean = self(x, clean_rows=slice(0, 1))[0]
        if not torch.allclose(clean, self.model(self.wrap.normalize(x)), rtol=1e-4, atol=1e-5):
            raise UserError(f"{flag} {self.k}: {type(self.model).__name__}'s forward is more than its stem and "
                            f"blocks in order and its head, so the branch cannot keep its clean head exact")

    @property
    def model(self):
        return self.wrap.model

    @property
    def origin(self):
        """The frozen modules the branch was copied from (its starting weights, for WiSE-FT)."""
        return self.front if self.at == "start" else self.tail

    def train(self, mode=True):
        super().train(mode)
        self.wrap.eval()   # the original model never leaves eval mode: the clean head stays exact
        self.tail.eval()   # nor the tail's own CNN head dropout (Tail is not inside wrap)
        return self

    def trainable(self):
        """The modules that train: the branch and the two new heads."""
        return [self.branch, self.head_robust, self.head_combined]

    def _paths(self, x, clean_rows=None, grad=False):
        """(frozen features of the clean head for clean_rows, branch features of every row)."""
        with torch.enable_grad() if grad else torch.no_grad():   # never train the frozen weights
            xn = self.wrap.normalize(x)
            if self.at == "start":
                h = stem(self.model, xn)
                hc = h if clean_rows is None else h[clean_rows]
                clean = self.tail(self.front(hc)) if len(hc) else None
            else:
                h = trunk(self.model, xn, self.k)
                hc = h if clean_rows is None else h[clean_rows]
                clean = self.tail(hc) if len(hc) else None
        f = self.branch(h)
        return clean, (self.tail(f) if self.at == "start" else f)   # grads flow through the frozen tail

    def features(self, x, head="robust"):
        """Input features of a head: 'clean' -> the original model's, else the branch path's (no dropout)."""
        if head == "clean":
            return self._paths(x)[0]
        return self._paths(x, clean_rows=slice(0, 0))[1]

    def forward(self, x, clean_rows=None, mc_samples=1, input_grad=False):
        """(clean, robust, combined) logits. clean_rows (a slice) limits the frozen clean path to
        those rows (training needs it only on the augmented view); mc_samples > 1 keeps dropout on and
        returns robust/combined as [S, B, C]; input_grad lets gradients reach x (for PGD)."""
        hc, f = self._paths(x, clean_rows, input_grad)
        with torch.enable_grad() if input_grad else torch.no_grad():
            clean = self.head_clean(hc) if hc is not None else None
        if mc_samples > 1:
            f = torch.stack([F.dropout(f, self.p_drop, True) for _ in range(mc_samples)])
        else:
            f = F.dropout(f, self.p_drop, self.training)
        return clean, self.head_robust(f), self.head_combined(f)


def entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def select_head(clean, robust, combined, tau):
    """Head selection at inference (docs/DESIGN.md 3): s = KL(p_clean || p_robust); s <= tau -> clean
    head, else whichever of robust/combined has the lower entropy. robust/combined may carry MC-dropout
    samples [S, B, C] (their probabilities are averaged). Returns (log-probs [B, C], choice [B], s [B])."""
    p = [clean.float().softmax(-1), robust.float().softmax(-1), combined.float().softmax(-1)]
    p = [q.mean(0) if q.dim() == 3 else q for q in p]
    s = (p[0] * (p[0].clamp_min(1e-12).log() - p[1].clamp_min(1e-12).log())).sum(-1)
    choice = torch.where(s <= tau, 0, torch.where(entropy(p[1]) <= entropy(p[2]), 1, 2))
    probs = torch.stack(p)[choice, torch.arange(len(choice), device=choice.device)]
    return probs.clamp_min(1e-12).log(), choice, s


def answer(clean, robust, combined, head, tau):
    """The logits a head gives ('clean', 'robust', 'combined'), or the selector's ('auto'), from the
    three heads' outputs (robust/combined may carry MC samples [S, B, C])."""
    if head == "auto":
        return select_head(clean, robust, combined, tau)[0]
    out = dict(clean=clean, robust=robust, combined=combined)[head]
    return out.float().softmax(-1).mean(0).log() if out.dim() == 3 else out


def predict(student, x, head="auto", mc_samples=1, grad=False):
    """Logits of one head or of the selector ('auto'); grad=True keeps the graph to the input (PGD)."""
    with torch.set_grad_enabled(grad):
        return answer(*student(x, mc_samples=mc_samples, input_grad=grad), head, student.tau)


@torch.no_grad()
def calibrate_tau(student, loader, device, quantile=0.95, mc_samples=1, autocast=None, seed=0):
    """tau = quantile of s = KL(p_clean || p_robust) on held-out clean training images: about
    (1 - quantile) of in-distribution inputs are then routed away from the clean head."""
    student.eval()
    scores = []
    # MC-dropout masks from a fixed seed: every rank (each scores the whole slice) gets the same tau
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in loader:
            if batch is None:
                continue
            x = batch[0].to(device, non_blocking=True)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                scores.append(select_head(*student(x, mc_samples=mc_samples), float("inf"))[2].float())
    if not scores:
        raise UserError("no readable image in the calibration slice (--calib-size); replace the broken files "
                        "in --data-dir")
    return float(torch.quantile(torch.cat(scores).cpu(), quantile))


# ----------------------------------------------------------------------------- the losses

def kd_target(teacher_logits, student_logits, T):
    """Uncertainty-aware KD target (docs/DESIGN.md 3, our reconstruction): per sample, mix the teacher's
    and the frozen student's softened distributions, each weighted by its confidence 1 - H/log C.
    Returns (q [B, C], w [B]) where w is the teacher's share."""
    t, o = (teacher_logits.float() / T).softmax(-1), (student_logits.float() / T).softmax(-1)
    log_c = math.log(t.shape[-1])
    conf_t, conf_o = 1 - entropy(t) / log_c, 1 - entropy(o) / log_c
    w = (conf_t + 1e-6) / (conf_t + conf_o + 2e-6)
    return w[:, None] * t + (1 - w[:, None]) * o, w


def method_loss(robust_aug, combined_clean, combined_aug, y, q=None, T=2.0, lam=0.5, smoothing=0.0, jsd=0.0):
    """L = (1-lam) CE(h_r(x'), y) + lam T^2 KL(q || softmax(h_r(x')/T)) + CE(h_m(x), y) + CE(h_m(x'), y),
    in fp32 (each CE with label smoothing `smoothing`). Without a teacher (q None) the robust head is
    trained with cross-entropy alone. With n AugMix views per image (--jsd: 2), robust_aug, combined_aug and
    q hold them view after view (n B rows for the B labels y) and each x' term is their mean. jsd > 0 adds
    AugMix's Jensen-Shannon consistency over the combined head's clean view and its AugMix views:
    jsd * mean_i KL(p_i || m), m = mean_i p_i (clamped to [1e-7, 1], as in AugMix and timm)."""
    robust_aug, combined_clean, combined_aug = robust_aug.float(), combined_clean.float(), combined_aug.float()
    ce = functools.partial(F.cross_entropy, label_smoothing=smoothing)
    n = len(robust_aug) // len(y)
    y_aug = y.repeat(n)
    loss_r = ce(robust_aug, y_aug)
    if q is not None and lam > 0:
        kd = F.kl_div((robust_aug / T).log_softmax(-1), q, reduction="batchmean") * T * T
        loss_r = (1 - lam) * loss_r + lam * kd
    loss = loss_r + ce(combined_clean, y) + ce(combined_aug, y_aug)
    if jsd:
        probs = [combined_clean.softmax(-1), *combined_aug.softmax(-1).chunk(n)]
        log_mix = torch.stack(probs).mean(0).clamp(1e-7, 1).log()
        loss = loss + jsd * sum(F.kl_div(log_mix, p, reduction="batchmean") for p in probs) / len(probs)
    return loss


# ----------------------------------------------------------------------------- FTP (--opt ftp)

class FTP(torch.optim.Optimizer):
    """AdamW with Fast Trainable Projection (Tian et al., "Fast Trainable Projection for Robust
    Fine-Tuning", NeurIPS 2023; successor of TPGM, CVPR 2023).

    Each projected tensor W stays inside a per-row L1 ball around its anchor W0 (its value when the
    optimizer is built); the radius r (one scalar per tensor) is learned inside the step from a
    one-step-delayed hyper-gradient, so no extra forward/backward passes. Per step and tensor:

        1. if a previous step exists:
               g_r = sum(grad * c_prev / n_prev)          # dL/dr through last step's projection
               g_r = k * g_r if g_r > 0                   # k > 1 shrinks the radius faster
               r   = Adam(r, g_r; radius_lr, radius_betas, eps 1e-8, bias corrected)
               r   = clip(r, 1e-8, max(n_prev))
           else r = 1e-8
        2. W' = AdamW(W, grad); c = W' - W0
        3. n  = per-row L1 norm of c (rows = dim 0; a 1-D tensor is one row)
        4. W  = W0 + clamp(r / n, 0, 1) * c;  c_prev, n_prev = c, n

    Param groups carry `project` (default True); `project=False` groups (new heads) get plain AdamW.
    All state (moments, steps, anchor, radius and its Adam, c_prev, n_prev) is kept as tensors in
    `self.state[p]`, so `state_dict()` / `load_state_dict()` resume exactly. The paper uses
    weight_decay=0 with FTP. Meant for fp32 (master) parameters.

    Differences from the public code (github.com/GT-RIPL/FTP), on purpose: the radius Adam counts
    its own steps (the public one reuses the global counter, already 2 at its first update, so its
    first radius step is ~0.74 * radius_lr); the clip's upper bound is max(n_prev) (the public one
    uses the current step's n); n is clamped below by 1e-12 instead of adding 1e-8; the anchor is
    cloned here, not passed in; and the radius state is saved in the state dict.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, k=1.0,
                 radius_lr=1e-2, radius_betas=(0.9, 0.999)):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k=k,
                        radius_lr=radius_lr, radius_betas=radius_betas, project=True)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        # Also called by __init__: the anchor W0 is the value of each projected tensor right now.
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["project"]:
            for p in group["params"]:
                zero = torch.zeros((), dtype=torch.float32, device=p.device)
                self.state[p].update(anchor=p.detach().clone(), radius=zero + 1e-8,
                                     radius_exp_avg=zero.clone(), radius_exp_avg_sq=zero.clone(),
                                     radius_step=zero.clone())

    def load_state_dict(self, state_dict):
        # torch casts floating state to each parameter's dtype; the radius and its Adam stay fp32 as saved,
        # so a resume with bf16/fp64 parameters is exact.
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip((p for g in self.param_groups for p in g["params"]), ids):
            for key, value in state_dict["state"].get(i, {}).items():
                if key.startswith("radius"):
                    self.state[p][key] = value.to(p.device, copy=True)

    @staticmethod
    def _row_l1(c):
        # Step 3: L1 norm per output row (dim 0), kept broadcastable against c; tiny floor.
        if c.dim() < 2:
            return c.abs().sum().reshape([1] * c.dim()).clamp_min(1e-12)
        return c.abs().sum(dim=tuple(range(1, c.dim())), keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            wd = group["weight_decay"]
            rb1, rb2 = group["radius_betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

                if group["project"] and "prev_c" in state:
                    # Step 1: one-step-delayed radius hyper-gradient, then the radius's own Adam.
                    g_r = (grad * state["prev_c"] / state["prev_n"]).sum()
                    g_r = torch.where(g_r > 0, g_r * group["k"], g_r)
                    state["radius_step"] += 1
                    state["radius_exp_avg"].mul_(rb1).add_(g_r, alpha=1 - rb1)
                    state["radius_exp_avg_sq"].mul_(rb2).addcmul_(g_r, g_r, value=1 - rb2)
                    m_hat = state["radius_exp_avg"] / (1 - rb1 ** state["radius_step"])
                    v_hat = state["radius_exp_avg_sq"] / (1 - rb2 ** state["radius_step"])
                    r = state["radius"] - group["radius_lr"] * m_hat / (v_hat.sqrt() + 1e-8)
                    state["radius"].copy_(r.clamp(min=1e-8).minimum(state["prev_n"].max()))

                # Step 2: the base AdamW update (decoupled weight decay), as torch.optim.AdamW.
                state["step"] += 1
                t = state["step"].item()
                p.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
                if not group["project"]:
                    continue

                # Steps 2-4: deviation from the anchor, row norms, scale rows back into the ball.
                c = p - state["anchor"]
                n = self._row_l1(c)
                p.copy_(state["anchor"] + (state["radius"] / n).clamp(0, 1) * c)
                state["prev_c"], state["prev_n"] = c, n
        return loss


# ----------------------------------------------------------------------------- WiSE-FT and the delta

@torch.no_grad()
def wise_ft(student, alpha):
    """WiSE-FT (Wortsman et al. 2022) without retraining: a new student whose branch and new heads are
    (1 - alpha) * their starting weights + alpha * the tuned ones. The starting weights are the frozen
    tail and clean head, so alpha 0 is the original model and alpha 1 the tuned student. tau stays the
    tuned student's (calibrated at alpha 1): --head auto at other alphas routes with that threshold."""
    out = copy.deepcopy(student)
    start = dict(out.origin.named_parameters())
    if out.at == "end" and out.branch.full:   # the branch copy has no classifier; the tail's copy does
        start = {k: v for k, v in start.items() if k in dict(out.branch.named_parameters())}
    for name, p in out.branch.named_parameters():
        p.lerp_(start[name].to(p.dtype), 1 - alpha)
    start = dict(out.origin.named_buffers())   # BN running statistics move with their weights (CNN students)
    for name, b in out.branch.named_buffers():
        if b.is_floating_point():
            b.lerp_(start[name].to(b.dtype), 1 - alpha)
    for head in (out.head_robust, out.head_combined):
        for p, p0 in zip(head.parameters(), out.head_clean.parameters()):
            p.lerp_(p0.to(p.dtype), 1 - alpha)
    return out


def fingerprint(model):
    """sha256 over a model's tensors: refuses a delta applied to the wrong base weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def delta_state(student):
    """What a student checkpoint stores: the branch and the two new heads, nothing frozen."""
    keep = ("branch.", "head_robust.", "head_combined.")
    return {k: v for k, v in student.state_dict().items() if k.startswith(keep)}


def build_base(base, pretrained_file=None):
    """Rebuild the frozen base model a delta was trained on, and check it is the same one. The seed
    rebuilds what the weights do not hold: a random-init base, or a classifier made for new classes."""
    if "seed" in base:
        torch.manual_seed(base["seed"])
    file = pretrained_file or base.get("file")
    if base["source"] == "file" and not os.path.isfile(file or ""):
        raise UserError(f"the base weights {file} of this delta are missing; pass the file with --base-file")
    from_file = base["source"] == "file" or pretrained_file is not None   # --base-file stands in for the hub too
    model = create_model(base["arch"], base["num_classes"], base["source"] == "hub" and not from_file,
                         file if from_file else None, base["model_kwargs"],
                         flag="--base-file" if pretrained_file else "the delta's base weights")
    if fingerprint(model) != base["fingerprint"]:
        raise UserError(f"the base weights ({file or base['arch']}) differ from those the delta was trained on "
                        f"(sha256 {base.get('sha256', '?')[:12]}); pass the original file with --base-file")
    return model


def load_student(path, base_file=None, flag="--checkpoint"):
    """Rebuild the full multi-head student from a delta checkpoint (timm name + base weights + delta)."""
    ckpt = load_checkpoint(path, flag)
    if ckpt.get("kind") != "delta":
        raise UserError(f"{flag}: {path} is a {ckpt.get('kind')} checkpoint, not a distill_partial.py delta")
    model = build_base(ckpt["base"], base_file)
    student = BranchStudent(model, ckpt["data_config"], ckpt["k"], ckpt["branch_dropout"], ckpt.get("at", "end"))
    missing, unexpected = student.load_state_dict(ckpt["model"], strict=False)
    if unexpected or any(k.startswith(("branch.", "head_robust.", "head_combined.")) for k in missing):
        raise UserError(f"{flag}: {path} does not fit a {ckpt['base']['arch']} with "
                        f"{'--tune-first' if ckpt.get('at') == 'start' else '--tune-last'} {ckpt['k']}")
    student.tau = ckpt["tau"]
    return student.eval(), ckpt


# ----------------------------------------------------------------------------- main

def load_teacher(spec, num_classes, classes, size):
    """A frozen, eval-mode teacher wrapped with its own normalisation and input size, or None."""
    if spec == "none":
        return None
    if os.path.isfile(spec):
        teacher, ckpt = load_model(spec, "--teacher")
        if ckpt["num_classes"] != num_classes or ckpt.get("class_names", classes) != classes:
            raise UserError(f"--teacher: {spec} was trained on another label space ({ckpt['num_classes']} classes: "
                            f"{', '.join(map(str, ckpt.get('class_names', [])[:3]))}, ...) than the student's data "
                            f"({num_classes}: {', '.join(map(str, classes[:3]))}, ...); train it on the same classes")
    else:
        import timm.models
        try:
            hub_classes = getattr(timm.models.get_pretrained_cfg(spec, allow_unregistered=True), "num_classes", None)
        except RuntimeError as e:   # e.g. a tag timm does not know
            raise UserError(f"--teacher {spec}: {str(e).splitlines()[0]}") from None
        if hub_classes is not None and hub_classes != num_classes:
            raise UserError(f"--teacher {spec}: its hub weights classify {hub_classes} classes, the data has "
                            f"{num_classes}: its classifier would be untrained; train a teacher on these classes "
                            f"(train_teacher.py) and pass its checkpoint")
        model = create_model(spec, num_classes, pretrained=True)
        teacher = Normalized(model, model_data_config(model, size)).eval()
    return teacher.requires_grad_(False)


def base_record(args, arch, model, num_classes):
    if args.pretrained_file:
        source = dict(source="file", file=os.path.abspath(args.pretrained_file), sha256=file_sha256(args.pretrained_file))
    elif args.pretrained:
        source = dict(source="hub")
    else:
        source = dict(source="init")
    return dict(source, seed=args.seed, arch=arch, num_classes=num_classes, model_kwargs=model.timm_kwargs,
                fingerprint=fingerprint(model))


def build_optimizer(student, opt, lr, weight_decay, device, momentum=0.9):
    """AdamW (fused on CUDA) / SGD over branch and heads; FTP projects the branch only."""
    branch = list(student.branch.parameters())
    heads = [p for h in (student.head_robust, student.head_combined) for p in h.parameters()]
    if opt == "ftp":
        return FTP([{"params": branch, "project": True}, {"params": heads, "project": False}], lr=lr,
                   weight_decay=weight_decay)
    groups = [{"params": branch + heads, "weight_decay": weight_decay}]
    if opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda" or None)


@torch.no_grad()
def head_accuracy(student, loader, device, autocast, mc_samples=1):
    """Top-1 (%) of each head and of the selector on a loader, reduced over ranks."""
    student.eval()
    correct, total = torch.zeros(4, dtype=torch.long, device=device), 0   # counted on the device: no wait per batch
    for batch in loader:
        if batch is None:
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast():
            logits = student(x, mc_samples=mc_samples)
        heads = [z.float().softmax(-1).mean(0) if z.dim() == 3 else z for z in logits]
        correct += torch.stack([(z.argmax(-1) == y).sum() for z in (*heads, select_head(*logits, student.tau)[0])])
        total += len(y)
    sums = all_sum(correct.tolist() + [total], device)
    if sums[-1] == 0:
        raise UserError("no readable validation image: every one was skipped; replace the broken files in --data-dir")
    return {name: 100.0 * c / max(1, sums[-1]) for name, c in zip((*HEADS, "auto"), sums[:-1])}


def compile_models(student, teacher=None, mode="default"):
    """torch.compile in place (state_dict keys stay clean): the whole student, its frozen trunk included
    (with K of 24 blocks tuned the trunk's forward is most of a step), and the teacher."""
    student.compile(mode=mode)
    if teacher is not None:
        teacher.compile(mode=mode)


def train_step(student, teacher, x, y, opt, scaler, autocast, kd_temp, kd_weight, kd_mode="uncertainty",
               smoothing=0.0, jsd=0.0):
    """One step of the method on x = [clean views; AugMix views] ((1 + n) B images: n = 2 with --jsd, else 1)
    and labels y (B).
    student may be DDP-wrapped: a single forward call, so DDP sees every trainable parameter once.
    Returns (loss, view stats): on the AugMix views, how many the frozen student and the teacher get right
    and the sum of the teacher's KD weight w (zeros where not computed). Useful views are ones the frozen
    student gets wrong and the teacher right: too mild an augmentation teaches the branch nothing new."""
    b = len(y)
    n = len(x) // b - 1   # AugMix views per image
    with autocast():
        # the frozen clean path runs only on the augmented half, where the KD target (and the view stats) need it
        uses_clean = teacher is not None
        clean, robust, combined = student(x, clean_rows=slice(b, None) if uses_clean else slice(0, 0))
        q = None
        if teacher is not None:
            with torch.inference_mode():
                t_logits = teacher(x[b:])
            t_logits = t_logits.clone()   # clone: a normal tensor, usable by autograd
            q, w = kd_target(t_logits, clean, kd_temp) if kd_mode == "uncertainty" else \
                ((t_logits.float() / kd_temp).softmax(-1), torch.ones(n * b, device=y.device))
    loss = method_loss(robust[b:], combined[:b], combined[b:], y, q, kd_temp, kd_weight, smoothing, jsd)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    with torch.no_grad():
        stats = torch.zeros(3, device=y.device)
        if teacher is not None:
            y_aug = y.repeat(n)   # per image: the mean over its n views
            stats = torch.stack([(clean.argmax(-1) == y_aug).sum(), (t_logits.argmax(-1) == y_aug).sum(),
                                 w.sum()]).float() / n
    return loss.detach(), stats


def selection_metric(accs, tau):
    """What best.pt maximises: the selector's validation top-1; without a calibrated tau (--calib-size 0)
    the selector is the clean head, which never changes, so the better of the two new heads instead."""
    return accs["auto"] if math.isfinite(tau) else max(accs["robust"], accs["combined"])


def delta_checkpoint(args, base, student, cfg, classes, opt, scaler, world):
    """The parts of a distill_partial.py checkpoint that do not depend on where in the run it is written."""
    return dict(schema=SCHEMA, kind="delta", base=base, k=student.k, at=student.at, kd_target=args.kd_target,
                branch_dropout=args.branch_dropout, data_config=cfg, num_classes=len(classes), class_names=classes,
                model=delta_state(student), tau=student.tau, optimizer=opt.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None, world=world, args=vars(args))


def resolve_defaults(args):
    """The default that depends on another flag, filled in place: weight decay 0.05, 0 with FTP (docs/REFERENCE.md:
    its projection already holds the weights near their start)."""
    if args.weight_decay is None:
        args.weight_decay = 0.0 if args.opt == "ftp" else 0.05
    return args


def check_args(args):
    """Input mistakes, caught before any model or data is loaded."""
    if args.tune_first is not None and args.tune_last != "4":   # (an explicit --tune-last 4 goes unnoticed)
        raise UserError("--tune-first and --tune-last both given; keep one (the branch copies either the first or "
                        "the last blocks)")
    resolve_defaults(args)
    if args.tune_last != "all" and not re.fullmatch(r"[0-9]+", args.tune_last):
        raise UserError(f"--tune-last {args.tune_last!r}: give a number of blocks or 'all'")
    if args.tune_last == "0":
        raise UserError("--tune-last 0 tunes nothing; give 1 or more blocks, or 'all'")
    if args.tune_first is not None and args.tune_first < 1:
        raise UserError(f"--tune-first {args.tune_first} tunes nothing; give 1 or more blocks")
    if not 0 <= args.kd_weight <= 1 or args.kd_temp <= 0:
        raise UserError("--kd-weight must lie in [0, 1] and --kd-temp be positive")
    if not 0 < args.tau_quantile < 1 or args.mc_samples < 1:
        raise UserError("--tau-quantile must lie in (0, 1) and --mc-samples be at least 1")
    if not (math.isfinite(args.jsd) and args.jsd >= 0):
        raise UserError(f"--jsd {args.jsd:g}: give a finite weight >= 0 (0: off; 12: AugMix's)")
    if not 0 <= args.branch_dropout < 1 or args.calib_size < 0:
        raise UserError("--branch-dropout must lie in [0, 1) and --calib-size be >= 0 (0: no calibration)")
    hub_id = args.teacher.startswith(("hf-hub:", "hf_hub:"))
    if args.teacher != "none" and not os.path.isfile(args.teacher) and not hub_id:
        import timm
        if os.sep in args.teacher or args.teacher.endswith((".pt", ".pth", ".safetensors", ".bin")):
            raise UserError(f"--teacher: file {args.teacher} does not exist")
        if not timm.is_model(args.teacher.split(".")[0]):
            raise UserError(f"--teacher {args.teacher!r} is neither a file nor a timm model name; give a "
                            f"train_teacher.py checkpoint, a timm name or 'none'")
    check_train_args(args)


def distill(args):
    check_args(args)
    rank, world, device = setup_distributed(args.device, args.deterministic)
    torch.manual_seed(args.seed)
    arch = STUDENT_ALIASES.get(args.arch, args.arch)
    classes = class_names(args.dataset, args.data_dir)
    kwargs = parse_kwargs(args.model_kwargs)
    start = load_checkpoint(args.resume) if args.resume else None
    if start is not None:
        check_resume(start, args, "delta", "distill_partial.py", world, get_parser(), "--student")
    size = args.img_size or native_size(args.dataset)

    # Wrap order: build -> load weights into the bare module -> to(device) -> compile -> DDP.
    teacher = load_teacher(args.teacher, len(classes), classes, size)
    teacher_sha = file_sha256(args.teacher) if os.path.isfile(args.teacher) else None   # pipeline.py's staleness
    torch.manual_seed(args.seed)   # a random-init base must be rebuildable from the seed alone (build_base)
    # drop path acts in the branch only: the frozen model stays in eval mode
    extra = {"drop_path_rate": args.drop_path} if args.drop_path else {}
    model = create_model(arch, len(classes), args.pretrained, args.pretrained_file, kwargs, class_names=classes,
                         arch_flag="--student", **extra)
    base = base_record(args, arch, model, len(classes))
    cfg = model_data_config(model, size)
    at, k = ("start", args.tune_first) if args.tune_first is not None else ("end", args.tune_last)
    student = BranchStudent(model, cfg, k, args.branch_dropout, at)
    if start is not None:
        if start["base"]["fingerprint"] != base["fingerprint"] or start["k"] != student.k or \
                start.get("at", "end") != at:
            raise UserError(f"--resume: {args.resume} was trained from other base weights or another "
                            f"--tune-last/--tune-first")
        student.load_state_dict(start["model"], strict=False)

    train_tf, eval_tf = image_transforms(args.dataset, cfg)
    n_aug = 2 if args.jsd else 1
    train_views, batch_aug = augmix_views(train_tf, n_aug, args.aug_device, args.aug_severity, args.aug_width,
                                          args.aug_depth, args.aug_all_ops)   # cuda: AugMix in the loop below
    train_set, val_set = build_datasets(args.dataset, args.data_dir, train_views, Views(eval_tf),
                                        args.train_subset, args.val_subset)
    train_set, calib_set = holdout(train_set, args.calib_size, args.seed)
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, args.batch_size, args.workers, True, rank, world, args.seed, pin)
    val_loader = make_loader(val_set, args.batch_size, args.workers, False, rank, world, pin=pin)
    calib_loader = make_loader(with_transform(calib_set, Views(eval_tf)), args.batch_size, args.workers, False, pin=pin) \
        if calib_set is not None else None
    if len(train_loader) == 0:
        raise UserError(f"-b/--batch-size {args.batch_size} x {world} processes is larger than the "
                        f"{len(train_set)} training images; lower it")
    log = RunLog(args.output, rank, args, args.overwrite, start["step"] if start else 0)
    if start is not None and rank == 0:
        restore_best(start, args.resume, args.output)

    student.to(device)
    if teacher is not None:
        teacher.to(device)
        if args.channels_last and student_blocks(teacher.model)[0] != "vit":
            teacher.to(memory_format=torch.channels_last)
    if args.compile:
        compile_models(student, teacher)
    ddp = DDP(student, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else student

    opt = build_optimizer(student, args.opt, args.lr, args.weight_decay, device, args.momentum)
    autocast, scaler = amp_setup(device, args.amp, args.amp_dtype)
    epoch, step, best, accs, best_step, skip = 0, 0, -1.0, None, None, 0
    if start is not None:
        epoch, step, best = restore_training(start, args.resume, opt, scaler)
        accs, student.tau, best_step, skip = start["val"], start["tau"], start.get("best_step"), start.get("batch", 0)
    total = args.epochs * len(train_loader)
    warmup = int(args.warmup_epochs * len(train_loader))
    lr = lr_at(step, total, args.lr, args.sched, warmup, args.ssfd_peak)
    n_train = sum(p.numel() for m in student.trainable() for p in m.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    log(f"{arch}: {n_all / 1e6:.2f}M params, tuning the {'first' if at == 'start' else 'last'} "
        f"{student.k}/{student.n_blocks} blocks "
        f"({n_train / 1e6:.2f}M trainable incl. 2 heads), teacher {args.teacher}, {len(train_set)} train / "
        f"{len(calib_set) if calib_set else 0} calib / {len(val_set)} val images, {world} process(es) on {device}")

    t_start = time.time()
    while epoch < args.epochs:
        start_epoch(train_loader, epoch, args.seed, rank, skip)
        student.train()
        t0, seen, skipped0 = time.time(), 0, skipped_images(train_set)
        loss_sum = torch.tensor(0.0, dtype=torch.float64, device=device)   # summed on the device: no wait per step
        view_stats = torch.zeros(3, device=device)
        if skip:   # mid-epoch resume: this rank's random state and epoch counters as they were
            mid = restore_rank_state(start["ranks"], rank, device)
            seen, skipped0 = mid["seen"], skipped0 - mid["skipped"]
            loss_sum.fill_(mid["loss_sum"])
            view_stats = torch.tensor(mid.get("view_stats", [0.0] * 3), device=device)
        seen0 = seen   # images/s counts what this process trains
        bar = progress(train_loader, rank, f"epoch {epoch + 1}/{args.epochs}")
        for i, batch in enumerate(bar, skip):
            if batch is None:
                unreadable_batch(world, rank)
                continue
            views, y = batch
            b = len(y)
            x = device_views(views, device, batch_aug, n_aug)   # [clean; AugMix view(s)] on the device
            y = y.to(device, non_blocking=True)
            lr = lr_at(step, total, args.lr, args.sched, warmup, args.ssfd_peak)
            set_lr(opt, lr)
            loss, stats = train_step(ddp, teacher, x, y, opt, scaler, autocast, args.kd_temp, args.kd_weight,
                                     args.kd_target, args.smoothing, args.jsd)
            view_stats += stats
            step += 1
            seen += b * world
            loss_sum += loss
            show_progress(bar, step, loss, lr, seen - seen0, t0)
            if args.save_every and step % args.save_every == 0 and i + 1 < len(train_loader):
                ranks = rank_states(device, seen=seen, loss_sum=loss_sum.item(),
                                    skipped=skipped_images(train_set) - skipped0, view_stats=view_stats.tolist())
                if rank == 0:
                    save_run(args.output, dict(delta_checkpoint(args, base, student, cfg, classes, opt, scaler, world),
                                               epoch=epoch, step=step, batch=i + 1, ranks=ranks, val=accs,
                                               metric=accs and selection_metric(accs, student.tau), best_metric=best,
                                               best_step=best_step),
                             False)
        loss_sum = loss_sum.item()   # waits for the device's last steps, so that train_time counts them
        skip = 0
        epoch += 1
        train_time = time.time() - t0
        if calib_set is not None:
            student.tau = calibrate_tau(student, calib_loader, device, args.tau_quantile, args.mc_samples, autocast,
                                        args.seed + epoch)
        accs = head_accuracy(student, val_loader, device, autocast, args.mc_samples)
        skipped = all_sum([skipped_images(train_set) - skipped0], device)[0]
        views = {k: round(100.0 * v / max(1, seen), 2) for k, v in   # the AugMix views of this epoch, all ranks
                 zip(("student_on_views", "teacher_on_views", "teacher_weight"), all_sum(view_stats.tolist(), device))}
        metric = selection_metric(accs, student.tau)
        is_best = metric > best
        best, best_step = max(best, metric), step if is_best else best_step
        train_loss = all_sum([loss_sum], device)[0] / max(1, world * len(train_loader))   # every rank's batches
        metrics = dict(epoch=epoch, step=step, lr=lr, train_loss=train_loss, tau=student.tau,
                       **{f"val_{k}": v for k, v in accs.items()}, epoch_time_s=round(train_time, 2),
                       img_s=round((seen - seen0) / train_time, 1), skipped_images=int(skipped),
                       **(views if teacher is not None else {}))
        log(f"epoch {epoch}: loss {metrics['train_loss']:.4f}  val top-1 " +
            "  ".join(f"{k} {v:.2f}" for k, v in accs.items()) + f"  tau {student.tau:.4g}  ({train_time:.0f}s, "
            f"{metrics['img_s']:.0f} img/s)" + ("" if teacher is None else
            f"  AugMix views: frozen student {views['student_on_views']:.1f}% / teacher {views['teacher_on_views']:.1f}% "
            f"top-1, teacher weight {views['teacher_weight']:.1f}%"), **metrics)
        if rank == 0:
            save_run(args.output, dict(delta_checkpoint(args, base, student, cfg, classes, opt, scaler, world),
                                       epoch=epoch, step=step, batch=0, ranks=None, val=accs, metric=metric,
                                       best_metric=best, best_step=best_step), is_best)
        if args.stop_after and epoch >= args.stop_after:
            break
    inputs = dict(teacher=teacher_sha, base=base.get("sha256"))
    result = dict(student=arch, k=student.k, at=at, teacher=args.teacher, inputs=inputs, opt=args.opt,
                  epochs_done=epoch, step=step, lr=lr, tau=student.tau, val=accs, best_auto=best,
                  train_time_s=round(time.time() - t_start, 2),
                  trainable_params=n_train, ranks_agree=ranks_agree(student, device))
    log("final: " + json.dumps(result), final=result)
    log.close()
    return result


def main(argv=None):
    return run_main(distill, argv, get_parser())


if __name__ == "__main__":
    main()
