"""The embedded benchmark end to end, shrunk to a few hundred images, so the README command cannot
silently break: student pre-training, robust teacher, distillation (two seeds), evaluation on 19 x 5
corruptions, the mean +- std table and the routing table."""
import json
import os
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pipeline  # noqa: E402


def test_pipeline_end_to_end(tmp_path, capsys):
    argv = ["--train-subset", "256", "--test-subset", "30", "--student-epochs", "1", "--teacher-epochs", "1",
            "--calib-size", "64", "-b", "64", "-j", "0", "--seeds", "0,1", "--output", str(tmp_path)]
    out = pipeline.main(argv)
    models = out["evals"]["eval"]["models"]
    assert list(models) == ["original", "teacher", "method-s0", "method-s1"]
    for m in models.values():
        assert m["sets"]["clean"]["total"] == 30
        assert len(m["c"]["top1"]) == 19 and all(sorted(v) == [1, 2, 3, 4, 5] for v in m["c"]["top1"].values())
    assert models["original"]["c"]["mce_vs_baseline"] == 100.0   # the baseline against itself
    # The summary table carries evaluate.py's numbers (seeds pooled: mean +- sample std) and the logs' costs.
    summary = open(tmp_path / "summary-s0_1.md").read()
    for name in ("original", "teacher"):
        m = models[name]
        assert f"| {name} | 1 | {m['sets']['clean']['top1']:.2f} | {m['c']['mean_acc']:.2f} |" in summary
    c = [models[f"method-s{s}"]["c"]["mean_acc"] for s in (0, 1)]
    assert "| method | 2 | " in summary and f"{np.mean(c):.2f} +- {np.std(c, ddof=1):.2f}" in summary
    assert "How the auto head routes" in summary and "| method | " in summary.split("How the auto head routes")[1]
    method = out["records"]["method-s0"]
    assert method["trainable_params"] < out["records"]["teacher"]["trainable_params"] * 10
    assert method["artifact_bytes"] < out["records"]["original"]["artifact_bytes"]   # only the delta is saved
    assert 0 <= method["student_on_views"] <= 100 and 0 <= method["teacher_weight"] <= 100
    final = json.loads(open(tmp_path / "method-s1" / "log.jsonl").read().splitlines()[-1])["final"]
    assert final["k"] == 1 and final["teacher"].endswith("teacher/best.pt")
    assert json.load(open(tmp_path / "method-s1" / "args.json"))["seed"] == 1

    # A second run reuses every finished stage and the evaluation cache: the same table.
    capsys.readouterr()
    again = pipeline.main(argv)
    assert capsys.readouterr().out.count("(reusing the finished run") == 4
    assert again["table"].split("wall time")[0] == out["table"].split("wall time")[0]


@pytest.mark.parametrize("argv, flags, want", [
    (["--a", "1", "--tune-last", "1", "--b"], ["--a", "2"], ["--tune-last", "1", "--b", "--a", "2"]),
    (["--tune-last", "1", "--seed", "0"], ["--tune-first", "1"], ["--seed", "0", "--tune-first", "1"]),
    (["--x", "1"], ["--m", "a", "b", "--y"], ["--x", "1", "--m", "a", "b", "--y"]),
])
def test_with_flags_replaces_or_adds(argv, flags, want):
    assert pipeline.with_flags(argv, flags) == want


def test_family_pools_seeds_and_keeps_heads():
    assert pipeline.family("method-s12:auto") == ("method", "auto")
    assert pipeline.family("full-ft-s0@wise0.5:combined") == ("full-ft@wise0.5", "combined")
    assert pipeline.family("teacher") == ("teacher", "")
    assert pipeline.mean_std([1.0, 3.0]) == "2.00 +- 1.41" and pipeline.mean_std([None]) == "-"


