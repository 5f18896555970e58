"""The embedded benchmark: the whole method on Fashion-MNIST, on a laptop CPU, no downloads.

    python pipeline.py              # ~10 min on 2 cores: pre-train the student, train the robust teacher,
                                    # distill into the last block(s), evaluate clean + 19 corruptions x 5
    python pipeline.py --compare --seeds 0,1,2 --test-subset 2000   # + every baseline, 3 seeds of every
                                    # distillation stage (mean +- std), routing, WiSE-FT sweep, plots
    python pipeline.py --ablate     # the ablations, scored on the validation split + the 4 extra corruptions
    python pipeline.py --student resnet --teacher-epochs 6 --output runs/resnet   # the paper's regime: a CNN
                                    # student as good as its teacher on clean images and less robust

Each stage is one call of a script's main(); its command line is printed so any stage can be rerun or
changed by hand. A stage whose --output already holds a finished run with the same arguments is reused
(so --compare after the quick run reuses the student and the teacher and trains the method and the
baselines at each seed, in method-s<seed>/ ...), an interrupted one is resumed, one whose teacher or
student checkpoint was rewritten after it ran is retrained, and evaluation resumes from its cache. A stage
folder holding a run with other arguments is refused unless --overwrite.
Writes runs/fmnist/{student,teacher,method,...}/, runs/fmnist/eval/ and runs/fmnist/summary.md.
"""
import argparse
import json
import os
import re
import shlex
import time

import numpy as np

import distill_partial
import evaluate
import train_teacher

