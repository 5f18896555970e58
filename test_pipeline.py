"""The embedded benchmark end to end, shrunk to a few hundred images, so the README command cannot
silently break: student pre-training, robust teacher, distillation, evaluation on 19 x 5 corruptions."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pipeline  # noqa: E402


def test_pipeline_end_to_end(tmp_path, capsys):
    argv = ["--train-subset", "256", "--test-subset", "30", "--student-epochs", "1", "--teacher-epochs", "1", "--calib-size", "64", "-b", "64",
            "-j", "0", "--output", str(tmp_path)]
    out = pipeline.main(argv)
    models = out["evals"]["eval"]["models"]
    assert list(models) == ["original", "teacher", "method"]
    for m in models.values():
        assert m["sets"]["clean"]["total"] == 30
        assert len(m["c"]["top1"]) == 19 and all(sorted(v) == [1, 2, 3, 4, 5] for v in m["c"]["top1"].values())
    assert models["original"]["c"]["mce_vs_baseline"] == 100.0   # the baseline against itself
    # The summary table carries evaluate.py's numbers and the training logs' costs.
    summary = open(tmp_path / "summary.md").read()
    for name, m in models.items():
        assert f"| {name} | {m['sets']['clean']['top1']:.2f} | {m['c']['mean_acc']:.2f} |" in summary
    method = out["records"]["method"]
    assert method["trainable_params"] < out["records"]["teacher"]["trainable_params"] * 10
    assert method["artifact_bytes"] < out["records"]["original"]["artifact_bytes"]   # only the delta is saved
    final = json.loads(open(tmp_path / "method" / "log.jsonl").read().splitlines()[-1])["final"]
    assert final["k"] == 1 and final["teacher"].endswith("teacher/best.pt")

    # A second run reuses every finished stage and the evaluation cache: the same table.
    capsys.readouterr()
    again = pipeline.main(argv)
    assert capsys.readouterr().out.count("(reusing the finished run") == 3
    assert again["table"].split("wall time")[0] == out["table"].split("wall time")[0]


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
