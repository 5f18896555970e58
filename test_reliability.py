"""Nothing lost, nothing silently wrong: bad input is one line before any work, kills and reruns keep the
artifacts right, an ImageFolder runs at its own size. CPU, tiny models, in-process (a forked child for kills).

    HF_HUB_OFFLINE=1 python -m pytest -q test_reliability.py
"""
import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time

import pytest
import torch
from torchvision.io import write_png
from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import distill_partial  # noqa: E402
import evaluate  # noqa: E402
import train_teacher  # noqa: E402
from train_teacher import load_checkpoint  # noqa: E402

FM = ["--dataset", "fashion-mnist", "-j", "0"]
FMNIST = FM + ["--train-subset", "64", "--val-subset", "16", "-b", "16"]
CNN = ["resnet18", "--model-kwargs", "layers=[1,1,1,1]", "channels=[8,16,32,64]"]
VIT = ["vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32", "depth=2",
       "num_heads=2"]
SCRIPTS = {"train": train_teacher, "distill": distill_partial, "eval": evaluate}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root, size=32, n=4, classes=("cat", "dog"), broken_val=False):
    """An ImageFolder tree of size x size PNGs whose class is the brightness; broken_val: unreadable val/."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            os.makedirs(root / split / c, exist_ok=True)
            for j in range(n):
                if split == "val" and broken_val:
                    (root / split / c / f"{j}.png").write_bytes(b"not a png")
                    continue
                img = (torch.rand(3, size, size, generator=g) * 100 + 120 * i).to(torch.uint8)
                write_png(img, str(root / split / c / f"{j}.png"))
    return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished teacher run, a finished distill run, and the odd files the bad inputs point at."""
    root = tmp_path_factory.mktemp("reliability")
    teacher = str(root / "teacher")
    train_teacher.main(FMNIST + ["--arch", *CNN, "--epochs", "1", "--output", teacher])
    student = str(root / "student")
    distill_partial.main(FMNIST + ["--student", *CNN, "--teacher", "none", "--tune-last", "1", "--calib-size", "16",
                                   "--epochs", "1", "--output", student])
    model = train_teacher.create_model("resnet18", 10, model_kwargs=dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64]))
    torch.save({"net." + k: v for k, v in model.state_dict().items()}, root / "prefixed.pth")
    (root / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    (root / "a_file").write_text("not a folder")
    write_folder(root / "broken", broken_val=True)
    ckpt = torch.load(os.path.join(teacher, "last.pt"), weights_only=True)
    torch.save(dict(ckpt, class_names=ckpt["class_names"][::-1]), root / "shuffled.pt")   # 10 classes, other order
    return dict(root=str(root), teacher=teacher, student=student)


def snapshot(folder):
    """Names, sizes and modification times of a folder's files (None: no folder)."""
    if not os.path.isdir(folder):
        return None
    return {f: (os.path.getsize(os.path.join(folder, f)), os.stat(os.path.join(folder, f)).st_mtime_ns)
            for f in os.listdir(folder)}


T, D = ["--arch", *CNN], ["--student", *CNN, "--teacher", "none", "--tune-last", "1", "--calib-size", "16"]
# (script, argv; {root}, {teacher}, {student} and {out} are filled in, the needle that must be in the line)
BAD = [
    ("train", T + ["-b", "0"], "-b/--batch-size 0: give at least 1"),
    ("train", T + ["-b", "-4"], "-b/--batch-size -4: give at least 1"),
    ("train", T + ["-j", "-1"], "-j/--workers -1: give 0"),
    ("train", T + ["--lr", "-0.1"], "--lr -0.1: give a positive learning rate"),
    ("train", T + ["--momentum", "-1"], "--momentum -1: give a value in [0, 1)"),
    ("train", T + ["--smoothing", "1.5"], "--smoothing 1.5: give a value in [0, 1)"),
    ("train", T + ["--aug", "augmix", "--aug-severity", "11"], "--aug-severity 11: AugMix severities run from 1 to 10"),
    ("train", T + ["--weight-decay", "-1"], "--weight-decay -1: give a value >= 0"),
    ("train", T + ["--epochs", "0"], "--epochs 0: give at least 1"),
    ("train", T + ["--warmup-epochs", "-1"], "--warmup-epochs -1: give 0 to --epochs"),
    ("train", T + ["--save-every", "-2"], "--save-every -2: give 0"),
    ("train", T + ["--train-subset", "-5"], "--train-subset -5: give a number of images >= 0"),
    ("train", T + ["--val-subset", "-1"], "--val-subset -1: give a number of images >= 0"),
    ("train", T + ["--img-size", "0"], "--img-size 0: give the input size in pixels"),
    ("train", T + ["--jsd", "12"], "--jsd needs AugMix views"),
    ("train", T + ["--aug", "augmix", "--jsd", "nan"], "--jsd needs AugMix views and a weight >= 0"),
    ("train", T + ["--lr", "inf"], "--lr inf: give a positive learning rate"),
    ("train", T + ["--adv", "pgd", "--adv-eps", "8/0"], None),   # argparse: not a finite number
    ("train", T + ["--adv", "pgd", "--adv-step=-2/255"], "--adv pgd needs --adv-eps > 0, --adv-step > 0"),
    ("train", T + ["--pretrained-file", "{root}/shuffled.pt"], "--pretrained-file: {root}/shuffled.pt was trained on "
                                                               "other classes (ankle boot"),
    ("train", ["--arch", "resnet18", "--model-kwargs", "layers=[1,1,1,1]", "channels=[8,8,8,8]", "--pretrained-file",
               "{teacher}/last.pt"], "--model-kwargs: {teacher}/last.pt was built with"),
    ("train", ["--arch", "resnet18", "--init-checkpoint", "{teacher}/last.pt", "--model-kwargs", "layers=[2,2,2,2]"],
     "--model-kwargs: {teacher}/last.pt holds a model built with"),
    ("train", ["--arch", "resnet18", "--model-kwargs", "bogus=1"], "--model-kwargs: resnet18 rejects them"),
    ("train", ["--arch", "resnet18", "--model-kwargs", "layers"], "--model-kwargs: 'layers' is not KEY=VALUE"),
    ("train", T + ["--pretrained-file", "{student}/last.pt"], "--pretrained-file: {student}/last.pt is a delta"),
    ("train", ["--arch", "resnet18", "--pretrained-file", "{root}/corrupt.safetensors"],
     "--pretrained-file: {root}/corrupt.safetensors is not a readable state dict"),
    ("train", ["--arch", "resnet18", "--model-kwargs", "layers=[1,1,1,1]", "channels=[8,16,32,64]",
               "--pretrained-file", "{root}/prefixed.pth"], "does not fit ResNet: missing conv1.weight"),
    ("train", T + ["--pretrained", "--pretrained-file", "{root}/prefixed.pth"], "--pretrained and --pretrained-file"),
    ("train", T + ["--output", "{root}/a_file"], "--output: {root}/a_file is a file"),
    ("train", T + ["--output", "{root}/a_file/run"], "--output: {root}/a_file is a file, so"),
    ("train", T + ["--output", "/proc/robustify/run"], "--output: cannot write in /proc"),
    ("train", T + ["--output", "{teacher}"], "already holds a run (last.pt, best.pt); continue it with --resume"),
    ("train", T + ["--resume", "{teacher}/last.pt", "--lr", "0.5"], "--resume: --lr 0.5 (was 0.1) differ"),
    ("train", T + ["--resume", "{teacher}/last.pt", "--opt", "adamw", "-b", "8"], "--batch-size 8 (was 16), "
                                                                                 "--opt adamw (was sgd)"),
    ("train", T + ["--resume", "{teacher}/last.pt", "--epochs", "0"], "--epochs 0: give at least 1"),
    ("train", T + ["--resume", "{teacher}/last.pt", "--overwrite"], "--resume and --overwrite both given"),
    ("train", T + ["--resume", "{teacher}/best.pt"], "holds no optimizer state (a best.pt); resume from last.pt"),
    ("train", T + ["--resume", "{student}/last.pt"], "--resume: {student}/last.pt is a distill_partial.py delta"),
    ("train", ["--arch", *VIT, "--img-size", "16"], "--img-size 16: this VisionTransformer is built for 32-px"),
    ("train", ["--arch", *CNN, "--dataset", "folder", "--data-dir", "{root}/broken"], "none of the 8 images in"),
    ("distill", D + ["-b", "0"], "-b/--batch-size 0: give at least 1"),
    ("distill", D + ["--lr", "-0.1"], "--lr -0.1: give a positive"),
    ("distill", D + ["--kd-weight", "2"], "--kd-weight must lie in [0, 1]"),
    ("distill", D + ["--branch-dropout", "1.5"], "--branch-dropout must lie in [0, 1)"),
    ("distill", D + ["--jsd", "-1"], "--jsd -1: give a finite weight >= 0"),
    ("distill", D + ["--test-subset", "3"], None),   # argparse: unknown flag (exit 2, its own usage lines)
    ("distill", D + ["--pretrained-file", "{student}/best.pt"], "--pretrained-file: {student}/best.pt is a delta"),
    ("distill", D + ["--resume", "{teacher}/last.pt"], "--resume: {teacher}/last.pt is a train_teacher.py model"),
    ("distill", D + ["--resume", "{student}/last.pt", "--kd-weight", "0.9", "--seed", "3"],
     "--kd-weight 0.9 (was 0.5), --seed 3 (was 0)"),
    ("distill", D + ["--output", "{student}"], "--output: {student} already holds a run"),
    ("distill", D + ["--tune-first", "1"], "--tune-first and --tune-last both given"),
    ("distill", ["--student", *CNN, "--tune-last", "\u00b2"], "--tune-last '\u00b2': give a number of blocks"),
    ("distill", D + ["--teacher", "{root}/no/best"], "--teacher: file {root}/no/best does not exist"),
    ("distill", D + ["--teacher", "resnet_nonexistent"], "--teacher 'resnet_nonexistent' is neither a file nor"),
    ("distill", D + ["--teacher", "resnet18.a1_in1k"], "its hub weights classify 1000 classes, the data has 10"),
    ("distill", D + ["--pretrained-file", "{root}/shuffled.pt"], "--pretrained-file: {root}/shuffled.pt was trained"),
    ("eval", ["--checkpoint", "{teacher}/best.pt", "-b", "0"], "-b/--batch-size 0: give at least 1"),
    ("eval", ["--checkpoint", "{teacher}/best.pt", "-j", "-1"], "-j/--workers -1"),
    ("eval", ["--checkpoint", "{teacher}/best.pt", "--test-subset", "-3"], "--test-subset -3: give a number"),
    ("eval", ["--checkpoint", "{teacher}/best.pt", "--mc-samples", "0"], "--mc-samples 0: give at least 1"),
    ("eval", ["--checkpoint", "{teacher}/best.pt", "--output", "{root}/a_file"], "--output: {root}/a_file is a file"),
    ("eval", ["--model", "resnet18", "--model-kwargs", "bogus=1"], "--model-kwargs: resnet18 rejects them"),
    ("eval", ["--model", *CNN, "--dataset", "folder", "--data-dir", "{root}/broken", "--shifts", "clean"],
     "--data-dir: none of the 8 images"),
    ("eval", ["--checkpoint", "{root}/shuffled.pt"], "--checkpoint: {root}/shuffled.pt was trained on other classes"),
    ("eval", ["--checkpoint", "{teacher}/best.pt", "--shifts", "c", "--generate-c", "--corruptions", ","],
     "--corruptions ',' names none"),
    ("eval", ["--checkpoint", "{teacher}/best.pt", "--shifts", "c", "--generate-c", "--frost-dir", "{root}"],
     "--frost-dir: {root} holds none of frost1.png"),
]


def test_bad_inputs_are_one_line_before_any_work(runs, capsys, monkeypatch):
    assert len([b for b in BAD if b[2]]) >= 30
    fill = lambda a: a.format(**runs, out=os.path.join(runs["root"], "out"))

    def heavy(*a, **k):
        raise AssertionError("the data loaders were built before the error")

    for module in SCRIPTS.values():
        monkeypatch.setattr(module, "make_loader", heavy)
    for script, argv, needle in BAD:
        argv = [fill(a) for a in argv]
        data = [] if "--dataset" in argv else (FM + ["--shifts", "clean"] if script == "eval" else FMNIST)
        out = next((argv[i + 1] for i, a in enumerate(argv) if a == "--output"), fill("{out}"))
        argv = data + argv + ([] if "--output" in argv else ["--output", out])
        before = {f: snapshot(f) for f in (out, runs["teacher"], runs["student"])}
        name = SCRIPTS[script].__name__
        monkeypatch.setattr(sys, "argv", [f"{name}.py"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            SCRIPTS[script].main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, (script, argv)
        assert {f: snapshot(f) for f in before} == before, (script, argv)   # nothing written, nothing replaced
        if needle is None:
            continue
        assert len(err) == 1 and "Traceback" not in err[0], (argv, err)
        assert err[0].startswith(f"{name}.py: error: ") and fill(needle) in err[0], (fill(needle), err[0])


def test_lock_refuses_a_second_live_run(runs, capsys):
    log = train_teacher.RunLog(os.path.join(runs["root"], "locked"), 0, train_teacher.get_parser().parse_args([]))
    try:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            train_teacher.main(FMNIST + ["--arch", *CNN, "--output", os.path.join(runs["root"], "locked")])
        assert f"is in use by a running run (pid {os.getpid()})" in capsys.readouterr().err
    finally:
        log.close()
    assert train_teacher.lock_holder(os.path.join(runs["root"], "locked")) is None


# ----------------------------------------------------------------------------- kills and resumes

# On the CPU explicitly: bit-exact resume on CUDA needs --deterministic (test_smoke.py tests that).
KILL_ARGV = ["--arch", *CNN, "--device", "cpu", "--aug", "augmix", "--drop-path", "0.1", "--epochs", "3",
             "--save-every", "1", "--opt", "adamw", "--lr", "3e-3", "-b", "4", "-j", "0", "--img-size", "32"]


def child_run(argv, slow_saves):
    """Start a child that runs train_teacher.main(argv), each torch.save slowed (a wider window to be
    killed in, half way through the write); returns its multiprocessing.Process. Forked, so no new
    interpreter and no re-import; from a fork server once this process has used CUDA, whose context
    does not survive a fork (the server imports this module once and never touches CUDA)."""
    if torch.cuda.is_initialized():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=child_main, args=(argv, slow_saves))
    child.start()
    return child


def child_main(argv, slow_saves):
    code = 1
    try:
        torch.set_num_threads(1)
        tqdm.set_lock(threading.RLock())   # not the parent's inter-process lock: a kill may leave it held
        tqdm.monitor_interval = 0
        sys.stdout = sys.stderr = open(os.devnull, "w")
        if slow_saves:
            save = torch.save

            def slow_save(obj, f, *a, **k):
                time.sleep(0.01)
                save(obj, f, *a, **k)
                time.sleep(0.01)
            torch.save = slow_save
        train_teacher.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os._exit(code)


def test_kill_anywhere_then_resume_equals_uninterrupted(tmp_path):
    argv = KILL_ARGV + ["--data-dir", write_folder(tmp_path / "data", n=6)]   # 3 steps an epoch, 12 val images
    ref = str(tmp_path / "ref")
    t0 = time.time()
    train_teacher.main(argv + ["--output", ref])
    duration = time.time() - t0
    out, rng = str(tmp_path / "killed"), random.Random(0)
    kills = 0
    for attempt in range(20):
        last = os.path.join(out, "last.pt")
        child = child_run(argv + ["--output", out] + (["--resume", last] if os.path.isfile(last) else ["--overwrite"]),
                          slow_saves=True)
        if attempt % 3 == 2:   # kill while a checkpoint is being written (its temporary file exists)
            deadline = time.time() + 3 * duration
            while time.time() < deadline and not (os.path.isdir(out) and any(f.endswith(".tmp") for f in os.listdir(out))):
                time.sleep(0.002)
        else:   # anywhere: start-up, a step, an evaluation, a write; ~20 of these cover about one run
            time.sleep(rng.uniform(0, duration / 5))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        kills += child.exitcode == -signal.SIGKILL
    assert kills >= 15   # most attempts really were killed mid-run
    last = os.path.join(out, "last.pt")
    train_teacher.main(argv + ["--output", out] + (["--resume", last] if os.path.isfile(last) else ["--overwrite"]))
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(os.path.join(ref, name)), load_checkpoint(os.path.join(out, name))
        assert (a["epoch"], a["step"], a["metric"], a["best_step"]) == (b["epoch"], b["step"], b["metric"], b["best_step"])
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
        if name == "last.pt":
            for i, s in a["optimizer"]["state"].items():
                assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in s.items())
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    ref_log = [json.loads(line) for line in open(os.path.join(ref, "log.jsonl"))]
    assert [(r["epoch"], r["train_loss"], r["val_acc"]) for r in log if "epoch" in r] == \
        [(r["epoch"], r["train_loss"], r["val_acc"]) for r in ref_log if "epoch" in r]


def test_best_pt_is_rederived_on_resume(runs, tmp_path):
    """A last.pt that is its run's best restores a missing best.pt, also into another --output."""
    start = load_checkpoint(os.path.join(runs["teacher"], "last.pt"))
    assert start["best_step"] == start["step"]
    train_teacher.restore_best(start, os.path.join(runs["teacher"], "last.pt"), str(tmp_path))
    a, b = load_checkpoint(os.path.join(runs["teacher"], "best.pt")), load_checkpoint(str(tmp_path / "best.pt"))
    assert b["optimizer"] is None and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def interrupt_distill(monkeypatch, argv, after):
    """distill_partial.main(argv), stopped by a KeyboardInterrupt as training step after + 1 starts."""
    step, calls = distill_partial.train_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == after + 1:
            raise KeyboardInterrupt
        return step(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(distill_partial, "train_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            distill_partial.main(argv)


def test_distill_mid_epoch_resume_equals_uninterrupted(runs, tmp_path, monkeypatch):
    argv = FMNIST + D + ["--epochs", "2", "--save-every", "2", "--branch-dropout", "0.2", "--aug-severity", "5"]
    distill_partial.main(argv + ["--output", str(tmp_path / "a")])
    # steps 1-5 done (3 an epoch); last.pt written at step 4, one batch into epoch 2
    interrupt_distill(monkeypatch, argv + ["--output", str(tmp_path / "b")], after=5)
    mid = load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert (mid["epoch"], mid["step"], mid["batch"]) == (1, 4, 1)
    distill_partial.main(argv + ["--resume", str(tmp_path / "b" / "last.pt"), "--output", str(tmp_path / "c")])
    for name in ("last.pt", "best.pt"):
        a, c = load_checkpoint(str(tmp_path / "a" / name)), load_checkpoint(str(tmp_path / "c" / name))
        assert (a["step"], a["tau"], a["val"]) == (c["step"], c["tau"], c["val"])
        assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"]), name


def test_mid_epoch_resume_with_batched_augmix_tune_first_and_kd_target(runs, tmp_path, monkeypatch, capsys):
    """Mid-epoch resume (per-image seeded loader, saved random state) together with the training loop's own
    AugMix views (--aug-device cuda, run here on the CPU), --tune-first and --kd-target: the resumed run ends
    with the uninterrupted run's weights and AugMix-view diagnostics. The delta checkpoint records `at` and
    `kd_target`; a --resume may add --deterministic, not change --kd-target, --tune-first or --aug-device."""
    teacher = os.path.join(runs["teacher"], "best.pt")
    argv = FMNIST + ["--student", *CNN, "--teacher", teacher, "--tune-first", "1", "--kd-target", "teacher",
                     "--aug-device", "cuda", "--device", "cpu", "--calib-size", "16", "--epochs", "2",
                     "--save-every", "2"]
    distill_partial.main(argv + ["--output", str(tmp_path / "a")])
    # steps 1-5 done (3 an epoch); last.pt written at step 4, one batch into epoch 2
    interrupt_distill(monkeypatch, argv + ["--output", str(tmp_path / "b")], after=5)
    last = str(tmp_path / "b" / "last.pt")
    mid = load_checkpoint(last)
    assert (mid["epoch"], mid["step"], mid["batch"], mid["at"], mid["kd_target"]) == (1, 4, 1, "start", "teacher")
    distill_partial.main(argv + ["--deterministic", "--resume", last, "--output", str(tmp_path / "c")])
    for name in ("last.pt", "best.pt"):
        a, c = load_checkpoint(str(tmp_path / "a" / name)), load_checkpoint(str(tmp_path / "c" / name))
        assert (a["step"], a["tau"], a["val"], a["at"], a["kd_target"]) == \
            (c["step"], c["tau"], c["val"], c["at"], c["kd_target"])
        assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"]), name
    views = ("train_loss", "student_on_views", "teacher_on_views", "teacher_weight")
    epoch2 = [[[e[k] for k in views] for e in map(json.loads, open(tmp_path / x / "log.jsonl")) if e.get("epoch") == 2]
              for x in "ac"]
    assert epoch2[0] == epoch2[1] and len(epoch2[0]) == 1 and epoch2[0][0][3] == 100.0   # KD target: teacher alone

    def changed(flag, value):
        i = argv.index(flag)
        return argv[:i + 1] + [value] + argv[i + 2:]

    for new, needle in ((changed("--kd-target", "uncertainty"), "--kd-target uncertainty (was teacher)"),
                        (changed("--tune-first", "2"), "--tune-first 2 (was 1)"),
                        (changed("--aug-device", "cpu"), "--aug-device cpu (was cuda)")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            distill_partial.main(new + ["--resume", last, "--output", str(tmp_path / "d")])
        assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")


# ----------------------------------------------------------------------------- any ImageFolder at its own size

def test_vit_at_32_px_on_a_32_px_image_folder_end_to_end(tmp_path):
    data = write_folder(tmp_path / "tiny32", size=32, n=4)
    common = ["--dataset", "folder", "--data-dir", data, "-b", "4", "-j", "0", "--img-size", "32"]
    teacher = tmp_path / "vit"
    result = train_teacher.main(common + ["--arch", *VIT, "--epochs", "2", "--opt", "adamw", "--lr", "1e-3",
                                          "--output", str(teacher)])
    ckpt = load_checkpoint(str(teacher / "best.pt"))
    assert ckpt["data_config"]["input_size"] == [3, 32, 32] and result["epochs_done"] == 2
    student = tmp_path / "student"
    distill_partial.main(common + ["--student", *VIT, "--pretrained-file", str(teacher / "best.pt"), "--teacher",
                                   str(teacher / "best.pt"), "--tune-last", "1", "--calib-size", "2", "--epochs", "1",
                                   "--output", str(student)])
    assert load_checkpoint(str(student / "best.pt"))["data_config"]["input_size"] == [3, 32, 32]
    res = evaluate.main(["--data-dir", data, "-b", "4", "-j", "0", "--shifts", "clean", "--checkpoint",
                         str(teacher / "best.pt"), str(student / "best.pt"), "--output", str(tmp_path / "eval")])
    assert res["dataset"]["transform"]["input_size"] == [3, 32, 32]
    for m in res["models"].values():
        assert m["sets"]["clean"]["total"] == 8
    # the teacher's clean count is what it gives on the val files through its own 32-px eval transform
    net, _ = train_teacher.load_model(str(teacher / "best.pt"))
    tf = evaluate.Views(evaluate.image_transforms("folder", ckpt["data_config"])[1])
    ds = evaluate.ImageFolderSafe(os.path.join(data, "val"), tf)
    with torch.no_grad():
        hits = sum(int(net(x[None]).argmax(1).item() == y) for x, y in (ds[i] for i in range(len(ds))))
    assert res["models"]["vit/best"]["sets"]["clean"]["correct"] == hits


def test_pretrained_file_loads_every_key_but_a_resized_classifier(tmp_path):
    from safetensors.torch import save_file
    kw = dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
    torch.manual_seed(1)
    source = train_teacher.create_model("resnet18", 10, model_kwargs=kw)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.manual_seed(2)
    model = train_teacher.create_model("resnet18", 3, pretrained_file=str(tmp_path / "w.safetensors"), model_kwargs=kw)
    want, got = source.state_dict(), model.state_dict()
    assert got["fc.weight"].shape == (3, 64)   # the new head keeps its fresh initialisation
    assert all(torch.equal(want[k], got[k]) for k in got if not k.startswith("fc.")) and len(got) == len(want)
