"""CPU tests of the foundation: data.py and train_teacher.py (tiny models, generated or Fashion-MNIST data).

    HF_HUB_OFFLINE=1 python -m pytest -q
"""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.io import write_png

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import data  # noqa: E402
import train_teacher  # noqa: E402
from data import UserError  # noqa: E402
from train_teacher import load_checkpoint, lr_at, pgd_attack  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_CNN = ["--arch", "resnet18", "--model-kwargs", "layers=[1,1,1,1]", "channels=[8,16,32,64]"]
# --device cpu: exact CPU results (and two gloo processes under torchrun), also on a GPU machine
FMNIST = ["--dataset", "fashion-mnist", "--train-subset", "96", "--val-subset", "32", "-b", "16", "-j", "0",
          "--device", "cpu"]


def run_teacher(tmp_path, name, *extra):
    out = str(tmp_path / name)
    result = train_teacher.main(FMNIST + TINY_CNN + ["--output", out, "--epochs", "1", *extra])
    return out, result


def one_line_error(capsys, fn, argv):
    """Run a main that must fail on input: exit status 2, one line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- training modes

@pytest.mark.parametrize("name,extra", [
    ("plain", []),
    ("augmix_jsd", ["--aug", "augmix", "--jsd", "12"]),
    ("pgd_linf", ["--adv", "pgd", "--adv-eps", "8/255", "--adv-step", "2/255", "--adv-steps", "2"]),
    ("pgd_l2", ["--adv", "pgd", "--adv-norm", "l2", "--adv-eps", "0.5", "--adv-step", "0.25", "--adv-steps", "2"]),
    ("ssfd", ["--sched", "ssfd", "--epochs", "2"]),
])
def test_training_modes_write_loadable_checkpoints(tmp_path, name, extra):
    out, result = run_teacher(tmp_path, name, *extra)
    steps_per_epoch = 96 // 16
    assert result["step"] == steps_per_epoch * result["epochs_done"]
    for f in ("last.pt", "best.pt"):
        ckpt = torch.load(os.path.join(out, f), map_location="cpu", weights_only=True)  # plain types only
        assert ckpt["schema"] == train_teacher.SCHEMA and ckpt["kind"] == "model"
        assert ckpt["num_classes"] == 10 and ckpt["data_config"]["input_size"] == [3, 32, 32]
    model, ckpt = train_teacher.load_model(os.path.join(out, "last.pt"))
    x = torch.rand(4, 3, 32, 32)
    assert model(x).shape == (4, 10)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in log if "epoch" in r] == list(range(1, result["epochs_done"] + 1))
    assert json.load(open(os.path.join(out, "args.json")))["output"] == out


def test_aug_device_makes_the_augmix_views_in_the_training_loop(tmp_path, monkeypatch):
    """--aug-device cuda (here on the CPU, --device cpu): the loader yields clean crops only and the loop
    makes the two JSD views of every batch with the batched AugMix on the training device."""
    seen = []
    batched = data.augmix_batch
    monkeypatch.setattr(data, "augmix_batch", lambda x, **kw: (seen.append((x.shape, x.device, kw)), batched(x, **kw))[1])
    monkeypatch.setattr(data.Views, "__call__", lambda self, img: (
        pytest.fail("loader made AugMix views") if self.n_aug else data.to_float(self.base(img))))
    _, result = run_teacher(tmp_path, "gpu_aug", "--aug", "augmix", "--jsd", "12", "--aug-device", "cuda",
                            "--aug-severity", "2")
    assert result["step"] == 96 // 16 and math.isfinite(result["val_acc"])
    assert len(seen) == 2 * result["step"]
    assert all(s == (16, 3, 32, 32) and d.type == "cpu" and kw["severity"] == 2 for s, d, kw in seen)


# ----------------------------------------------------------------------------- losses and augmentation

def test_jsd_loss_matches_reference():
    from timm.loss import JsdCrossEntropy
    torch.manual_seed(0)
    logits, y = torch.randn(3 * 5, 7), torch.randint(0, 7, (5,))
    p = [F.softmax(z, 1) for z in logits.split(5)]
    mix = torch.clamp((p[0] + p[1] + p[2]) / 3, 1e-7, 1)
    # AugMix eq. (JS): mean over views of KL(p_i || M), batch-averaged; plus CE on the clean view.
    js = sum((pi * (pi.log() - mix.log())).sum(1).mean() for pi in p) / 3
    ref = F.cross_entropy(logits[:5], y) + 12 * js
    assert torch.allclose(JsdCrossEntropy(3, 12, smoothing=0)(logits, y), ref, atol=1e-6)


def augmix_ops_used(aug, monkeypatch, calls=200):
    """The op names AugMix really applies, recorded from torchvision's dispatch over many calls."""
    used, apply = set(), aug._apply_image_or_video_transform
    monkeypatch.setattr(aug, "_apply_image_or_video_transform",
                        lambda img, name, *a, **k: used.add(name) or apply(img, name, *a, **k))
    img = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    for _ in range(calls):
        aug(img)
    return used


