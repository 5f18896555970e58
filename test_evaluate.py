"""Tests for evaluate.py (CPU, tiny models, generated folders; Fashion-MNIST from /usr/share/datasets).

Run: HF_HUB_OFFLINE=1 python -m pytest -q test_evaluate.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.io import write_png

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import data  # noqa: E402
import evaluate  # noqa: E402
import train_teacher  # noqa: E402
from timm.models import register_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["layers=[1,1,1,1]", "channels=[8,16,32,64]"]
FM = ["--dataset", "fashion-mnist", "-j", "0", "--device", "cpu"]  # pinned CPU numbers, gloo under torchrun


# ----------------------------------------------------------------------------- fixtures and helpers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """~50% top-1 in seconds: predictions that react to the corruptions."""
    out = tmp_path_factory.mktemp("teacher")
    train_teacher.main([*FM, "--arch", "resnet18", "--model-kwargs", *TINY, "--train-subset", "1024", "--val-subset",
                        "32", "--epochs", "2", "-b", "32", "--opt", "adamw", "--lr", "3e-3", "--output", str(out)])
    return str(out / "last.pt")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    import distill_partial
    out = tmp_path_factory.mktemp("student")
    distill_partial.main([*FM, "--student", "resnet18", "--model-kwargs", *TINY, "--teacher", "none",
                          "--tune-last", "2", "--train-subset", "96", "--calib-size", "32", "--val-subset", "32",
                          "--epochs", "1", "-b", "32", "--output", str(out)])
    return str(out / "last.pt")


def fmnist_images(n, seed=0):
    """The images evaluate.py scores: the fixed Fashion-MNIST test subset, floats in [0, 1]."""
    ds = data.subset(data.fashion_mnist("test"), n, seed)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def correct(logits, y):
    return int((logits.argmax(1) == y).sum())


def load(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- pure functions

def test_mce_and_relative_mce_match_a_hand_computation():
    err = {"gaussian_noise": {1: 0.2, 2: 0.4}, "fog": {1: 0.1, 2: 0.3}, "speckle_noise": {1: 0.9, 2: 0.9}}
    ref = {"gaussian_noise": {1: 0.5, 2: 0.7}, "fog": {1: 0.4, 2: 0.4}, "speckle_noise": {1: 0.1, 2: 0.1}}
    # CE = (0.2+0.4)/(0.5+0.7) = 0.5 and (0.1+0.3)/(0.4+0.4) = 0.5 -> mCE 50; speckle_noise is extra: never counted
    assert evaluate.mce(err, ref, ["gaussian_noise", "fog"]) == pytest.approx(50.0)
    shuffled = evaluate.mce(err, ref, ["fog", "speckle_noise", "gaussian_noise"])
    assert shuffled == evaluate.mce(err, ref, ["gaussian_noise", "fog"])
    # relative: ((0.2-0.1)+(0.4-0.1))/((0.5-0.3)+(0.7-0.3)) = 2/3 and ((0.1-0.1)+(0.3-0.1))/((0.4-0.3)*2) = 1
    rel = evaluate.relative_mce(err, 0.1, ref, 0.3, ["speckle_noise", "fog", "gaussian_noise"])
    assert rel == pytest.approx(100 * (2 / 3 + 1) / 2)
    # AlexNet's table holds 5-severity averages: sum_s err_AlexNet = 5 * avg
    five = {"gaussian_noise": {s: 0.5 for s in range(1, 6)}}
    assert evaluate.mce(five, evaluate.ALEXNET_ERR, ["gaussian_noise"]) == pytest.approx(100 * 2.5 / (5 * 0.886428))
    assert evaluate.relative_mce(five, 0.3, evaluate.ALEXNET_ERR, evaluate.ALEXNET_CLEAN_ERR, ["gaussian_noise"]) == \
        pytest.approx(100 * 5 * 0.2 / (5 * (0.886428 - 0.4348)))
    assert set(evaluate.ALEXNET_ERR) == set(evaluate.CORRUPTIONS)


def test_linear_probe_and_zeroshot_logits_standalone():
    g = torch.Generator().manual_seed(0)
    centers, y = torch.randn(3, 8, generator=g) * 4, torch.arange(60) % 3
    x = centers[y] + torch.randn(60, 8, generator=g)
    assert evaluate.linear_probe(x[:45], y[:45], x[45:], y[45:], 3) == 100.0
    feats, text = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(evaluate.zeroshot_logits(feats, text), torch.tensor([[60.0, 80.0]]))


def test_generated_images_do_not_depend_on_world_size_or_batch_size():
    """Block k (here of 8 images; SEED_BLOCK in evaluate.py) gets the same corruption seed alone and as a
    shard of 2 processes, and the models see the same images whatever -b cuts the block into."""
    images = torch.rand(37, 3, 32, 32)
    ds = torch.utils.data.TensorDataset(images, torch.arange(37))
    task = evaluate.Task("c", lambda: ds, "gaussian_noise", 5, generated=True)
    autocast = train_teacher.amp_setup(torch.device("cpu"), False, "bf16")[0]

    def seen(rank, world, batch_size=8):
        out = []
        col = evaluate.Column("m", lambda x: (out.append(x.clone()), torch.zeros(len(x), 2))[1], None, {}, "m")
        loader = data.make_loader(ds, 8, 0, False, rank, world)
        evaluate.score([col], loader, task, torch.device("cpu"), autocast, 0, None, None, rank, world, batch_size)
        return out

    alone, shards = seen(0, 1), [seen(r, 2) for r in range(2)]
    assert [len(b) for b in alone] == [8, 8, 8, 8, 5]
    sliced = seen(0, 1, batch_size=3)
    assert [len(b) for b in sliced] == [3, 3, 2] * 4 + [3, 2] and torch.equal(torch.cat(sliced), torch.cat(alone))
    for k, block in enumerate(alone):  # block k sits on rank k % 2 as its (k // 2)-th batch
        assert torch.equal(block, shards[k % 2][k // 2])
    other_seed = evaluate.corruption_seed(0, "gaussian_noise", 5, 1)
    assert not torch.equal(alone[0], evaluate.corrupt(images[:8], "gaussian_noise", 5, other_seed))


# ----------------------------------------------------------------------------- label spaces of -R, -A, -Sketch, -V2

class DecodeClass(nn.Module):
    """Answers the ImageNet class an image encodes in its first pixel (R + 256 G). Images with B = 255 get a
    stronger decoy logit on class 0 (tench), which is in neither ImageNet-R nor -A: only scoring the set's
    200 columns, with labels at the right positions, gives 100%."""
    pretrained_cfg = dict(input_size=(3, 16, 16), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                          interpolation="bilinear", crop_pct=0.5)  # eval transform: resize to 32, crop the centre

    def __init__(self, num_classes=1000):
        super().__init__()
        self.num_classes, self.bias = num_classes, nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        px = (x[:, :, 0, 0] * 255).round().long()
        logits = self.bias.expand(len(x), -1).clone()
        logits[torch.arange(len(x)), (px[:, 0] + 256 * px[:, 1]).clamp(max=self.num_classes - 1)] = 1.0
        logits[:, 0] += 2.0 * (px[:, 2] == 255)
        return logits


@register_model
def eval_test_decoder(pretrained=False, **kwargs):
    return DecodeClass(kwargs.get("num_classes", 1000))


def code(class_index, decoy=False):
    return torch.tensor([class_index % 256, class_index // 256, 255 if decoy else 0], dtype=torch.uint8).view(3, 1, 1)


def write_class_images(folder, class_index, decoy, n=2):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        write_png(code(class_index, decoy).expand(3, 16, 16).contiguous(), os.path.join(folder, f"{i}.png"))


def test_restricted_sets_and_v2_numeric_folders(tmp_path):
    synsets = data.timm_info("imagenet_synsets.txt")
    for name in ("r", "a"):
        columns, to_label = data.restricted_classes(name)
        assert len(columns) == 200 and all(synsets[c] == w for w, c in zip(to_label, columns))
        for pos in (0, 57, 199):  # ImageFolder's sorted labels would be 0, 1, 2
            wnid = list(to_label)[pos]
            write_class_images(tmp_path / evaluate.SHIFT_DIRS[name] / wnid, synsets.index(wnid), decoy=True)
    for idx in (5, 500, 999):  # the Kaggle layout imagenet-sketch/sketch/<wnid>
        write_class_images(tmp_path / "imagenet-sketch" / "sketch" / synsets[idx], idx, decoy=False)
    for idx in (2, 10, 100):  # string order would be 10, 100, 2
        write_class_images(tmp_path / "imagenetv2" / str(idx), idx, decoy=False)
    # ImageNet-C files are read as they are: the class sits in the corner a second resize + centre crop would cut
    c_dir = tmp_path / "imagenet-c" / "gaussian_noise" / "1" / synsets[5]
    os.makedirs(c_dir)
    for i, (corner, rest) in enumerate(((5, 1), (5, 1), (7, 7))):  # 2 of 3 right
        img = code(rest).expand(3, 16, 16).clone()
        img[:, :4, :4] = code(corner)
        write_png(img, str(c_dir / f"{i}.png"))
    res = evaluate.main(["--model", "eval_test_decoder", "--data-root", str(tmp_path), "--shifts", "r,a,sketch,v2,c",
                         "--corruptions", "gaussian_noise", "--severities", "1", "-b", "4", "-j", "0",
                         "--output", str(tmp_path / "out")])
    m = res["models"]["eval_test_decoder"]
    scored = {k: (v["correct"], v["total"]) for k, v in m["sets"].items()}
    assert scored == dict.fromkeys(("r", "a", "sketch", "v2"), (6, 6))
    assert m["c"]["counts"]["gaussian_noise"][1] == (2, 3) and res["corruptions"]["source"] == "ImageNet-C files"
    # AlexNet's errors are means over the 5 severities: with severity 1 alone no mCE is comparable to them
    assert m["c"]["mce"] is None and m["c"]["relative_mce"] is None and m["c"]["mce_corruptions"] == 1


# ----------------------------------------------------------------------------- the Fashion-MNIST flow

def test_fashion_mnist_generated_c(tmp_path, teacher, capsys):
    out = tmp_path / "eval"
    res = evaluate.main([*FM, "--checkpoint", teacher, "--model", "resnet18", "--model-kwargs", *TINY, "-b", "64",
                         "--test-subset", "64", "--shifts", "clean,c", "--generate-c", "--corruptions",
                         "gaussian_noise,contrast,extra", "--severities", "1,5", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert load(out / "results.json")["models"] == json.loads(json.dumps(res["models"]))
    assert res["corruptions"]["source"] == "generated" and res["corruptions"]["frost"] == "procedural"
    assert (out / "acc_vs_severity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model | clean | C acc (2 of 15) | C err (2 of 15) |" in stdout and stdout.strip().splitlines()[-1].startswith("final: {")

    # one (corruption, severity) by hand: the same subset and seed, one block of 64 images
    model, _ = train_teacher.load_model(teacher)
    x, y = fmnist_images(64)
    name = os.path.basename(os.path.dirname(teacher)) + "/last"
    m = res["models"][name]
    with torch.no_grad():
        xc = evaluate.corrupt(x, "gaussian_noise", 5, seed=evaluate.corruption_seed(0, "gaussian_noise", 5, 0))
        assert m["c"]["counts"]["gaussian_noise"][5] == (correct(model(xc), y), 64)
        assert m["sets"]["clean"]["correct"] == correct(model(x), y)
    # the extra corruptions stay out of the mean accuracy and the mCE
    acc = m["c"]["top1"]
    main = [acc[c][s] for c in ("gaussian_noise", "contrast") for s in (1, 5)]
    extra = [acc[c][s] for c in evaluate.EXTRA_CORRUPTIONS for s in (1, 5)]
    assert m["c"]["mean_acc"] == pytest.approx(np.mean(main))
    assert m["c"]["extra_mean_acc"] == pytest.approx(np.mean(extra))
    assert m["c"]["mce_vs_baseline"] == pytest.approx(100.0) and res["baseline"] == name
    err = {n: {c: {s: 1 - a / 100 for s, a in v.items()} for c, v in res["models"][n]["c"]["top1"].items()}
           for n in res["models"]}
    assert res["models"]["resnet18"]["c"]["mce_vs_baseline"] == pytest.approx(
        evaluate.mce(err["resnet18"], err[name], ["gaussian_noise", "contrast"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_on_cuda_matches_fp32_on_cpu(tmp_path, teacher):
    """evaluate.py --amp (bf16 on CUDA) scores the same images as fp32 on the CPU: generated corruptions do
    not depend on the device, and bf16 flips at most a few predictions of 64."""
    argv = [*FM, "--checkpoint", teacher, "-b", "64", "--test-subset", "64", "--generate-c", "--corruptions",
            "gaussian_noise,glass_blur", "--severities", "3"]
    cpu = evaluate.main(argv + ["--output", str(tmp_path / "cpu")])
    gpu = evaluate.main(argv + ["--device", "cuda", "--amp", "--output", str(tmp_path / "gpu")])
    assert gpu["device"] != "cpu" and cpu["device"] == "cpu"
    (name, a), = cpu["models"].items()
    b = gpu["models"][name]
    assert b["sets"]["clean"]["total"] == 64
    assert abs(a["sets"]["clean"]["correct"] - b["sets"]["clean"]["correct"]) <= 3
    for c in ("gaussian_noise", "glass_blur"):
        assert abs(a["c"]["counts"][c][3][0] - b["c"]["counts"][c][3][0]) <= 3, c


def test_resume_evaluates_only_missing_entries(tmp_path, teacher, monkeypatch):
    argv = [*FM, "--checkpoint", teacher, "--test-subset", "48", "-b", "16", "--generate-c", "--corruptions",
            "gaussian_noise", "--severities", "2,4", "--output", str(tmp_path)]
    seen = []
    forward = train_teacher.Normalized.forward
    monkeypatch.setattr(train_teacher.Normalized, "forward", lambda self, x: (seen.append(len(x)), forward(self, x))[1])
    first = evaluate.main(argv)
    assert sum(n for n in seen if n == 16) == 3 * 48  # clean + 2 severities
    victim = next(p for p in (tmp_path / "cache").glob("*.json") if load(p)["key"]["task"]["severity"] == 4)
    victim.unlink()
    seen.clear()
    second = evaluate.main(argv)
    assert sum(n for n in seen if n == 16) == 48  # only the deleted (gaussian_noise, 4)
    assert second["models"] == first["models"]


def test_torchrun_counts_every_image_once(tmp_path, teacher):
    argv = [*FM, "--checkpoint", teacher, "--test-subset", "300", "-b", "64", "--generate-c", "--corruptions",
            "gaussian_noise", "--severities", "5"]   # blocks of 250 and 50 images: one per process
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "evaluate.py"), *argv, "--output", str(tmp_path / "ddp")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final: ") == 1  # rank 0 alone prints
    ddp = load(tmp_path / "ddp" / "results.json")
    single = json.loads(json.dumps(evaluate.main(argv + ["--output", str(tmp_path / "single")])))
    assert ddp["world_size"] == 2
    (name, m), = ddp["models"].items()
    assert m["sets"]["clean"]["total"] == 300 and m["c"]["counts"]["gaussian_noise"]["5"][1] == 300
    assert m["sets"] == single["models"][name]["sets"] and m["c"]["counts"] == single["models"][name]["c"]["counts"]


def test_pgd_and_linear_probe(tmp_path, teacher):
    for cls, value in (("dark", 30), ("light", 220)):
        for split, n in (("train", 6), ("val", 3)):
            os.makedirs(tmp_path / "probe" / split / cls)
            for i in range(n):
                img = torch.full((3, 20, 20), value + 5 * i, dtype=torch.uint8)
                write_png(img, str(tmp_path / "probe" / split / cls / f"{i}.png"))
    base = [*FM, "--checkpoint", teacher, "--test-subset", "32", "-b", "32", "--shifts", "clean", "--attack", "pgd",
            "--attack-steps", "2"]
    res = evaluate.main(base + ["--attack-eps", "0", "--probe-data", str(tmp_path / "probe"),
                                "--output", str(tmp_path / "a")])
    (m,) = res["models"].values()
    assert m["sets"]["pgd"]["correct"] == m["sets"]["clean"]["correct"]  # eps 0: no change
    assert m["sets"]["probe"] == {"top1": 100.0, "correct": 6, "total": 6}
    res = evaluate.main(base + ["--attack-eps", "8/255", "--attack-step", "4/255", "--output", str(tmp_path / "b")])
    (m,) = res["models"].values()
    assert m["sets"]["pgd"]["correct"] < m["sets"]["clean"]["correct"] and res["metrics"]["pgd"]["eps"] == 8 / 255
    model, _ = train_teacher.load_model(teacher)
    assert evaluate.eval_throughput(model, torch.rand(8, 3, 32, 32), 4) > 0


# ----------------------------------------------------------------------------- zero-shot and WiSE-FT

def test_zeroshot_of_a_plain_tower_equals_direct_computation(tmp_path):
    text = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "text.npy", text.numpy())
    res = evaluate.main([*FM, "--model", "resnet18", "--model-kwargs", *TINY, "--num-classes", "0", "-b", "32",
                         "--test-subset", "32", "--shifts", "clean", "--zeroshot-head", str(tmp_path / "text.npy"),
                         "--output", str(tmp_path)])
    assert list(res["models"]) == ["resnet18:zeroshot"]
    torch.manual_seed(0)  # evaluate.py seeds --seed before building --model
    tower = train_teacher.create_model("resnet18", 0, model_kwargs=train_teacher.parse_kwargs(TINY))
    net = train_teacher.Normalized(tower, train_teacher.model_data_config(tower, 32)).eval()
    x, y = fmnist_images(32)
    with torch.no_grad():
        logits = 100 * nn.functional.normalize(net(x), dim=-1) @ nn.functional.normalize(text, dim=-1).T
    assert res["models"]["resnet18:zeroshot"]["sets"]["clean"]["correct"] == correct(logits, y)


def test_wise_sweep_endpoints_and_student_zeroshot(tmp_path, student):
    from distill_partial import load_student, predict
    text = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    torch.save(text, tmp_path / "text.pt")
    res = evaluate.main([*FM, "--checkpoint", student, "--name", "s", "--head", "all", "--wise-alpha", "0,1",
                         "--zeroshot-head", str(tmp_path / "text.pt"), "--test-subset", "32", "-b", "32",
                         "--generate-c", "--corruptions", "gaussian_noise", "--severities", "3",
                         "--output", str(tmp_path / "out")])
    assert (tmp_path / "out" / "wise_sweep.png").read_bytes()[:4] == b"\x89PNG"
    counts = {n: (m["sets"]["clean"]["correct"], m["c"]["counts"]["gaussian_noise"][3][0])
              for n, m in res["models"].items()}
    # alpha 0 is the original model: every head answers like the frozen clean head; the branch sees frozen features
    for head in ("robust", "combined", "auto"):
        assert counts[f"s@wise0:{head}"] == counts["s@wise0:clean"]
    assert counts["s@wise0:zeroshot-branch"] == counts["s:zeroshot"]
    # alpha 1 is the student as trained
    s, _ = load_student(student)
    x, y = fmnist_images(32)
    for head in ("clean", "robust", "combined", "auto"):
        assert counts[f"s@wise1:{head}"][0] == correct(predict(s, x, head), y)
    with torch.no_grad():
        for name, head in (("s:zeroshot", "clean"), ("s@wise1:zeroshot-branch", "robust")):
            assert counts[name][0] == correct(evaluate.zeroshot_logits(s.features(x, head), text), y)


def test_routing_diagnostics_match_a_hand_computation(tmp_path, student, capsys):
    from distill_partial import answer, load_student, select_head
    s, _ = load_student(student)
    x, y = fmnist_images(64)
    with torch.no_grad():
        _, _, s0 = select_head(*s(x), float("inf"))
    ckpt = torch.load(student, weights_only=True)
    ckpt["tau"] = s.tau = float(s0.median())   # half the clean images routed away: both selector branches run
    torch.save(ckpt, tmp_path / "student.pt")
    res = evaluate.main([*FM, "--checkpoint", str(tmp_path / "student.pt"), "--name", "s", "--head", "auto",
                         "--test-subset", "64", "-b", "32", "--generate-c", "--corruptions", "gaussian_noise,contrast",
                         "--severities", "3,5", "--output", str(tmp_path / "out")])
    stdout = capsys.readouterr().out
    routing = res["models"]["s"]["routing"]["sets"]

    def by_hand(images):
        with torch.no_grad():
            out = s(images)
        choice = select_head(*out, s.tau)[1]
        ok = torch.stack([answer(*out, h, s.tau).argmax(1) == y for h in ("clean", "robust", "combined")])
        auto = answer(*out, "auto", s.tau).argmax(1) == y
        return {"to_clean": (choice == 0).sum(), "to_robust": (choice == 1).sum(), "to_combined": (choice == 2).sum(),
                "clean": ok[0].sum(), "robust": ok[1].sum(), "combined": ok[2].sum(), "oracle": ok.any(0).sum(),
                "auto": auto.sum()}

    expected = {"clean": by_hand(x)}
    for c in ("gaussian_noise", "contrast"):
        for sev in (3, 5):   # the 64 images are one block (evaluate.SEED_BLOCK), whatever -b
            expected[f"{c}/{sev}"] = by_hand(evaluate.corrupt(x, c, sev, evaluate.corruption_seed(0, c, sev, 0)))
    for label, want in expected.items():
        got = routing[label]
        for key, v in want.items():
            assert got[key] == pytest.approx(100.0 * int(v) / 64), (label, key)
        assert got["to_clean"] + got["to_robust"] + got["to_combined"] == pytest.approx(100.0)
        assert got["oracle"] >= max(got["clean"], got["robust"], got["combined"], got["auto"])
    assert 0 < routing["clean"]["to_clean"] < 100   # the threshold splits the clean images
    pooled = routing["C severity 5"]
    assert pooled["n"] == 128 and pooled["auto"] == pytest.approx(
        (routing["gaussian_noise/5"]["auto"] + routing["contrast/5"]["auto"]) / 2)
    assert res["models"]["s"]["sets"]["clean"]["top1"] == pytest.approx(routing["clean"]["auto"])
    assert "routing of s" in stdout and "| gaussian_noise/5 |" in stdout
    assert (tmp_path / "out" / "routing.md").read_text().startswith("routing of s")


# ----------------------------------------------------------------------------- bad input: one line, exit 2

@pytest.mark.parametrize("data_flags, argv, message", [
    ("fm", ["--shifts", "clean,imagenet-x"], "--shifts: unknown set 'imagenet-x'"),
    ("fm-no-model", ["--shifts", "clean"], "no model given"),
    ("root", ["--shifts", "a"], "imagenet-a does not exist"),
    ("fm", ["--generate-c", "--corruptions", "gaussian_noise,fizz"], "unknown corruption 'fizz'"),
    ("fm", ["--shifts", "clean", "--wise-alpha", "0,0.5"], "--wise-alpha needs a distill_partial.py (delta)"),
    ("fm", ["--shifts", "clean", "--attack", "pgd", "--attack-eps", "8"], "look like 0-255 units"),
    ("folder", ["--shifts", "clean"], "predicts 10 classes but the clean set"),
    ("folder", ["--shifts", "clean,r"], "score the 1000 ImageNet classes"),
    ("root", ["--shifts", "r"], "predicts 10 classes but ImageNet"),
    ("fm", ["--shifts", "clean", "--zeroshot-head", "{root}/w.npy"], "does not fit"),
])
def test_bad_input_is_one_line(data_flags, argv, message, teacher, tmp_path, capsys, monkeypatch):
    for c in ("a", "b", "c"):
        write_class_images(tmp_path / "folder" / "val" / c, 1, decoy=False, n=1)
    write_class_images(tmp_path / "root" / "imagenet-r" / "n01443537", 1, decoy=False, n=1)
    np.save(tmp_path / "root" / "w.npy", np.zeros((10, 7), np.float32))
    flags = {"fm": FM, "fm-no-model": FM, "root": ["--data-root", str(tmp_path / "root")],
             "folder": ["--data-dir", str(tmp_path / "folder"), "--data-root", str(tmp_path / "root")]}[data_flags]
    models = [] if data_flags == "fm-no-model" else ["--checkpoint", teacher]
    argv = [a.format(root=tmp_path / "root") for a in argv]
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    with pytest.raises(SystemExit) as e:
        evaluate.main([*flags, *models, *argv, "-j", "0", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("evaluate.py: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_cache_keys_follow_the_model_input_size_and_the_files_on_disk(tmp_path, teacher):
    """A --model's own --img-size and a set whose files changed are scored anew, not read from the cache."""
    argv = [*FM, "--checkpoint", teacher, "--model", "resnet18", "--model-kwargs", *TINY, "--test-subset", "32",
            "-b", "32", "--shifts", "clean", "--output", str(tmp_path / "out")]
    for size in (32, 64):   # the first column (and so the task's data config) stays the checkpoint's
        evaluate.main(argv + ["--img-size", str(size)])
    assert len(list((tmp_path / "out" / "cache").glob("*.json"))) == 3   # the checkpoint's entry is reused
    noise = [*FM, "--checkpoint", teacher, "--test-subset", "32", "--shifts", "c", "--generate-c", "--corruptions",
             "gaussian_noise", "--severities", "3", "--output", str(tmp_path / "seeds")]
    for seed in ("0", "1", "0"):   # another seed draws other noise: scored anew, then found again
        evaluate.main(noise + ["--seed", seed])
    assert len(list((tmp_path / "seeds" / "cache").glob("*.json"))) == 2
    folder = tmp_path / "set"
    write_class_images(folder / "n01443537", 1, decoy=False, n=1)
    before = evaluate.listing_ident(str(folder))
    assert evaluate.listing_ident(str(folder)) == before
    os.utime(folder / "n01443537", ns=(1, 1))   # as a file added to the class folder leaves it
    assert evaluate.listing_ident(str(folder)) != before