def test_runs_made_before_a_new_flag_are_reused(tmp_path):
    """A finished stage whose args.json predates a flag (e.g. --device) is still reused while the flag keeps its
    default, and rerun when the new flag is set to something else."""
    argv = ["--dataset", "fashion-mnist", "--output", str(tmp_path)]
    args = vars(pipeline.train_teacher.get_parser().parse_args(argv))
    old = {k: v for k, v in args.items() if k not in ("device", "deterministic", "aug_device")}
    (tmp_path / "args.json").write_text(json.dumps(old))
    (tmp_path / "log.jsonl").write_text(json.dumps({"final": {}}) + "\n")
    assert pipeline.finished(str(tmp_path), argv)
    assert not pipeline.finished(str(tmp_path), argv + ["--deterministic"])
    assert not pipeline.finished(str(tmp_path), argv + ["--epochs", "3"])


def test_ablation_and_routing_tables_read_the_results():
    def student(clean, views, extra, to_clean):
        heads = {}
        for i, h in enumerate(("clean", "robust", "combined", "auto")):
            heads[h] = {"sets": {"clean": {"top1": clean + i}, "augmix": {"top1": views + i}},
                        "c": {"extra_mean_acc": extra + i}}
        heads["auto"]["routing"] = {"sets": {"clean": {"to_clean": to_clean}, "C all": {"auto": 60.0, "oracle": 62.0},
                                             **{f"C severity {s}": {"to_clean": 100 - s} for s in (1, 5)}},
                                    "away_at_5_where_better": 7.0}
        return heads
    models = {f"{name}:{h}": m for name, args in (("method", (70, 60, 65, 95.0)), ("no teacher", (71, 61, 66, 94.0)))
              for h, m in student(*args).items()}
    models["teacher"] = {"sets": {"clean": {"top1": 80.0}, "augmix": {"top1": 77.5}}, "c": {"extra_mean_acc": 79.0}}
    table = pipeline.ablation_table({"models": models}, {"method": {"student_on_views": 74.1, "teacher_on_views": 80.7,
                                                                    "train_time_s": 12.5}})
    lines = table.splitlines()
    assert len(lines) == 6   # header, rule, two variants, the original, the teacher (no heads: no variant row)
    assert lines[2] == ("| method | 73.00 / 71.00 / 72.00 | 63.00 / 61.00 / 62.00 | 68.00 / 66.00 / 67.00 | 95.0 | "
                        "74.10 / 80.70 | 12.5 |")
    assert lines[3].startswith("| no teacher | 74.00 / 72.00 / 73.00 |") and lines[3].endswith("| - | - |")
    assert lines[-2] == "| (original = every clean head) | 70.00 | 60.00 | 65.00 | - | - | - |"
    assert lines[-1] == "| (teacher) | 80.00 | 77.50 | 79.00 | - | - | - |"
    routing = pipeline.routing_table({"models": {"method-s0:auto": models["method:auto"],
                                                 "method-s1:auto": models["no teacher:auto"]}}).splitlines()
    assert routing[2] == ("| method | 94.50 +- 0.71 | 1.00 +- 0.00 | 5.00 +- 0.00 | 7.00 +- 0.00 | "
                          "60.00 +- 0.00 / 62.00 +- 0.00 |")


def test_partial_cells_bad_seeds_and_stale_stages(tmp_path, capsys):
    assert pipeline.mean_std([1.0, None, 3.0]) == "2.00 +- 1.41 (n=2)"   # a seed without a value is said
    for flag, bad in (("--seeds", "a"), ("--seeds", "0,00"), ("--seeds", "-1"), ("--tune-last", "0"),
                      ("--aug-severity", "11"), ("--calib-size", "19990")):
        with pytest.raises(SystemExit):   # before the student and teacher train, not at the distillation
            pipeline.main([flag, bad, "--output", str(tmp_path / "bad")])
        assert flag in capsys.readouterr().err and not (tmp_path / "bad").exists()
    parser = pipeline.get_parser()
    for good in (["--test-subset", "0"], ["--train-subset", "0"], ["--tune-last", "all"], ["--tune-last", "6"],
                 ["--seeds", "0,1"], ["--calib-size", "0"]):
        pipeline.check_args(parser, parser.parse_args(good))   # accepted (0 subsets: every image)
    # a finished stage is stale when the teacher it recorded (sha256) is no longer the file it names; a copy
    # that only changes modification times is not
    teacher, stage = tmp_path / "teacher.pt", tmp_path / "method"
    teacher.write_bytes(b"weights")
    stage.mkdir()
    final = {"final": {"inputs": {"teacher": pipeline.distill_partial.file_sha256(str(teacher)), "base": None}}}
    (stage / "log.jsonl").write_text(json.dumps(final) + "\n")
    argv = ["--teacher", str(teacher), "--output", str(stage)]
    os.utime(teacher, (time.time() + 60, time.time() + 60))
    assert not pipeline.stale(str(stage), argv)
    teacher.write_bytes(b"retrained weights")
    assert pipeline.stale(str(stage), argv)
    (stage / "log.jsonl").write_text(json.dumps({"final": {}}) + "\n")   # a run from before the hashes
    assert not pipeline.stale(str(stage), argv)


