"""Speed and memory of the method against complete fine-tuning, and of the data pipeline.

    python bench.py                                   # CPU defaults (ViT-S/16 at 224 px, batch 8)
    python bench.py --student vit_l16 -b 64 --amp     # CUDA: bf16, the issue's setting
    python bench.py --student vit_l16 -b 64 --amp --compile --sections train,data   # CUDA: MFU, GPU AugMix
    python bench.py --sections data,corrupt,eval      # pick sections
    python bench.py --student vit_l16 -b 64 --amp --compile --ks 4 --sections train,data --profile prof/
                                                      # and where the time goes: op tables in prof/
    python bench.py --student vit_l16 -b 64 --amp --compile reduce-overhead --ks 4 --sections train
                                                      # torch.compile's mode: here CUDA graphs

Sections:
  train    step time and peak memory of one distillation step (clean + AugMix view, teacher, KD
           loss, backward, AdamW) for --tune-last 1, 2, N/6 and all (or --ks; all = complete
           fine-tuning, no teacher), each as a ratio to complete fine-tuning; achieved FLOP/s. step_s is the
           mean over --steps steps issued back to back, as the training loops issue them (they read
           nothing back from the device per step), step_s_synced the median with a synchronisation
           around each step (what earlier bench.py versions reported); img/s, FLOP/s and MFU come
           from step_s. On the CPU, which runs synchronously, the two agree. Each K runs in a
           fresh process so peak memory is its own (CUDA: max_memory_allocated above what the step
           holds between steps; CPU: the process's peak RSS, runtime included, and rss_growth_mb, its
           growth over the built models). AdamW is fused on CUDA. MFU = model FLOP/s (matmul FLOPs counted by
           torch's FlopCounterMode) over the card's dense bf16 peak (PEAK_BF16; other cards: no MFU).
  infer    inference cost of the auto-head student (K = N/6) relative to the original model
  data     data pipeline images/s per worker: plain, AugMix (1 view), AugMix+JSD (2 views); AugMix at
           32 and 224 px: one CPU worker (torchvision, one thread) vs the batched AugMix on the device,
           its calls issued back to back (as training issues them) and each on its own (_synced)
  corrupt  corruption generation images/s for each of the 19 corruptions at 32 and 224 px
  eval     evaluation images/s of the embedded benchmark's student and teacher (32 px)
Timings are medians over --steps after --warmup (the back-to-back ones: means); nothing here is
asserted in tests.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import data
from distill_partial import (STUDENT_ALIASES, BranchStudent, build_optimizer, compile_models, depth, predict,
                             train_step)
from train_teacher import Normalized, amp_setup, create_model, model_data_config, parse_kwargs

FMNIST_STUDENT = ("vit_tiny_patch16_224", ["img_size=32", "patch_size=8", "embed_dim=192", "depth=6", "num_heads=3"])
FMNIST_TEACHER = ("resnet18", ["layers=[1,1,1,1]", "channels=[16,32,64,128]"])
# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets: SXM parts only for the
# H100 (PCIe and NVL cards are slower and are not listed, so they get no MFU rather than a wrong one).
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", default="train,infer,data,corrupt,eval", help="comma-separated sections")
    p.add_argument("--student", default="vit_small_patch16_224", help="student: alias or timm name")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="student timm kwargs")
    p.add_argument("--teacher", default="resnet18", help="teacher timm name (random weights: speed only)")
    p.add_argument("--teacher-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="teacher timm kwargs")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="images per step (each with an AugMix view)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the student and the teacher (train, infer); MODE is torch.compile's "
                        "(reduce-overhead: CUDA graphs, a measurement only: the training scripts compile in "
                        "the default mode)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA when available")
    p.add_argument("--augmix-batch", type=int, default=256, help="batch of the device AugMix measurement")
    p.add_argument("--ks", default=None, help="train: comma-separated K to time, e.g. 4,all (default: 1,2,N/6,all)")
    p.add_argument("--tune-last", default=None, help="(internal) time one K in this process and print JSON")
    p.add_argument("--data-images", type=int, default=400, help="images per data-pipeline measurement")
    p.add_argument("--corrupt-batch", type=int, default=16, help="batch of the corruption measurement")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write where the time goes (torch.profiler op tables) of the train steps and the "
                        "device AugMix to DIR/train_k<K>.txt and DIR/augmix_<size>px.txt")
    return p


def build(args, k, device):
    """Student (branch of k blocks) and teacher, random weights, on the device."""
    arch = STUDENT_ALIASES.get(args.student, args.student)
    model = create_model(arch, args.num_classes, model_kwargs=parse_kwargs(args.model_kwargs))
    size = parse_kwargs(args.model_kwargs).get("img_size")
    student = BranchStudent(model, model_data_config(model, size), k, 0.1).to(device)
    teacher = None
    if k != "all":
        t = create_model(args.teacher, args.num_classes, model_kwargs=parse_kwargs(args.teacher_kwargs))
        teacher = Normalized(t, model_data_config(t, size)).to(device).eval().requires_grad_(False)
    return student, teacher


def peak_tflops(device_name):
    """Dense bf16 peak of a known card, or None (MFU is then not reported)."""
    if any(s in device_name for s in ("PCIe", "NVL")):
        return None
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def back_to_back(fn, calls, warmup, device):
    """Seconds per call over `calls` calls issued back to back and one synchronisation at the end, as a
    training loop issues them (the host prepares the next call while the device runs the last one)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def write_profile(fn, device, path, calls=3):
    """torch.profiler over `calls` calls of fn (after the timing: warm), its ops sorted by their own device
    time on CUDA (CPU time otherwise), written to path as a table."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=40, max_name_column_width=80)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{calls} calls\n{table}\n")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_one_k(args, device):
    """One training configuration, in this process: step time, peak memory, FLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode
    k = args.tune_last if args.tune_last == "all" else int(args.tune_last)
    student, teacher = build(args, k, device)
    size = student.wrap.size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2 * args.batch_size, 3, *size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    opt = build_optimizer(student, "adamw", 1e-4, 0.05, device)
    autocast, scaler = amp_setup(device, args.amp, "bf16")
    student.train()

    def step():
        train_step(student, teacher, x, y, opt, scaler, autocast, 2.0, 0.5)

    base_rss = peak_rss_mb()   # the built models (CPU: rss_growth_mb is the steps' memory above them)
    count_cpu_attention()
    with FlopCounterMode(display=False) as fc:  # eager, before compiling: the model's FLOPs, counted once
        step()  # also allocates the optimizer state before the CUDA memory baseline
    flops = fc.get_total_flops()
    if args.compile:
        compile_models(student, teacher, args.compile)   # as distill_partial.py --compile does (default mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    sec_synced = timed(step, args.steps, args.warmup, device)
    sec = back_to_back(step, args.steps, 0, device)   # warm already
    mem = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if device.type == "cuda" else None
    if args.profile:
        write_profile(step, device, os.path.join(args.profile, f"train_k{k}.txt"))
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return dict(k=k, depth=student.n_blocks, step_s=sec, step_s_synced=sec_synced, img_s=args.batch_size / sec,
                tflops=flops / sec / 1e12, mfu=flops / sec / 1e12 / peak if peak else None,
                fused_adamw=bool(opt.defaults.get("fused")),
                trainable_m=sum(p.numel() for m in student.trainable() for p in m.parameters()) / 1e6,
                peak_mem_mb=mem if mem is not None else peak_rss_mb(), rss_growth_mb=peak_rss_mb() - base_rss)


