"""The embedded benchmark: the whole method on Fashion-MNIST, on a laptop CPU, no downloads.

    python pipeline.py              # ~10 min on 2 cores: pre-train the student, train the robust teacher,
                                    # distill into the last block(s), evaluate clean + 19 corruptions x 5
    python pipeline.py --compare    # ~45 min: + every baseline side by side, WiSE-FT sweep, plots

Each stage is one call of a script's main(); its command line is printed so any stage can be rerun or
changed by hand. A stage whose --output already holds a finished run with the same arguments is reused
(so --compare after the quick run only trains the baselines), an interrupted one is resumed, and
evaluation resumes from its cache. A stage folder holding a run with other arguments is refused
unless --overwrite.
Writes runs/fmnist/{student,teacher,method,...}/, runs/fmnist/eval/ and runs/fmnist/summary.md.
"""
import argparse
import json
import os
import shlex
import time

import distill_partial
import evaluate
import train_teacher

# The "large pre-trained" student and the small teacher, sized for a 2-core CPU: a 2.7M-parameter ViT
# (6 blocks, 16 patches of 8x8 px) and a 0.33M-parameter ResNet-10 (8x fewer parameters).
STUDENT = ["--arch", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=192",
           "depth=6", "num_heads=3", "global_pool=avg", "class_token=False"]   # + img_size=--img-size
TEACHER = ["--arch", "resnet18", "--model-kwargs", "layers=[1,1,1,1]", "channels=[16,32,64,128]"]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--compare", action="store_true", help="also train and evaluate the baselines")
    p.add_argument("--output", default="runs/fmnist", help="folder for every stage's output")
    p.add_argument("--data-dir", default=None, help="where Fashion-MNIST is, if not in Debian's path")
    p.add_argument("--train-subset", type=int, default=20000, help="training images of every stage")
    p.add_argument("--test-subset", type=int, default=1000, help="test images scored per set")
    p.add_argument("--student-epochs", type=int, default=4, help="epochs of the student's (clean) pre-training")
    p.add_argument("--teacher-epochs", type=int, default=2, help="epochs of the robust teacher's training")
    p.add_argument("--distill-epochs", type=int, default=1, help="epochs of the method and of the baselines")
    p.add_argument("--tune-last", default="1", help="K: blocks of the student to tune")
    p.add_argument("--calib-size", type=int, default=1000, help="held-out clean images that calibrate tau")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="batch size of every stage")
    p.add_argument("-j", "--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--img-size", type=int, default=32, help="input size of every model (the 32-px images are "
                   "resized to it)")
    p.add_argument("--overwrite", action="store_true", help="replace stage folders that hold runs with other arguments")
    return p


def stages(args):
    """(name, script module, argv) in order; the evaluation comes last."""
    out = lambda name: ["--output", os.path.join(args.output, name)]
    common = ["--dataset", "fashion-mnist", "--train-subset", str(args.train_subset), "-b", str(args.batch_size),
              "-j", str(args.workers), "--seed", str(args.seed), "--img-size", str(args.img_size)] + \
        (["--data-dir", args.data_dir] if args.data_dir else [])
    student_arch = STUDENT + [f"img_size={args.img_size}"]
    ckpt = lambda name: os.path.join(args.output, name, "best.pt")
    run = [("student", train_teacher, common + student_arch + ["--epochs", str(args.student_epochs), "--warmup-epochs",
                                                          "0.3", "--opt", "adamw", "--lr", "1e-3", "--weight-decay",
                                                          "0.05", "-b", "64"] + out("student")),
           ("teacher", train_teacher, common + TEACHER + ["--epochs", str(args.teacher_epochs), "--warmup-epochs",
                                                          "0.3", "--aug", "augmix", "--jsd", "12", "--opt", "sgd",
                                                          "--lr", "0.1"] + out("teacher"))]
    student = ["--student", STUDENT[1], "--model-kwargs", *student_arch[3:], "--pretrained-file", ckpt("student"),
               "--epochs", str(args.distill_epochs), "--calib-size", str(args.calib_size), "--lr", "1e-3"]
    k = ["--tune-last", args.tune_last]
    run.append(("method", distill_partial, common + student + k + ["--teacher", ckpt("teacher")] + out("method")))
    names = ["original", "teacher", "method"]
    if args.compare:
        run += [("no-teacher", distill_partial, common + student + k + ["--teacher", "none"] + out("no-teacher")),
                ("full-ft", distill_partial, common + student + ["--tune-last", "all", "--teacher", "none"] +
                 out("full-ft")),
                ("ftp", distill_partial, common + student + k + ["--teacher", ckpt("teacher"), "--opt", "ftp",
                                                                 "--weight-decay", "0"] + out("ftp"))]
        names += ["no-teacher", "full-ft", "ftp"]
    test = ["--dataset", "fashion-mnist", "--img-size", str(args.img_size), "--test-subset", str(args.test_subset),
            "--generate-c", "--corruptions",
            "all", "-b", "250", "-j", "0", "--seed", str(args.seed), "--baseline", "original"] + \
        (["--data-dir", args.data_dir] if args.data_dir else [])
    paths = [ckpt("student"), ckpt("teacher")] + [ckpt(n) for n in names[2:]]
    run.append(("eval", evaluate, test + ["--checkpoint", *paths, "--name", *names, "--head",
                                          "all" if args.compare else "auto"] + out("eval")))
    if args.compare:   # WiSE-FT of complete fine-tuning (Wortsman et al.), swept without retraining
        wise = [a if a != "original" else "full-ft@wise0" for a in test]   # alpha 0 is the original model
        run.append(("wise", evaluate, wise + ["--checkpoint", ckpt("full-ft"), "--name", "full-ft", "--head", "combined",
                                              "--wise-alpha", "0,0.25,0.5,0.75,1"] + out("wise")))
    return run