def test_augmix_views_differ_and_skip_imagenet_c_ops(monkeypatch):
    torch.manual_seed(0)
    excluded = {"Brightness", "Color", "Contrast", "Sharpness"}
    used = augmix_ops_used(data.augmix(), monkeypatch)
    assert not used & excluded and len(used) >= 8
    assert excluded <= augmix_ops_used(data.augmix(all_ops=True), monkeypatch, 400)  # the check can fail
    ds = data.fashion_mnist("val", transform=data.Views(data.image_transforms("fashion-mnist", None)[1], data.augmix(), 2))
    clean, a1, a2 = ds[0][0]
    assert clean.shape == a1.shape == (3, 32, 32) and clean.dtype == torch.float32
    assert 0 <= a1.min() and a1.max() <= 1
    assert (a1 - clean).abs().mean() > 1e-3 and (a2 - a1).abs().mean() > 1e-3


def test_fashion_mnist_splits():
    train, val, test = (data.fashion_mnist(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55_000, 5_000, 10_000)
    x, y = test[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and y == 9  # first test image: ankle boot
    assert torch.equal(x[:, :2], torch.zeros(3, 2, 32))  # zero padding 28 -> 32


# ----------------------------------------------------------------------------- PGD

def linear_problem():
    """Two classes separated by the mean brightness of the first channel; a linear model solves it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 3, 8, 8, generator=g) * 0.1 + 0.3
    y = torch.randint(0, 2, (256,), generator=g)
    x[:, 0] += 0.04 * y.view(-1, 1, 1).float()   # a margin smaller than the attacks' reach
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


@pytest.mark.parametrize("norm,eps,step", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
def test_pgd_stays_in_ball_and_lowers_accuracy(norm, eps, step):
    model, x, y = linear_problem()
    clean_acc = (model(x).argmax(1) == y).float().mean()
    torch.manual_seed(0)
    adv = pgd_attack(model, x, y, eps, step, 10, norm)
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    adv_acc = (model(adv).argmax(1) == y).float().mean()
    assert clean_acc > 0.95 and adv_acc < clean_acc - 0.3


# ----------------------------------------------------------------------------- schedules

def test_ssfd_schedule_shape():
    total, peak = 1000, 0.3
    lrs = [lr_at(s, total, 0.1, "ssfd", peak=peak) for s in range(total)]
    top = max(range(total), key=lambda s: lrs[s])
    assert lrs[0] <= 0.1 * 0.02 and lrs[-1] <= 0.1 * 0.002          # starts and ends near 0
    assert abs(top - peak * total) <= 1 and lrs[top] == pytest.approx(0.1, rel=1e-3)
    assert all(a < b for a, b in zip(lrs[:top], lrs[1:top + 1]))      # rises all the way ...
    assert all(a > b for a, b in zip(lrs[top:-1], lrs[top + 1:]))     # ... then falls at once: no plateau
    assert sum(lr > 0.09 for lr in lrs) < 0.1 * total
    assert lrs[int(0.6 * total)] < 0.1 * 0.15                        # fast decay
    cos = [lr_at(s, 100, 1.0, "cosine", warmup=10) for s in range(100)]
    assert cos[9] == 1.0 and cos[0] == 0.1 and cos[-1] < 0.01
    assert lr_at(60, 100, 1.0, "step") == pytest.approx(0.1) and lr_at(80, 100, 1.0, "step") == pytest.approx(0.01)


# ----------------------------------------------------------------------------- resume

@pytest.fixture
def restore_determinism():
    """--deterministic switches process-wide settings; later tests get the defaults back."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_resume_equals_uninterrupted(tmp_path, restore_determinism, device):
    """Bit-exact with --deterministic, on CUDA too (without it CUDA atomics and autotuned kernels vary; the CPU
    needs no flag, as test_distill.py's resume test checks)."""
    args = ["--aug", "augmix", "--epochs", "2", "--opt", "adamw", "--lr", "1e-3", "--device", device, "--deterministic"]
    straight, r1 = run_teacher(tmp_path, "straight", *args)
    half, _ = run_teacher(tmp_path, "half", *args, "--stop-after", "1")
    assert load_checkpoint(os.path.join(half, "last.pt"))["epoch"] == 1
    _, r2 = run_teacher(tmp_path, "half", *args, "--resume", os.path.join(half, "last.pt"))
    a, b = (load_checkpoint(os.path.join(d, "last.pt")) for d in (straight, half))
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (12, 2)
    assert r1["lr"] == r2["lr"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.backends.cudnn.deterministic


# ----------------------------------------------------------------------------- image folders

def make_folder(root, classes=("cat", "dog"), n=6, size=20):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            os.makedirs(root / split / c, exist_ok=True)
            for j in range(n):
                img = (torch.rand(3, size, size, generator=g) * 100 + 100 * i).to(torch.uint8)
                write_png(img, str(root / split / c / f"{j}.png"))
    return root


def test_image_folder_skips_unreadable_files(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = str(tmp_path / "run")
    train_teacher.main(TINY_CNN + ["--data-dir", str(root), "--output", out, "--epochs", "1", "-b", "13", "-j", "0"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[0]["skipped_images"] == 1
    assert load_checkpoint(os.path.join(out, "last.pt"))["class_names"] == ["cat", "dog"]


def test_bad_folders_fail_fast(tmp_path, capsys):
    root = make_folder(tmp_path / "ds")
    os.makedirs(root / "train" / "empty")
    err = one_line_error(capsys, train_teacher.main, TINY_CNN + ["--data-dir", str(root)])
    assert "empty" in err and "no images" in err
    flat = tmp_path / "flat"
    os.makedirs(flat / "train")
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(flat / "train" / "a.png"))
    assert "flat" in one_line_error(capsys, train_teacher.main, TINY_CNN + ["--data-dir", str(flat)])
    assert "does not exist" in one_line_error(capsys, train_teacher.main, TINY_CNN + ["--data-dir", str(tmp_path / "no")])


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    err = one_line_error(capsys, train_teacher.main, FMNIST + ["--arch", "resnet51"])
    assert "unknown model 'resnet51'" in err and "resnet50" in err
    err = one_line_error(capsys, train_teacher.main, FMNIST + ["--arch", "resnet18", "--pretrained"])
    assert "--pretrained-file" in err
    err = one_line_error(capsys, train_teacher.main, FMNIST + TINY_CNN + ["--adv", "pgd", "--adv-eps", "8"])
    assert "0-255" in err and "8/255" in err
    out, _ = run_teacher(tmp_path, "cnn")
    err = one_line_error(capsys, train_teacher.main, FMNIST + ["--arch", "vit_tiny_patch16_224", "--model-kwargs",
                                                              "img_size=32", "--resume", os.path.join(out, "last.pt")])
    assert "resnet18" in err and "vit_tiny_patch16_224" in err
    assert "--jsd" in one_line_error(capsys, train_teacher.main, FMNIST + TINY_CNN + ["--jsd", "12"])


def test_cli_error_has_no_traceback():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "train_teacher.py", "--dataset", "fashion-mnist", "--adv", "pgd",
                        "--adv-eps", "8"], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("train_teacher.py: error: --adv-eps 8")
    assert "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- devices

def test_more_processes_than_gpus_is_one_line(monkeypatch, capsys):
    with pytest.raises(UserError, match=r"2 processes .* 1 GPU\(s\); use --nproc_per_node=1 or fewer"):
        train_teacher.check_gpu_count(2, 1)
    train_teacher.check_gpu_count(2, 2)
    train_teacher.check_gpu_count(1, 8)
    # torchrun --nproc_per_node=2 on a one-GPU node: every rank stops before any CUDA call (faked here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("CUDA touched before the check"))
    for rank in ("0", "1"):
        for k, v in dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", RANK=rank, LOCAL_RANK=rank).items():
            monkeypatch.setenv(k, v)
        err = one_line_error(capsys, train_teacher.main, FMNIST + TINY_CNN + ["--device", "auto"])
        assert "--nproc_per_node=1" in err and "--device cpu" in err


def test_device_cuda_without_a_gpu_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_line_error(capsys, train_teacher.main, FMNIST + TINY_CNN + ["--device", "cuda"])
    assert "--device cuda" in err and "--device cpu" in err


# ----------------------------------------------------------------------------- many processes

def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",  # a free port
           "train_teacher.py", *FMNIST, *TINY_CNN, "--epochs", "2", "--output", str(out)]
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f for f in os.listdir(out) if f != ".lock") == ["args.json", "best.pt", "last.pt", "log.jsonl"]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 3 and log[-1]["final"]["ranks_agree"] is True   # 2 epochs + final, written once
    assert log[-1]["final"]["step"] == 2 * (96 // (16 * 2))             # each rank sees half the data
    assert p.stdout.count("final:") == 1                                # only rank 0 prints


# ----------------------------------------------------------------------------- flags and files at their edges

def test_number_flags_and_a_truncated_log_line():
    assert train_teacher.fraction("8/255") == pytest.approx(8 / 255)
    for bad in ("8/0", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            train_teacher.fraction(bad)
    assert train_teacher.get_parser().parse_args(["--aug", "augmix", "--jsd"]).jsd == 12   # docs/DESIGN.md's spelling
    assert train_teacher._log_step('{"step": 3}\n', 9) == 3
    assert train_teacher._log_step('{"step": 3, "lo', 9) == math.inf   # a line cut short by a crash: dropped
    params = [nn.Parameter(torch.zeros(2, 2))]
    assert not train_teacher.build_optimizer(params, "sgd", 0.1, 0.0, momentum=0.0).param_groups[0]["nesterov"]
    autocast, _ = train_teacher.amp_setup(torch.device("cpu"), True, "bf16")
    with autocast():   # --amp is CUDA's: the CPU stays fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_a_checkpoint_brings_its_own_model_kwargs(tmp_path):
    """--pretrained-file / --init-checkpoint / --resume with a project checkpoint build the model it holds
    and save those kwargs (not the command line's); a --pretrained run resumes without the hub."""
    out, _ = run_teacher(tmp_path, "base")
    ckpt = load_checkpoint(os.path.join(out, "last.pt"))
    for flag, name in (("--pretrained-file", "from_file"), ("--init-checkpoint", "init")):
        run = str(tmp_path / name)
        train_teacher.main(FMNIST + ["--arch", "resnet18", flag, os.path.join(out, "last.pt"), "--epochs", "2",
                                     "--stop-after", "1", "--output", run])
        saved = load_checkpoint(os.path.join(run, "last.pt"))
        assert saved["model_kwargs"] == ckpt["model_kwargs"]
        train_teacher.load_model(os.path.join(run, "best.pt"))
    last = os.path.join(tmp_path / "init", "last.pt")
    torch.save(dict(saved, args=dict(saved["args"], pretrained=True)), last)   # as if started with --pretrained
    result = train_teacher.main(FMNIST + ["--arch", "resnet18", "--pretrained", "--epochs", "2", "--resume", last,
                                          "--output", str(tmp_path / "init")])
    assert result["epochs_done"] == 2


def test_bmp_tiff_and_mixed_sizes(tmp_path, capsys):
    from PIL import Image
    pixels = torch.randint(0, 256, (6, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for ext in ("bmp", "tiff"):
        Image.fromarray(pixels.numpy()).save(tmp_path / f"a.{ext}")
        assert torch.equal(data.read_rgb(str(tmp_path / f"a.{ext}")), pixels.permute(2, 0, 1))
    Image.fromarray(pixels[..., 0].numpy().astype("uint16") * 257).save(tmp_path / "deep.png")   # 16 bits
    deep = data.read_rgb(str(tmp_path / "deep.png"))
    assert deep.dtype == torch.uint8 and torch.equal(deep[1], pixels[..., 0])
    Image.fromarray(pixels[..., 0].numpy().astype("uint16") * 257).save(tmp_path / "deep.tiff")   # PIL's branch
    assert torch.equal(data.read_rgb(str(tmp_path / "deep.tiff")), pixels[..., 0].expand(3, 6, 5))
    mixed = [(torch.zeros(3, 8, 8), 0), (torch.zeros(3, 9, 9), 1)]
    loader = torch.utils.data.DataLoader(mixed, batch_size=2, num_workers=1, collate_fn=data.collate_skip)
    capsys.readouterr()
    with pytest.raises(SystemExit):   # raised in a worker process: still one line, no traceback
        train_teacher.run_main(lambda args: next(iter(loader)), [], argparse.ArgumentParser())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images of one set differ in size ((8, 8) and (9, 9))" in err[0], err