def test_every_head_of_a_student_shares_one_forward(tmp_path, student, monkeypatch):
    """--head all scores four columns from one forward per batch of -b (and one image at construction)."""
    from distill_partial import BranchStudent
    sizes, forward = [], BranchStudent.forward
    monkeypatch.setattr(BranchStudent, "forward", lambda self, x, *a, **k: (sizes.append(len(x)), forward(self, x, *a, **k))[1])
    evaluate.main([*FM, "--checkpoint", student, "--head", "all", "--test-subset", "64", "-b", "32", "--shifts",
                   "clean", "--output", str(tmp_path / "out")])
    assert sorted(sizes) == [1, 32, 32]


def test_relative_mce_against_the_baseline_uses_each_ones_clean_error():
    cols = [evaluate.Column(n, None, None, {}, n) for n in ("base", "model")]
    counts = {}
    for name, clean, noisy in (("base", 80, (60, 50)), ("model", 90, (75, 55))):   # correct of 100
        counts[(name, "clean", None, None)] = (clean, 100)
        for sev, k in zip((1, 2), noisy):
            counts[(name, "c", "gaussian_noise", sev)] = (k, 100)
    out = evaluate.summarize(cols, counts, ["gaussian_noise"], [1, 2], False, "base")
    want = ((0.25 - 0.10) + (0.45 - 0.10)) / ((0.40 - 0.20) + (0.50 - 0.20))   # sum_s (E - E_clean), each its own
    assert out["model"]["c"]["relative_mce_vs_baseline"] == pytest.approx(100 * want)
    assert out["model"]["c"]["mce_vs_baseline"] == pytest.approx(100 * (0.25 + 0.45) / (0.40 + 0.50))