def count_cpu_attention():
    """Give torch's FLOP counter the CPU's fused attention kernels (it has formulas for CUDA's only): the
    same formulas as CUDA's flash attention, so CPU and GPU TFLOP/s count the same work."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, fc.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, fc.sdpa_backward_flop)):
        if op not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(formula)   # the formulas take tensors already


def bench_train(args, argv):
    """Every K in a fresh process (peak memory is per process), complete fine-tuning last."""
    arch = STUDENT_ALIASES.get(args.student, args.student)
    n = depth(create_model(arch, args.num_classes, model_kwargs=parse_kwargs(args.model_kwargs)))
    ks = sorted(k for k in {1, 2, max(1, n // 6)} if k < n) + ["all"]
    if args.ks:
        ks = [k if k == "all" else int(k) if k.isdigit() else -1 for k in args.ks.split(",")]
        if any(k != "all" and not 1 <= k < n for k in ks):
            sys.exit(f"bench.py: --ks {args.ks}: each K must be 'all' or 1..{n - 1} for {arch} ({n} blocks)")
    rows = []
    for k in ks:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--tune-last", str(k)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench.py: K = {k} failed:\n{proc.stderr.strip()[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full = next((r for r in rows if r["k"] == "all"), None)
    for r in rows:
        r["time_vs_full"] = r["step_s"] / full["step_s"] if full else None
        r["mem_vs_full"] = r["peak_mem_mb"] / full["peak_mem_mb"] if full else None
    return rows


def build_original(args, device):
    """The student model (random weights) with its data config, and its normalized eval-mode copy on device."""
    arch = STUDENT_ALIASES.get(args.student, args.student)
    model = create_model(arch, args.num_classes, model_kwargs=parse_kwargs(args.model_kwargs))
    cfg = model_data_config(model, parse_kwargs(args.model_kwargs).get("img_size"))
    return model, cfg, Normalized(model, cfg).to(device).eval()


@torch.no_grad()
def bench_infer(args, device):
    model, cfg, original = build_original(args, device)
    student = BranchStudent(model, cfg, max(1, depth(model) // 6)).to(device).eval()
    student.tau = 0.0
    x = torch.rand(args.batch_size, 3, *original.size).to(device)
    autocast, _ = amp_setup(device, args.amp, "bf16")
    if args.compile:
        original.compile(mode=args.compile)
        student.compile(mode=args.compile)
    with autocast():
        t0 = timed(lambda: original(x), args.steps, args.warmup, device)
        t1 = timed(lambda: predict(student, x, "auto"), args.steps, args.warmup, device)
    return dict(original_img_s=args.batch_size / t0, auto_head_img_s=args.batch_size / t1, cost_ratio=t1 / t0)


def bench_forward(args, device, batch):
    """images/s of the student's plain forward pass (eval, no grad) at its input size on `batch` images."""
    original = build_original(args, device)[2]
    x = torch.rand(batch, 3, *original.size).to(device)
    autocast, _ = amp_setup(device, args.amp, "bf16")
    with torch.no_grad(), autocast():
        return batch / timed(lambda: original(x), args.steps, args.warmup, device)