def test_resnet_student_stages(tmp_path, capsys):
    """--student resnet: the paper's regime (a CNN student as good as the teacher on clean images). Its stages
    pre-train a ResNet-18 with SGD and tune its last stage (K = 2 of 8 blocks) unless --tune-last says otherwise."""
    parser = pipeline.get_parser()
    args = parser.parse_args(["--student", "resnet", "--compare", "--baselines", "no-teacher", "--output", "x"])
    pipeline.check_args(parser, args)
    run = {name: argv for name, _, argv in pipeline.stages(args)}
    student = run["student"]
    assert student[student.index("--arch") + 1] == "resnet18" and "channels=[32,64,128,256]" in student
    assert not any(a.startswith("img_size=") for a in student)   # a ViT-only kwarg
    assert student[student.index("--opt") + 1] == "sgd" and student[student.index("--lr") + 1] == "0.1"
    for name in ("method", "no-teacher"):
        argv = run[name]
        assert argv[argv.index("--student") + 1] == "resnet18" and argv[argv.index("--tune-last") + 1] == "2"
        assert argv[argv.index("--pretrained-file") + 1] == os.path.join("x", "student", "best.pt")
    vit = {name: argv for name, _, argv in pipeline.stages(parser.parse_args(["--ablate"]))}
    assert vit["method"][vit["method"].index("--tune-last") + 1] == "1"
    # the ViT student's stage as before --student existed, so runs made then are still reused
    assert vit["student"][vit["student"].index("--arch"):vit["student"].index("--output")] == [
        "--arch", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=192",
        "depth=6", "num_heads=3", "global_pool=avg", "class_token=False", "--epochs", "4", "--warmup-epochs",
        "0.3", "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "-b", "64"]
    ablation = vit["ablation"]   # the teacher is scored beside the variants, paired with its name
    names = ablation[ablation.index("--name") + 1:ablation.index("--head")]
    paths = ablation[ablation.index("--checkpoint") + 1:ablation.index("--name")]
    assert names[-1] == "teacher" and paths[-1] == os.path.join("runs", "fmnist", "teacher", "best.pt")
    assert len(names) == len(paths) == len(pipeline.ABLATIONS) + 2
    control = vit["original model as teacher (control)"]
    assert control[control.index("--teacher") + 1] == os.path.join("runs", "fmnist", "student", "best.pt")
    # complete fine-tuning with AugMix's Jensen-Shannon consistency: full-ft's stage plus --jsd (weight 12)
    args = parser.parse_args(["--student", "resnet", "--compare", "--baselines", "full-ft,full-ft-jsd"])
    run = {name: argv for name, _, argv in pipeline.stages(args)}
    assert run["full-ft-jsd"][:run["full-ft-jsd"].index("--output")] == run["full-ft"][:run["full-ft"].index(
        "--output")] + ["--jsd"]
    assert pipeline.distill_partial.get_parser().parse_args(run["full-ft-jsd"]).jsd == 12.0
    for good in ("8", "all"):
        pipeline.check_args(parser, parser.parse_args(["--student", "resnet", "--tune-last", good]))
    for argv in (["--student", "resnet", "--tune-last", "9"], ["--tune-last", "7"], ["--tune-last", ""]):
        with pytest.raises(SystemExit):
            pipeline.check_args(parser, parser.parse_args(argv))
        assert "--tune-last" in capsys.readouterr().err