# The "large pre-trained" students and the small teacher, sized for a 2-core CPU. --student vit (default):
# a 2.7M-parameter ViT (6 blocks, 16 patches of 8x8 px; img_size=--img-size is added per run), which on this
# data stays below the CNN teacher even on clean images (README: the regime is the reverse of the paper's).
# --student resnet: a 2.8M-parameter ResNet-18 (8 blocks), as good as the teacher on clean images and less
# robust, as in the paper. Each: timm arch + kwargs, its clean pre-training recipe, its number of blocks, its default K.
STUDENTS = {
    "vit": (["--arch", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=192", "depth=6",
             "num_heads=3", "global_pool=avg", "class_token=False"],
            ["--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "-b", "64"], 6, "1"),
    "resnet": (["--arch", "resnet18", "--model-kwargs", "channels=[32,64,128,256]"],
               ["--opt", "sgd", "--lr", "0.1"], 8, "2"),   # K = 2: its last stage
}
# 0.33M parameters (8x fewer than either student): a ResNet-10 at a quarter of timm's ResNet-18 widths
TEACHER = ["--arch", "resnet18", "--model-kwargs", "layers=[1,1,1,1]", "channels=[16,32,64,128]"]
# what --compare --baselines may name (the stages themselves are built in stages())
BASELINES = ("no-teacher", "full-ft", "full-ft-jsd", "ftp")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--compare", action="store_true", help="also train and evaluate the baselines")
    p.add_argument("--ablate", action="store_true", help="also train the ablation variants of the method and score "
                   "them on the validation split + the 4 extra corruptions (never the test set)")
    p.add_argument("--output", default="runs/fmnist", help="folder for every stage's output")
    p.add_argument("--data-dir", default=None, help="where Fashion-MNIST is, if not in Debian's path")
    p.add_argument("--train-subset", type=int, default=20000, help="training images of every stage")
    p.add_argument("--test-subset", type=int, default=1000, help="test images scored per set")
    p.add_argument("--student-epochs", type=int, default=4, help="epochs of the student's (clean) pre-training")
    p.add_argument("--teacher-epochs", type=int, default=2, help="epochs of the robust teacher's training")
    p.add_argument("--distill-epochs", type=int, default=1, help="epochs of the method and of the partial baselines")
    p.add_argument("--full-ft-epochs", type=int, default=3, help="epochs of complete AugMix fine-tuning")
    p.add_argument("--wise", action="store_true", help="with --compare: the WiSE-FT sweep of complete fine-tuning")
    p.add_argument("--baselines", default="no-teacher,full-ft,ftp", help="with --compare: which baselines to train, "
                   f"of {', '.join(BASELINES)} (full-ft-jsd: complete fine-tuning with AugMix's Jensen-Shannon "
                   "consistency, 1.5x full-ft's compute)")
    p.add_argument("--student", choices=sorted(STUDENTS), default="vit", help="the pre-trained student: a ViT "
                   "weaker than the teacher on clean images, or a ResNet-18 as good as it and less robust (the "
                   "paper's regime; the README's study adds --teacher-epochs 6)")
    p.add_argument("--tune-last", default="auto", help="K: blocks of the student to tune, or all (auto: 1 of the "
                   "ViT's 6, 2 of the ResNet's 8)")
    p.add_argument("--aug-severity", type=int, default=6, help="AugMix severity of the distillation stages' views "
                   "(6: the views the frozen student gets wrong and the teacher right; see README)")
    p.add_argument("--calib-size", type=int, default=1000, help="held-out clean images that calibrate tau")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="batch size of every stage")
    p.add_argument("-j", "--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the pre-training stages and of the evaluation")
    p.add_argument("--seeds", default=None, help="seeds of the distillation stages, e.g. 0,1,2 (default: --seed); "
                   "the tables then give mean +- std over them")
    p.add_argument("--img-size", type=int, default=32, help="input size of every model (the 32-px images are "
                   "resized to it)")
    p.add_argument("--overwrite", action="store_true", help="replace stage folders that hold runs with other arguments")
    return p


# Ablations of the method (--ablate): name -> flags replacing or adding to the method's ("{student}": the
# student's checkpoint). Scored on the validation split and the 4 extra corruptions only, so choosing among
# them never looks at the test set.
ABLATIONS = {
    "no teacher": ["--teacher", "none"],
    "KD target = teacher only": ["--kd-target", "teacher"],
    # the control: the original model as its own teacher, so the KD target is the frozen student's prediction
    "original model as teacher (control)": ["--teacher", "{student}"],
    "K = 3": ["--tune-last", "3"],
    "first block (--tune-first 1)": ["--tune-first", "1"],
    "AugMix severity 3": ["--aug-severity", "3"],
    "AugMix severity 10": ["--aug-severity", "10"],
    "3 epochs": ["--epochs", "3"],
    "lr 3e-3": ["--lr", "3e-3"],
    "tau quantile 0.9": ["--tau-quantile", "0.9"],
    "MC dropout (8 passes)": ["--mc-samples", "8"],
}


def with_flags(argv, flags):
    """argv with each --flag of `flags` replaced (or added) by its value there."""
    argv, i = list(argv), 0
    while i < len(flags):
        n = 1
        while i + n < len(flags) and not flags[i + n].startswith("--"):
            n += 1
        if flags[i] in argv:
            j = argv.index(flags[i]) + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            del argv[argv.index(flags[i]):j]
        if flags[i] == "--tune-first" and "--tune-last" in argv:   # the two placements exclude each other
            del argv[argv.index("--tune-last"):argv.index("--tune-last") + 2]
        argv += flags[i:i + n]
        i += n
    return argv


def seeds_of(args):
    return [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]


def stale(folder, argv):
    """A finished distillation whose teacher or student checkpoint (--teacher, --pretrained-file) is no longer
    the file it was trained from (sha256 in its final log line): an earlier stage was retrained. Runs that
    recorded no hashes are taken as they are."""
    try:
        with open(os.path.join(folder, "log.jsonl")) as f:
            final = [json.loads(line)["final"] for line in f if '"final"' in line][-1]
    except (OSError, ValueError, IndexError, KeyError):
        return False
    recorded = final.get("inputs") or {}
    for flag, key in (("--teacher", "teacher"), ("--pretrained-file", "base")):
        path = argv[argv.index(flag) + 1] if flag in argv[:-1] else None
        if path and recorded.get(key) and os.path.isfile(path) and distill_partial.file_sha256(path) != recorded[key]:
            return True
    return False


def tune_last(args):
    return STUDENTS[args.student][3] if args.tune_last == "auto" else args.tune_last


def method_stage(args):
    """The stage (and folder) of the method at the first seed: the ablations' reference."""
    seeds = seeds_of(args)
    return f"method-s{seeds[0]}" if len(seeds) > 1 else "method"


def suffix(args):
    """Evaluation folders and summary of a multi-seed run are its own ('-s0_1_2'): a quick run beside it
    (e.g. --ablate, with the default single seed) never overwrites them."""
    seeds = seeds_of(args)
    return "-s" + "_".join(map(str, seeds)) if len(seeds) > 1 else ""


def stages(args):
    """(name, script module, argv) in order; the evaluations come last."""
    out = lambda name: ["--output", os.path.join(args.output, name)]
    # --img-size 32 is Fashion-MNIST's native size, every script's default for it: left out then, so stages
    # made before the flag existed keep matching (finished, same_recipe)
    size = ["--img-size", str(args.img_size)] if args.img_size != 32 else []
    data = ["--dataset", "fashion-mnist", "--train-subset", str(args.train_subset), "-b", str(args.batch_size),
            "-j", str(args.workers)] + size + (["--data-dir", args.data_dir] if args.data_dir else [])
    common = data + ["--seed", str(args.seed)]
    arch, recipe, _, _ = STUDENTS[args.student]
    student_arch = arch[:3] + ([f"img_size={args.img_size}"] if args.student == "vit" else []) + arch[3:]
    ckpt = lambda name: os.path.join(args.output, name, "best.pt")
    run = [("student", train_teacher, common + student_arch + ["--epochs", str(args.student_epochs), "--warmup-epochs",
                                                          "0.3"] + recipe + out("student")),
           ("teacher", train_teacher, common + TEACHER + ["--epochs", str(args.teacher_epochs), "--warmup-epochs",
                                                          "0.3", "--aug", "augmix", "--jsd", "12", "--opt", "sgd",
                                                          "--lr", "0.1"] + out("teacher"))]
    student = ["--student", arch[1], "--model-kwargs", *student_arch[3:], "--pretrained-file", ckpt("student"),
               "--epochs", str(args.distill_epochs), "--calib-size", str(args.calib_size), "--lr", "1e-3",
               "--aug-severity", str(args.aug_severity)]
    k, teacher = ["--tune-last", tune_last(args)], ["--teacher", ckpt("teacher")]
    seeds = seeds_of(args)
    tag = (lambda s: f"-s{s}") if len(seeds) > 1 else (lambda s: "")
    names = ["original", "teacher"]
    for s in seeds:
        d = data + ["--seed", str(s)] + student
        run.append((f"method{tag(s)}", distill_partial, d + k + teacher + out(f"method{tag(s)}")))
        names.append(f"method{tag(s)}")
        if args.compare:
            full_ft = with_flags(d, ["--epochs", str(args.full_ft_epochs)]) + ["--tune-last", "all",
                                                                                "--teacher", "none"]
            baselines = {"no-teacher": d + k + ["--teacher", "none"], "full-ft": full_ft,
                         "full-ft-jsd": full_ft + ["--jsd"],   # AugMix's own loss
                         "ftp": d + k + teacher + ["--opt", "ftp", "--weight-decay", "0"]}
            for b in args.baselines.split(","):
                run.append((f"{b}{tag(s)}", distill_partial, baselines[b] + out(f"{b}{tag(s)}")))
                names.append(f"{b}{tag(s)}")
    evaluation = ["--dataset", "fashion-mnist", "--generate-c", "-b", "250", "-j", "0", "--seed", str(args.seed)] + \
        size + (["--data-dir", args.data_dir] if args.data_dir else [])
    test = evaluation + ["--test-subset", str(args.test_subset), "--corruptions", "all", "--baseline", "original"]
    paths = [ckpt("student"), ckpt("teacher")] + [ckpt(n) for n in names[2:]]
    run.append(("eval", evaluate, test + ["--checkpoint", *paths, "--name", *names, "--head",
                                          "all" if args.compare else "auto"] + out(f"eval{suffix(args)}")))
    if args.compare and args.wise and "full-ft" in args.baselines.split(","):   # WiSE-FT of complete fine-tuning (Wortsman et al.), no retraining
        full = f"full-ft{tag(seeds[0])}"
        wise = [a if a != "original" else f"{full}@wise0" for a in test]   # alpha 0 is the original model
        run.append(("wise", evaluate, wise + ["--checkpoint", ckpt(full), "--name", full, "--head", "combined",
                                              "--wise-alpha", "0,0.5,1"] + out(f"wise{suffix(args)}")))
    if args.ablate:
        method = data + ["--seed", str(seeds[0])] + student + k + teacher
        variants = {"method": method_stage(args)}
        for name, flags in ABLATIONS.items():
            folder = "ablate/" + "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
            flags = [ckpt("student") if f == "{student}" else f for f in flags]
            run.append((name, distill_partial, with_flags(method, flags) + out(folder)))
            variants[name] = folder
        val = evaluation + ["--split", "val", "--test-subset", str(args.test_subset), "--corruptions", "extra",
                            "--shifts", "clean,c,augmix", "--augmix-severity", str(args.aug_severity)]
        run.append(("ablation", evaluate, val + ["--checkpoint", *[ckpt(f) for f in variants.values()],
                                                 ckpt("teacher"), "--name", *variants, "teacher", "--head", "all",
                                                 "--baseline", "method:clean"] + out("ablate/eval")))
    return run


# Flags a stage may differ in and still be reused or resumed: those a --resume may change, but for --epochs
# (a finished stage of other length is not this one), --deterministic (a stage asked to be reproducible
# is made so) and --pretrained (a stage from scratch is not one from hub weights).
REUSE_FREE = train_teacher.RESUME_FREE - {"epochs", "deterministic", "pretrained"}


def same_recipe(folder, argv):
    """The run in folder was started with these arguments, up to those that cannot change its result. A flag
    added to the scripts after the run was made matches while it keeps its default."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    parser = stage_parser(argv)
    args = parser.parse_args(argv)
    if "--student" in argv:
        distill_partial.resolve_defaults(args)   # as the script itself fills them in (and saves them)
    now = {k: v for k, v in vars(args).items() if k in saved or v != parser.get_default(k)}
    recipe = lambda a: {k: v for k, v in a.items() if k not in REUSE_FREE}
    return recipe(saved) == recipe(now)


def finished(folder, argv):
    """A stage is reused when its folder holds a finished run started with these arguments."""
    try:
        with open(os.path.join(folder, "log.jsonl")) as f:
            done = any("final" in json.loads(line) for line in f)
    except (OSError, ValueError):
        return False
    return done and same_recipe(folder, argv)


def stage_parser(argv):
    return (distill_partial if "--student" in argv else train_teacher).get_parser()



def train_record(folder):
    """Wall time, trainable parameters and artifact size of a finished training stage (and, for a distillation
    with a teacher, how the frozen student and the teacher fared on the AugMix views of its last epoch)."""
    lines = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    final = [d["final"] for d in lines if "final" in d][-1]
    epochs = [d for d in lines if "epoch" in d and "final" not in d]
    views = {k: epochs[-1][k] for k in ("student_on_views", "teacher_on_views", "teacher_weight") if epochs and k in epochs[-1]}
    return dict(train_time_s=final["train_time_s"], trainable_params=final["trainable_params"],
                artifact_bytes=os.path.getsize(os.path.join(folder, "best.pt")), **views)


def family(name):
    """'method-s1:auto' -> ('method', 'auto'): a column's model family (seeds pooled) and head."""
    model, _, head = name.partition(":")
    return re.sub(r"-s\d+$", "", model.split("@")[0]) + ("@" + model.split("@")[1] if "@" in model else ""), head


def mean_std(values):
    """mean +- sample std of a cell; '(n=k)' where only k of the seeds have a value (the others had none)."""
    n = len(values)
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    some = "" if len(values) == n else f" (n={len(values)})"
    if len(values) == 1:
        return f"{values[0]:.2f}{some}"
    return f"{np.mean(values):.2f} +- {np.std(values, ddof=1):.2f}{some}"


def summary_table(results, records, teacher_time):
    """The comparison, one row per model family and head (mean +- sample std over seeds where there are several):
    accuracy columns from evaluate.py, cost columns from the training logs."""
    groups = {}
    for name, m in results["models"].items():
        model, head = family(name)
        groups.setdefault(model + (f":{head}" if head else ""), []).append((name, m))
    head = ("| model | seeds | clean | C acc (15x5) | mCE vs original | extra acc (4x5) | train time (s) | "
            "trainable params | artifact (KB) |\n|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for label, members in groups.items():
        fam = label.split(":")[0].split("@")[0]
        recs = [records.get(n.split(":")[0].split("@")[0], {}) for n, _ in members]
        times = [r["train_time_s"] for r in recs if "train_time_s" in r]
        t = mean_std(times).split(" +- ")[0] if times else "-"
        if times and fam in ("method", "ftp"):
            t = f"{t} + {teacher_time:.0f} teacher"
        if label.startswith("original") or label.endswith("@wise0"):
            t = "0 (pre-trained)"
        col = lambda get: mean_std([get(m) for _, m in members])
        cells = [col(lambda m: m["sets"]["clean"]["top1"]), col(lambda m: m.get("c", {}).get("mean_acc")),
                 col(lambda m: m.get("c", {}).get("mce_vs_baseline")),
                 col(lambda m: m.get("c", {}).get("extra_mean_acc"))]
        size = recs[0].get("artifact_bytes")
        cells += [t, str(recs[0].get("trainable_params", "-")), f"{size / 1024:.0f}" if size else "-"]
        rows.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def routing_table(results):
    """How the auto head routes, per model family (mean +- std over seeds): % of clean test images sent to the
    clean head, % of corrupted ones (15 corruptions) sent away from it per severity, and at severity 5 over the
    corruptions where a new head beats the clean head; with the auto head's and the oracle's accuracy."""
    groups = {}
    for name, m in results["models"].items():
        if "routing" in m:
            groups.setdefault(family(name)[0], []).append(m["routing"])
    if not groups:
        return ""
    sevs = sorted(int(k.split()[-1]) for k in next(iter(groups.values()))[0]["sets"] if k.startswith("C severity"))
    rows = ["| model | clean -> clean head (%) | " + " | ".join(f"C sev {s} routed away (%)" for s in sevs) +
            " | sev 5 where a new head is better: routed away (%) | C auto / oracle |",
            "|---" * (3 + len(sevs)) + "|---|"]
    for fam, rs in groups.items():
        col = lambda get: mean_std([get(r) for r in rs])
        cells = [col(lambda r: r["sets"]["clean"]["to_clean"])]
        cells += [col(lambda r, s=s: 100 - r["sets"][f"C severity {s}"]["to_clean"]) for s in sevs]
        cells += [col(lambda r: r["away_at_5_where_better"]),
                  f"{col(lambda r: r['sets']['C all']['auto'])} / {col(lambda r: r['sets']['C all']['oracle'])}"]
        rows.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ablation_table(results, records):
    """The ablations on the validation split: each head's clean top-1, its top-1 on held-out AugMix views (the
    augmentation it was trained on, on images it never saw), the extra corruptions' accuracy, how the selector
    routes, and what the frozen student / the teacher scored on the AugMix views during training."""
    heads = ("auto", "robust", "combined")
    rows = ["| variant | val clean: auto / robust / combined | held-out AugMix views: auto / robust / combined | "
            "extra acc: auto / robust / combined | val clean -> clean head (%) | training views: frozen student / "
            "teacher top-1 | train time (s) |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(family(n)[0] for n in results["models"] if ":" in n):
        m = {h: results["models"].get(f"{name}:{h}", {}) for h in ("clean", *heads)}
        fmt = lambda vs: " / ".join("-" if v is None else f"{v:.2f}" for v in vs)
        top1 = lambda s: fmt([m[h].get("sets", {}).get(s, {}).get("top1") for h in heads])
        extra = fmt([m[h].get("c", {}).get("extra_mean_acc") for h in heads])
        route = m["auto"].get("routing", {}).get("sets", {}).get("clean", {}).get("to_clean")
        rec = records.get(name, {})
        views = fmt([rec.get("student_on_views"), rec.get("teacher_on_views")]) if "teacher_on_views" in rec else "-"
        rows.append(f"| {name} | {top1('clean')} | {top1('augmix')} | {extra} | "
                    f"{'-' if route is None else f'{route:.1f}'} | {views} | {rec.get('train_time_s', '-')} |")
    # every variant's clean head is the original model, bit for bit; the teacher is what there is to distil
    references = (("(original = every clean head)", next((m for n, m in results["models"].items()
                                                          if n.endswith(":clean")), None)),
                  ("(teacher)", results["models"].get("teacher")))
    for label, m in references:
        if m is not None:
            rows.append(f"| {label} | {m['sets']['clean']['top1']:.2f} | "
                        f"{m['sets'].get('augmix', {}).get('top1', float('nan')):.2f} | "
                        f"{m.get('c', {}).get('extra_mean_acc', float('nan')):.2f} | - | - | - |")
    return "\n".join(rows)


def check_args(parser, args):
    """The pipeline's flags, before any stage: a bad method flag must not wait for the student and teacher."""
    unknown = set(args.baselines.split(",")) - set(BASELINES)
    k, blocks = tune_last(args), STUDENTS[args.student][2]
    if unknown:
        parser.error(f"--baselines: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BASELINES)}")
    for flag, ok, want in (
            ("--tune-last", k == "all" or k.isdigit() and 1 <= int(k) <= blocks, f"1 to {blocks} (the student's "
             "blocks) or all"),
            ("--aug-severity", 1 <= args.aug_severity <= 10, "1 to 10"),
            ("--calib-size", args.calib_size >= 0 and (args.train_subset == 0 or
                                                       args.train_subset - args.calib_size >= args.batch_size),
             "0 or more, leaving at least -b training images of --train-subset"),
            ("--train-subset", args.train_subset >= 0, "0 (all) or more"),
            ("--test-subset", args.test_subset >= 0, "0 (all) or more"),
            ("-b/--batch-size", args.batch_size >= 1, "at least 1"), ("-j/--workers", args.workers >= 0, "0 or more"),
            ("--student-epochs", min(args.student_epochs, args.teacher_epochs, args.distill_epochs,
                                     args.full_ft_epochs) >= 1, "every --*-epochs at least 1")):
        if not ok:
            parser.error(f"{flag}: give {want}")
    seeds = [s.strip() for s in args.seeds.split(",")] if args.seeds else []
    if not all(s.isdigit() for s in seeds) or len({int(s) for s in seeds}) < len(seeds):
        parser.error(f"--seeds {args.seeds!r}: give distinct integers >= 0, e.g. 0,1,2")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything here is local
    t0 = time.time()
    evals, folders = {}, {}
    for name, module, stage_argv in stages(args):
        folder = stage_argv[stage_argv.index("--output") + 1]
        folders[name] = folder
        print(f"\n=== {name}: python {module.__name__}.py {shlex.join(stage_argv)}", flush=True)
        if module is not evaluate:
            last, changed = os.path.join(folder, "last.pt"), stale(folder, stage_argv)
            if changed and (same_recipe(folder, stage_argv) or args.overwrite):
                print(f"(retraining {folder}: the teacher or student checkpoint it started from has changed)")
                stage_argv = stage_argv + ["--overwrite"]
            elif finished(folder, stage_argv) and not changed:
                print(f"(reusing the finished run in {folder})")
                continue
            elif os.path.isfile(last) and same_recipe(folder, stage_argv):
                print(f"(resuming the interrupted run in {folder})")
                stage_argv = stage_argv + ["--resume", last]
            elif args.overwrite:
                stage_argv = stage_argv + ["--overwrite"]
        result = module.main(stage_argv)
        if module is evaluate:
            evals[name] = result
    records = {("original" if n == "student" else n): train_record(f) for n, f in folders.items()
               if os.path.isfile(os.path.join(f, "log.jsonl"))}
    records["original"] = dict(records["original"], trainable_params=0)
    teacher_time = records["teacher"]["train_time_s"]
    text = summary_table(evals["eval"], records, teacher_time)
    routing = routing_table(evals["eval"])
    if routing:
        text += "\n\nHow the auto head routes (test split):\n\n" + routing
    if "wise" in evals:
        wise = {k: v for k, v in evals["wise"]["models"].items() if "@wise" in k}
        text += "\n\nWiSE-FT of complete fine-tuning (alpha 0 = original, 1 = full-ft; no retraining):\n\n"
        text += summary_table(dict(models=wise), records, teacher_time)
    if "ablation" in evals:
        abl_records = {**{n: records.get(n, {}) for n in ABLATIONS}, "method": records.get(method_stage(args), {})}
        text += "\n\nAblations (validation split + the 4 extra corruptions; never the test set):\n\n"
        text += ablation_table(evals["ablation"], abl_records)
    total = time.time() - t0
    text += f"\n\nwall time of this run: {total / 60:.1f} min"
    print("\n" + text)
    with open(os.path.join(args.output, f"summary{suffix(args)}.md"), "w") as f:
        f.write(text + "\n")
    return dict(evals=evals, records=records, table=text, wall_time_s=total)


if __name__ == "__main__":
    main()