def same_recipe(folder, argv):
    """The run in folder was started with these arguments, up to those that cannot change its result."""
    free = train_teacher.RESUME_FREE - {"epochs"}
    recipe = lambda a: {k: v for k, v in a.items() if k not in free}
    try:
        with open(os.path.join(folder, "args.json")) as f:
            return recipe(json.load(f)) == recipe(vars(stage_args(folder, argv)))
    except (OSError, ValueError):
        return False


def finished(folder, argv):
    """A stage is reused when its folder holds a finished run started with these arguments."""
    try:
        with open(os.path.join(folder, "log.jsonl")) as f:
            done = any("final" in json.loads(line) for line in f)
    except (OSError, ValueError):
        return False
    return done and same_recipe(folder, argv)


def stage_args(folder, argv):
    module = distill_partial if "--student" in argv else train_teacher
    return module.get_parser().parse_args(argv)


def train_record(folder):
    """Wall time, trainable parameters and artifact size of a finished training stage."""
    final = [json.loads(line)["final"] for line in open(os.path.join(folder, "log.jsonl")) if '"final"' in line][-1]
    return dict(train_time_s=final["train_time_s"], trainable_params=final["trainable_params"],
                artifact_bytes=os.path.getsize(os.path.join(folder, "best.pt")))


def summary_table(results, records, teacher_time):
    """The comparison: accuracy columns from evaluate.py, cost columns from the training logs."""
    head = ("| model | clean | C acc (15x5) | mCE vs original | extra acc (4x5) | train time (s) | trainable params | "
            "artifact (KB) |\n|---|---|---|---|---|---|---|---|")
    rows = [head]
    for name, m in results["models"].items():
        family = name.split(":")[0].split("@")[0]
        rec = records.get(family, {})
        t = rec.get("train_time_s")
        if t is not None and family in ("method", "ftp"):
            t = f"{t:.0f} + {teacher_time:.0f} teacher"
        elif t is not None:
            t = f"{t:.0f}"
        if name.startswith("original") or name == "full-ft@wise0":
            t = "0 (pre-trained)"
        c = m.get("c", {})
        cells = [m["sets"]["clean"]["top1"], c.get("mean_acc"), c.get("mce_vs_baseline"), c.get("extra_mean_acc")]
        cells = [f"{v:.2f}" if v is not None else "-" for v in cells]
        size = rec.get("artifact_bytes")
        cells += [t or "-", str(rec.get("trainable_params", "-")), f"{size / 1024:.0f}" if size else "-"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    args = get_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything here is local
    t0 = time.time()
    evals = {}
    for name, module, stage_argv in stages(args):
        folder = stage_argv[stage_argv.index("--output") + 1]
        print(f"\n=== {name}: python {module.__name__}.py {shlex.join(stage_argv)}", flush=True)
        if module is not evaluate and finished(folder, stage_argv):
            print(f"(reusing the finished run in {folder})")
            continue
        last = os.path.join(folder, "last.pt")
        if module is not evaluate and os.path.isfile(last) and same_recipe(folder, stage_argv):
            print(f"(resuming the interrupted run in {folder})")
            stage_argv = stage_argv + ["--resume", last]
        elif module is not evaluate and args.overwrite:
            stage_argv = stage_argv + ["--overwrite"]
        result = module.main(stage_argv)
        if module is evaluate:
            evals[name] = result
    records = {n: train_record(os.path.join(args.output, d)) for n, d in
               (("original", "student"), ("teacher", "teacher"), ("method", "method"), ("no-teacher", "no-teacher"),
                ("full-ft", "full-ft"), ("ftp", "ftp")) if os.path.isfile(os.path.join(args.output, d, "log.jsonl"))}
    teacher_time = records["teacher"]["train_time_s"]
    for n in ("original",):
        records[n] = dict(records[n], trainable_params=0)
    text = summary_table(evals["eval"], records, teacher_time)
    if "wise" in evals:
        wise = {k: v for k, v in evals["wise"]["models"].items() if "@wise" in k}
        text += "\n\nWiSE-FT of complete fine-tuning (alpha 0 = original, 1 = full-ft; no retraining):\n\n"
        text += summary_table(dict(models=wise), records, teacher_time)
    total = time.time() - t0
    text += f"\n\nwall time of this run: {total / 60:.1f} min"
    print("\n" + text)
    with open(os.path.join(args.output, "summary.md"), "w") as f:
        f.write(text + "\n")
    return dict(evals=evals, records=records, table=text, wall_time_s=total)


if __name__ == "__main__":
    main()