def bench_data(n):
    """Images/s of one data-loading worker (one thread), for each view recipe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_tf, _ = data.image_transforms("fashion-mnist", None)
    out = {}
    for name, n_aug in (("plain", 0), ("augmix", 1), ("augmix_jsd", 2)):
        ds = data.fashion_mnist("train", transform=data.Views(train_tf, data.augmix(), n_aug))
        t0 = time.perf_counter()
        for i in range(n):
            ds[i]
        out[name] = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return out


def bench_augmix(device, batch, steps=3, profile=None):
    """AugMix images/s at 32 and 224 px: one CPU worker (torchvision's v2.AugMix on one uint8 image at a
    time, one thread) and the batched AugMix (data.augmix_batch) on the device, uint8 in and out: calls
    issued back to back (throughput, as in training) and, _synced, each call timed on its own (median)."""
    out = {}
    for size in (32, 224):
        g = torch.Generator().manual_seed(0)
        aug, n = data.augmix(), max(8, min(batch, 20_000 // size))
        images = torch.randint(0, 256, (max(batch, n), 3, size, size), dtype=torch.uint8, generator=g)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        for img in images[:n]:
            aug(img)
        out[f"cpu_worker_{size}px"] = n / (time.perf_counter() - t0)
        torch.set_num_threads(threads)
        x = images[:batch].to(device)
        out[f"batched_{device.type}_{size}px"] = batch / back_to_back(lambda: data.augmix_batch(x), steps, 1, device)
        out[f"batched_{device.type}_{size}px_synced"] = batch / timed(lambda: data.augmix_batch(x), steps, 1, device)
        if profile:
            write_profile(lambda: data.augmix_batch(x), device, os.path.join(profile, f"augmix_{size}px.txt"))
        out[f"speedup_{size}px"] = out[f"batched_{device.type}_{size}px"] / out[f"cpu_worker_{size}px"]
    return out


def bench_eval(device, batch=256):
    from evaluate import eval_throughput
    out = {}
    for name, (arch, kw) in (("student", FMNIST_STUDENT), ("teacher", FMNIST_TEACHER)):
        model = create_model(arch, 10, model_kwargs=parse_kwargs(kw))
        net = Normalized(model, model_data_config(model, 32)).to(device).eval()
        out[name] = eval_throughput(net, torch.rand(4 * batch, 3, 32, 32).to(device), batch)
    return out


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_parser().parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if args.tune_last:
        print(json.dumps(bench_one_k(args, device)))
        return
    sections = args.sections.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    env = dict(torch=torch.__version__, device=name, threads=torch.get_num_threads(), amp=args.amp,
               compile=args.compile, peak_bf16_tflops=peak_tflops(name) if device.type == "cuda" else None)
    results = dict(env=env)
    print(f"bench.py {' '.join(argv)}\n{env}\n")
    if "train" in sections:
        results["train"] = bench_train(args, argv)
        print(f"Training step, {args.student}, batch {args.batch_size} (+ {args.batch_size} AugMix views)\n" +
              table(results["train"], ["k", "step_s", "step_s_synced", "img_s", "time_vs_full", "peak_mem_mb",
                                       "mem_vs_full", "trainable_m", "tflops"]
                    + (["mfu"] if env["peak_bf16_tflops"] else [])) + "\n")
    if "infer" in sections:
        results["infer"] = bench_infer(args, device)
        print("Inference, auto head (K = N/6) vs original\n" + table([results["infer"]], list(results["infer"])) + "\n")
    if "data" in sections:
        results["data"] = bench_data(args.data_images)
        print("Data pipeline, images/s per worker (Fashion-MNIST, 32 px)\n" + table([results["data"]], list(results["data"])) + "\n")
        results["augmix"] = bench_augmix(device, args.augmix_batch, 10 if device.type == "cuda" else 3, args.profile)
        print(f"AugMix, images/s: one CPU worker vs batched on {device.type} (batch {args.augmix_batch})\n" +
              table([results["augmix"]], list(results["augmix"])) + "\n")
    if "corrupt" in sections:
        batch = args.corrupt_batch
        results["corrupt"] = {s: data.measure_corruption_throughput(s, batch, device) for s in (32, 224)}
        forward = bench_forward(args, device, batch)
        results["corrupt"]["forward_img_s"] = forward
        rows = [dict(corruption=c, px32=results["corrupt"][32][c], px224=results["corrupt"][224][c],
                     cost_vs_forward_224=forward / results["corrupt"][224][c]) for c in results["corrupt"][32]]
        print(f"Corruption generation on {device.type}, images/s (batch {batch}, severities 1-5), and its time at "
              f"224 px over the forward pass of {args.student} on the same batch ({forward:.0f} img/s)\n"
              + table(rows, ["corruption", "px32", "px224", "cost_vs_forward_224"]) + "\n")
    if "eval" in sections:
        results["eval"] = bench_eval(device)
        print("Evaluation, images/s (32 px, batch 256)\n" + table([results["eval"]], list(results["eval"])) + "\n")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
