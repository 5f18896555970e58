"""CPU tests of the method, distill_partial.py: tiny timm students (pretrained=False), a tiny resnet teacher,
Fashion-MNIST subsets. The scripts run in-process (torch + timm cost ~12 s per process), except torchrun.

    HF_HUB_OFFLINE=1 python -m pytest -q test_distill.py
"""
import copy
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import data  # noqa: E402
import distill_partial as dp  # noqa: E402
import train_teacher as tt  # noqa: E402
from data import FASHION_MNIST_CLASSES, UserError, fashion_mnist, make_loader  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VIT, VIT_KW = "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
CNN, CNN_KW = "resnet18", dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
# --device cpu: these tests compare with CPU computations (and run two gloo processes), also on a GPU machine
FMNIST = ["--dataset", "fashion-mnist", "--train-subset", "96", "--val-subset", "32", "--calib-size", "32",
          "-b", "16", "-j", "0", "--device", "cpu"]
STEPS_PER_EPOCH = (96 - 32) // 16
DELTA_KEYS = ("branch.", "head_robust.", "head_combined.")


def kw_args(kw):
    """{'layers': [1, 1, 1, 1]} -> ['layers=[1,1,1,1]'], the --model-kwargs spelling."""
    return [f"{k}={v}".replace(" ", "") for k, v in kw.items()]


TINY_CNN = ["--student", CNN, "--model-kwargs", *kw_args(CNN_KW)]


def run_distill(argv):
    """distill_partial.main(argv) -> (final result, the BranchStudent it trained, still in memory)."""
    made = []

    class Recorded(dp.BranchStudent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dp, "BranchStudent", Recorded)
        result = dp.main(argv)
    return result, made[-1]


def one_line_error(capsys, argv):
    """distill_partial.main must fail on this input: exit status 2, one stderr line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dp.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def images(n, seed):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_same(a, b, where=""):
    """Nested checkpoint values (dicts, lists, tensors, numbers) are identical."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# ----------------------------------------------------------------------------- shared runs (made once)

def save_base(path, seed):
    """A 'pre-trained' ViT student in this project's checkpoint schema (what --pretrained-file reads)."""
    torch.manual_seed(seed)
    model = tt.create_model(VIT, 10, model_kwargs=VIT_KW)
    torch.save(dict(schema=tt.SCHEMA, kind="model", arch=VIT, model_kwargs=VIT_KW, num_classes=10,
                    class_names=list(FASHION_MNIST_CLASSES), data_config=tt.model_data_config(model, 32),
                    model=model.state_dict()), path)
    return str(path)


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="session")
def teacher(root):
    out = str(root / "teacher")
    tt.main(["--dataset", "fashion-mnist", "--train-subset", "64", "--val-subset", "32", "--epochs", "1",
             "-b", "32", "-j", "0", "--arch", CNN, "--model-kwargs", *kw_args(CNN_KW), "--output", out])
    return os.path.join(out, "best.pt")


@pytest.fixture(scope="session")
def vit_argv(root, teacher):
    base = save_base(root / "student_base.pt", seed=1)
    return FMNIST + ["--student", VIT, "--model-kwargs", *kw_args(VIT_KW), "--pretrained-file", base,
                     "--teacher", teacher, "--tune-last", "2"]


@pytest.fixture(scope="session")
def vit_runs(root, vit_argv):
    """A: 2 epochs. B: 2 epochs stopped after 1 (its best.pt is the in-memory student). C: B resumed."""
    a = run_distill(vit_argv + ["--epochs", "2", "--output", str(root / "vit_a")])
    b = run_distill(vit_argv + ["--epochs", "2", "--stop-after", "1", "--output", str(root / "vit_b")])
    c = run_distill(vit_argv + ["--epochs", "2", "--resume", str(root / "vit_b" / "last.pt"),
                                "--output", str(root / "vit_c")])
    return dict(a=a, b=b, c=c)


@pytest.fixture(scope="session")
def ftp_runs(root, teacher):
    """The same A / B / C runs with a CNN student and --opt ftp (FTP state must survive the resume)."""
    argv = FMNIST + TINY_CNN + ["--teacher", teacher, "--tune-last", "2", "--opt", "ftp", "--lr", "3e-3"]
    a = run_distill(argv + ["--epochs", "2", "--output", str(root / "ftp_a")])
    b = run_distill(argv + ["--epochs", "2", "--stop-after", "1", "--output", str(root / "ftp_b")])
    c = run_distill(argv + ["--epochs", "2", "--resume", str(root / "ftp_b" / "last.pt"),
                            "--output", str(root / "ftp_c")])
    return dict(a=a, b=b, c=c)


# ----------------------------------------------------------------------------- the branch student

def tiny_student(family, k, seed=0, at="end"):
    """(student, reference): a BranchStudent around a fresh timm model, and an untouched eval-mode copy of
    that model wrapped the same way. Dropout and stochastic depth are on, to catch a frozen part in train mode."""
    torch.manual_seed(seed)
    if family == "vit":
        model = tt.create_model(VIT, 10, model_kwargs=VIT_KW, drop_rate=0.2, drop_path_rate=0.2)
    else:
        model = tt.create_model(CNN, 10, model_kwargs=CNN_KW, drop_rate=0.2)
    cfg = tt.model_data_config(model, 32)
    ref = tt.Normalized(copy.deepcopy(model), cfg).eval()
    return dp.BranchStudent(model, cfg, k, branch_dropout=0.1, at=at), ref


@pytest.mark.parametrize("family,k,at", [("vit", 2, "end"), ("cnn", 2, "end"), ("cnn", "all", "end"),
                                         ("vit", 1, "start"), ("cnn", 2, "start")])
def test_clean_head_is_the_original_model_bit_for_bit(family, k, at):
    student, ref = tiny_student(family, k, at=at)
    x = images(6, seed=1)
    frozen = {n: t.clone() for n, t in student.model.state_dict().items()}   # trunk, tail, clean head, BN stats
    with torch.no_grad():
        clean, robust, combined = student.eval()(x)
        want = ref(x)
    assert torch.equal(clean, want)
    assert torch.equal(robust, want) and torch.equal(combined, want)   # branch and new heads start as copies

    opt = dp.build_optimizer(student, "adamw", 1e-2, 0.05, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        student.train()
        xc, xa = images(4, seed=10 + step), images(4, seed=20 + step)
        y = torch.randint(0, 10, (4,), generator=g)
        t_logits = torch.randn(4, 10, generator=g) * 3
        clean, robust, combined = student(torch.cat([xc, xa]), clean_rows=slice(4, None))
        with torch.no_grad():
            assert torch.equal(clean, ref(xa))   # exact in train mode too: the KD target's frozen side
        q = dp.kd_target(t_logits, clean, 2.0)[0]
        loss = dp.method_loss(robust[4:], combined[:4], combined[4:], y, q, 2.0, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in student.named_parameters():
            trainable = name.startswith(DELTA_KEYS)
            assert p.requires_grad == trainable, name
            assert (p.grad is not None) == trainable, name   # never backpropagate into trunk/tail/clean head
        opt.step()

    for name, t in student.model.state_dict().items():
        assert torch.equal(t, frozen[name]), name   # parameters and buffers of the frozen model untouched
    with torch.no_grad():
        clean, robust, combined = student.eval()(x)
    assert torch.equal(clean, ref(x))
    assert not torch.allclose(robust, clean) and not torch.allclose(combined, clean)   # the branch did train


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_clean_head_is_bit_exact_under_bf16_autocast(family):
    """On CUDA under bf16 autocast the clean head is still the original model, run the same way, bit for bit."""
    device = torch.device("cuda")
    student, ref = tiny_student(family, 2)
    student, ref = student.to(device).eval(), ref.to(device)
    autocast, _ = tt.amp_setup(device, True, "bf16")
    x = images(6, seed=1).to(device)
    with torch.no_grad(), autocast():
        clean, robust, combined = student(x)
        want = ref(x)
    assert clean.device.type == "cuda" and torch.equal(clean, want)
    assert torch.equal(robust, want) and torch.equal(combined, want)


def test_normalized_makes_its_buffers_on_its_models_device():
    """Normalized's mean/std are made where its model is (here the meta device; CUDA in the test below), so
    wrapping a model already on a GPU moves neither side."""
    model = tt.create_model(CNN, 10, model_kwargs=CNN_KW)
    cfg = tt.model_data_config(model, 32)
    net = tt.Normalized(model.to("meta"), cfg)
    assert net.mean.device.type == "meta" and net.std.device.type == "meta"


@CUDA
@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_student_built_around_a_model_already_on_cuda(family):
    """Wrapping a model that is already on the GPU keeps everything there (bench.py's inference section does
    this): the normalisation buffers are made on the model's device, so the build-time clean-path check runs."""
    torch.manual_seed(0)
    model = (tt.create_model(VIT, 10, model_kwargs=VIT_KW) if family == "vit" else
             tt.create_model(CNN, 10, model_kwargs=CNN_KW)).to("cuda")
    cfg = tt.model_data_config(model, 32)
    student = dp.BranchStudent(model, cfg, 2)
    assert {t.device.type for t in list(student.parameters()) + list(student.buffers())} == {"cuda"}
    clean = student(images(3, seed=2).to("cuda"))[0]
    assert clean.device.type == "cuda" and clean.shape == (3, 10)


@CUDA
def test_bf16_distill_step_on_cuda():
    """One method step under bf16 autocast on CUDA: finite loss in fp32, only the branch and the new heads
    move, and the clean head still equals the original model (in the step and after it)."""
    device = torch.device("cuda")
    student, ref = tiny_student("vit", 2)
    student, ref = student.to(device), ref.to(device)
    torch.manual_seed(0)
    teacher = tt.Normalized(tt.create_model(CNN, 10, model_kwargs=CNN_KW), tt.model_data_config(ref.model, 32))
    teacher = teacher.to(device).eval().requires_grad_(False)
    frozen = {n: t.clone() for n, t in student.model.state_dict().items()}
    delta = {n: t.clone() for n, t in dp.delta_state(student).items()}
    opt = dp.build_optimizer(student, "adamw", 1e-2, 0.05, device)
    autocast, scaler = tt.amp_setup(device, True, "bf16")
    x = torch.cat([images(4, seed=10), images(4, seed=20)]).to(device)
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2)).to(device)
    student.train()
    loss, _ = dp.train_step(student, teacher, x, y, opt, scaler, autocast, 2.0, 0.5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert not scaler.is_enabled()   # bf16 needs no loss scaling
    for name, t in student.model.state_dict().items():
        assert torch.equal(t, frozen[name]), name
    moved = [n for n, t in dp.delta_state(student).items() if not torch.equal(t, delta[n])]
    assert any(n.startswith("branch.") for n in moved) and any(n.startswith("head_robust.") for n in moved)
    with torch.no_grad(), autocast():
        assert torch.equal(student.eval()(x)[0], ref(x))


@CUDA
def test_training_step_never_waits_for_the_gpu():
    """What the training loop does every step (the AugMix view made on the GPU, the bf16 method step with fused
    AdamW, the loss and view stats summed on the device) reads nothing back from the GPU: torch's sync debug mode
    raises at any host-device synchronisation. So the host queues the next step while the GPU runs this one."""
    device = torch.device("cuda")
    student = tiny_student("vit", 2)[0].to(device)
    torch.manual_seed(0)
    teacher = tt.Normalized(tt.create_model(CNN, 10, model_kwargs=CNN_KW), tt.model_data_config(student.model, 32))
    teacher = teacher.to(device).eval().requires_grad_(False)
    opt = dp.build_optimizer(student, "adamw", 1e-3, 0.05, device)
    autocast, scaler = tt.amp_setup(device, True, "bf16")
    crops = images(4, seed=10).pin_memory()   # as the loader hands them over with --aug-device cuda
    labels = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2)).pin_memory()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stats_sum = torch.zeros(3, device=device)
    student.train()

    def step():
        x = data.device_views(crops, device, data.BatchAugMix(), 1)
        loss, stats = dp.train_step(student, teacher, x, labels.to(device, non_blocking=True), opt, scaler, autocast,
                                    2.0, 0.5)
        loss_sum.add_(loss)
        stats_sum.add_(stats)

    step()   # the first step also builds the optimizer state
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss_sum) and stats_sum.tolist()[0] <= 4 * 4


def test_tune_last_all_trains_every_block(root, monkeypatch):
    """Also --aug-device cuda (on the CPU here): clean crops from the loader, the AugMix view made in the loop."""
    seen = []
    batched = data.augmix_batch
    monkeypatch.setattr(data, "augmix_batch", lambda x, **kw: (seen.append(x.shape), batched(x, **kw))[1])
    out = str(root / "all")
    result = dp.main(FMNIST + TINY_CNN + ["--teacher", "none", "--tune-last", "all", "--epochs", "1",
                                          "--aug-device", "cuda", "--output", out])
    assert result["k"] == 4 and result["step"] == STEPS_PER_EPOCH
    assert seen == [(16, 3, 32, 32)] * STEPS_PER_EPOCH
    ckpt = load(os.path.join(out, "last.pt"))
    base = dp.build_base(ckpt["base"])
    delta = ckpt["model"]
    body = {n: t for n, t in base.state_dict().items() if not n.startswith("fc.")}
    # The branch is a full copy of the network minus its classifier (replaced by the two new heads) ...
    assert {k for k in delta if k.startswith("branch.")} == {"branch.model." + n for n in body}
    # ... and every parameter of it moved, the stem included.
    for name, p in base.named_parameters():
        if not name.startswith("fc."):
            assert not torch.equal(delta["branch.model." + name], p), name
    for head in ("head_robust", "head_combined"):
        assert not torch.equal(delta[f"{head}.weight"], base.fc.weight)
    assert result["trainable_params"] == sum(p.numel() for n, p in base.named_parameters()
                                             if not n.startswith("fc.")) + 2 * (64 * 10 + 10)


@pytest.mark.parametrize("value,needle", [("0", "--tune-last 0"), ("9", "--tune-last 9"),
                                          ("two", "--tune-last 'two'")])
def test_bad_tune_last_is_one_line(root, capsys, value, needle):
    err = one_line_error(capsys, FMNIST + TINY_CNN + ["--teacher", "none", "--tune-last", value,
                                                      "--output", str(root / f"bad_k_{value}")])
    assert needle in err
    if value == "9":
        assert "4 blocks" in err


# ----------------------------------------------------------------------------- losses

def softmax(z):
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def test_kd_target_and_method_loss_by_hand():
    T, lam, C = 2.0, 0.3, 4
    teacher = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.1, 0.0, -0.1, 0.0], [1.0, 2.0, 0.5, -1.0]])
    student = torch.tensor([[0.2, 0.1, 0.0, -0.1], [0.0, 7.0, 0.0, 0.0], [-1.0, 0.0, 3.0, 1.0]])
    t, o = softmax(teacher / T), softmax(student / T)
    conf_t = 1 + (t * torch.log(t)).sum(-1) / math.log(C)   # 1 - H(t) / log C
    conf_o = 1 + (o * torch.log(o)).sum(-1) / math.log(C)
    w = conf_t / (conf_t + conf_o)
    q_want = w[:, None] * t + (1 - w[:, None]) * o
    q, w_got = dp.kd_target(teacher, student, T)
    torch.testing.assert_close(w_got, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(q, q_want, rtol=0, atol=1e-5)   # w carries 1e-6 guards against 0/0
    torch.testing.assert_close(q.sum(-1), torch.ones(3))
    # Student flat, teacher sure: the target follows the teacher; the reverse keeps the student's knowledge.
    assert w_got[0] > 0.9 and (q[0] - t[0]).abs().sum() < (q[0] - o[0]).abs().sum()
    assert w_got[1] < 0.1 and (q[1] - o[1]).abs().sum() < (q[1] - t[1]).abs().sum()

    robust = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0]])
    comb_clean = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    comb_aug = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [1.0, -1.0, 1.0, -1.0]])
    y = torch.tensor([0, 1, 2])

    def ce(z):
        return -torch.log(softmax(z)[torch.arange(3), y]).mean()

    p = softmax(robust / T)
    kl = (q_want * (torch.log(q_want) - torch.log(p))).sum(-1).mean()   # KL(q || p), batch mean
    want = (1 - lam) * ce(robust) + lam * T * T * kl + ce(comb_clean) + ce(comb_aug)
    torch.testing.assert_close(dp.method_loss(robust, comb_clean, comb_aug, y, q, T, lam), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dp.method_loss(robust, comb_clean, comb_aug, y, None, T, lam),   # no teacher
                               ce(robust) + ce(comb_clean) + ce(comb_aug), rtol=1e-5, atol=1e-6)


def test_two_views_and_jsd_by_hand():
    """--jsd: two AugMix views per image, each x' term their mean, plus 12 * the Jensen-Shannon divergence
    of the combined head over (clean, view 1, view 2); one view and jsd 0 is the loss from before --jsd,
    bit for bit (runs made before it reproduce exactly)."""
    g = torch.Generator().manual_seed(0)
    b, C, T, lam = 3, 4, 2.0, 0.5
    robust, comb_aug, q_logits = (torch.randn(2 * b, C, generator=g) for _ in range(3))
    comb_clean, y, q = torch.randn(b, C, generator=g), torch.tensor([0, 3, 1]), softmax(q_logits / T)

    def ce(z, labels):
        return -torch.log(softmax(z)[torch.arange(len(z)), labels]).mean()

    p = softmax(robust / T)
    kl = (q * (torch.log(q) - torch.log(p))).sum(-1).mean()
    y2 = torch.cat([y, y])
    plain = (1 - lam) * ce(robust, y2) + lam * T * T * kl + ce(comb_clean, y) + ce(comb_aug, y2)
    probs = [softmax(comb_clean), softmax(comb_aug[:b]), softmax(comb_aug[b:])]
    mix = sum(probs) / 3
    js = sum((pi * (torch.log(pi) - torch.log(mix))).sum(-1).mean() for pi in probs) / 3
    torch.testing.assert_close(dp.method_loss(robust, comb_clean, comb_aug, y, q, T, lam), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dp.method_loss(robust, comb_clean, comb_aug, y, q, T, lam, jsd=12.0), plain + 12 * js,
                               rtol=1e-5, atol=1e-6)
    assert js > 0.01
    one = [robust[:b], comb_clean, comb_aug[:b]]   # the loss as it was before --jsd, op for op
    kd = F.kl_div((one[0] / T).log_softmax(-1), q[:b], reduction="batchmean") * T * T
    before = (1 - lam) * F.cross_entropy(one[0], y) + lam * kd + F.cross_entropy(one[1], y) + F.cross_entropy(one[2], y)
    assert torch.equal(dp.method_loss(*one, y, q[:b], T, lam), before)
    # the consistency term vanishes where the combined head answers alike on all three views
    same = comb_clean.repeat(2, 1)
    torch.testing.assert_close(dp.method_loss(robust, comb_clean, same, y, q, T, lam, jsd=12.0),
                               dp.method_loss(robust, comb_clean, same, y, q, T, lam), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- head selection

def test_select_head_by_hand():
    tau = 0.1
    clean = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    robust = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.3, 0.0]])     # row 0: agrees with clean
    combined = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 6.0]])
    pc, pr, pm = softmax(clean), softmax(robust), softmax(combined)
    s_want = (pc * (torch.log(pc) - torch.log(pr))).sum(-1)
    log_p, choice, s = dp.select_head(clean, robust, combined, tau)
    torch.testing.assert_close(s, s_want)
    assert s[0] <= tau < s[1] and tau < s[2]
    assert choice.tolist() == [0, 1, 2]   # in-distribution -> clean; else the lower-entropy head
    torch.testing.assert_close(log_p, torch.log(torch.stack([pc[0], pr[1], pm[2]])))
    # A tau above every score sends everything to the clean head.
    assert dp.select_head(clean, robust, combined, float(s.max()) + 1)[1].tolist() == [0, 0, 0]


def test_calibration_and_forced_heads(vit_runs):
    student = copy.deepcopy(vit_runs["b"][1])   # tau is set below; the shared student keeps its own
    val = fashion_mnist("val")
    calib = torch.utils.data.Subset(val, range(0, 480))   # 480 + 480: the 5% tail is ~24 images, not noise
    held = torch.stack([val[i][0] for i in range(480, 960)])
    loader = make_loader(calib, 120, 0, False)
    tau = dp.calibrate_tau(student, loader, torch.device("cpu"), quantile=0.95)

    # The score s is select_head's (checked by hand above); s ~ 1e-3 is a difference of nearly equal logs, so
    # a second formula would differ in the 4th digit. Same batches as calibrate_tau.
    with torch.no_grad():
        s = torch.cat([dp.select_head(*student(x), float("inf"))[2] for x, _ in loader])
    assert len(s) == 480 and s.unique().numel() > 450   # the branch trained: scores are spread, not tied at 0
    assert tau == float(torch.quantile(s, 0.95))
    assert 0.03 <= (s > tau).float().mean().item() <= 0.07   # ~5% of the clean slice leaves the clean head

    student.tau = tau
    with torch.no_grad():
        c, r, m = student(held)
    for head, want in (("clean", c), ("robust", r), ("combined", m)):
        assert torch.equal(dp.predict(student, held, head), want)   # forced heads: exactly that head's logits
    log_p, choice, _ = dp.select_head(c, r, m, tau)
    assert torch.equal(dp.predict(student, held, "auto"), log_p)
    assert (choice == 0).float().mean() >= 0.9   # unseen clean images mostly keep the original model's answer
    torch.testing.assert_close(log_p[choice == 0], F.log_softmax(c, -1)[choice == 0])


# ----------------------------------------------------------------------------- the script's runs

def test_resume_equals_uninterrupted(root, vit_runs, ftp_runs):
    for runs, name in ((vit_runs, "vit"), (ftp_runs, "ftp")):
        (ra, _), (rb, _), (rc, _) = runs["a"], runs["b"], runs["c"]
        assert rb["epochs_done"] == 1 and ra["epochs_done"] == rc["epochs_done"] == 2
        for key in ("step", "lr", "tau", "val", "best_auto"):
            assert ra[key] == rc[key], (name, key)
        assert rc["step"] == 2 * STEPS_PER_EPOCH
        a, c = (load(root / f"{name}_{x}" / "last.pt") for x in "ac")
        assert_same(a["model"], c["model"], f"{name}.model")
        assert_same(a["optimizer"], c["optimizer"], f"{name}.optimizer")   # FTP anchors/radii too
        for key in ("epoch", "step", "tau", "val", "best_metric"):
            assert a[key] == c[key], (name, key)
        log_a, log_c = ([json.loads(line) for line in open(root / f"{name}_{x}" / "log.jsonl")] for x in "ac")
        assert log_a[1]["train_loss"] == log_c[0]["train_loss"] and log_c[0]["epoch"] == 2


def test_ftp_keeps_branch_rows_in_their_balls(root, ftp_runs):
    _, student = ftp_runs["a"]
    ckpt = load(root / "ftp_a" / "last.pt")
    opt = ckpt["optimizer"]
    branch, heads = opt["param_groups"]
    assert branch["project"] is True and heads["project"] is False
    names = [n for n, _ in student.branch.named_parameters()]
    tail = dict(student.tail.named_parameters())
    assert len(branch["params"]) == len(names)
    bound = []
    for i, name in zip(branch["params"], names):
        state, p = opt["state"][i], ckpt["model"]["branch." + name]
        assert torch.equal(state["anchor"], tail[name])   # the anchor is the starting (frozen tail) weight
        row_sum = lambda t: t.abs().reshape(t.shape[0], -1).sum(1) if t.dim() >= 2 else t.abs().sum().reshape(1)
        rows = row_sum(p - state["anchor"])
        # anchor + (r / n) c is rounded to fp32 next to the anchor: up to eps |anchor| per element beyond the ball
        slack = torch.finfo(torch.float32).eps * row_sum(state["anchor"])
        assert (rows <= state["radius"] * (1 + 1e-5) + slack + 1e-12).all(), name
        bound.append((rows.max() / state["radius"]).item())
    assert max(bound) > 0.99   # the projection is active, not a no-op
    for i in heads["params"]:
        assert "anchor" not in opt["state"][i] and "radius" not in opt["state"][i]   # heads move freely


@pytest.mark.parametrize("which", ["vit", "ftp"])
def test_wise_ft_endpoints(vit_runs, ftp_runs, which):
    _, student = (vit_runs if which == "vit" else ftp_runs)["a"]
    x = images(8, seed=3)
    with torch.no_grad():
        clean, robust, combined = student.eval()(x)
        c0, r0, m0 = dp.wise_ft(student, 0.0).eval()(x)
        c1, r1, m1 = dp.wise_ft(student, 1.0).eval()(x)
    assert not torch.allclose(robust, clean, atol=1e-4)
    assert torch.equal(c0, clean) and torch.equal(c1, clean)
    torch.testing.assert_close(r0, clean, rtol=0, atol=1e-6)   # alpha 0: the original model
    torch.testing.assert_close(m0, clean, rtol=0, atol=1e-6)
    assert torch.equal(r1, robust) and torch.equal(m1, combined)   # alpha 1: the tuned student
    half = dict(dp.wise_ft(student, 0.5).branch.named_parameters())
    tail = dict(student.tail.named_parameters())
    for name, p in student.branch.named_parameters():
        torch.testing.assert_close(half[name], (p + tail[name]) / 2)
    half, tail = dict(dp.wise_ft(student, 0.5).branch.named_buffers()), dict(student.tail.named_buffers())
    for name, b in student.branch.named_buffers():   # BN running statistics (CNN) interpolate with the weights
        if b.is_floating_point():
            torch.testing.assert_close(half[name], (b + tail[name]) / 2)
    assert bool(half) == (which == "ftp")   # only the CNN has BN buffers


def test_delta_checkpoint_rebuilds_the_student(root, vit_runs):
    _, student = vit_runs["b"]   # one epoch: best.pt is what is in memory now
    path = str(root / "vit_b" / "best.pt")
    loaded, ckpt = dp.load_student(path)
    assert ckpt["epoch"] == 1 and loaded.tau == student.tau
    x = images(8, seed=4)
    with torch.no_grad():
        for got, want in zip(loaded(x), student.eval()(x)):
            assert torch.equal(got, want)
        assert torch.equal(dp.predict(loaded, x, "auto"), dp.predict(student, x, "auto"))
    # Only the delta is stored: branch and the two heads, nothing of the frozen model.
    assert ckpt["model"].keys() == dp.delta_state(student).keys()
    assert all(k.startswith(DELTA_KEYS) for k in ckpt["model"])
    delta_bytes = sum(t.numel() * t.element_size() for t in ckpt["model"].values())
    full_bytes = sum(t.numel() * t.element_size() for t in student.model.state_dict().values())
    assert delta_bytes < 0.6 * full_bytes   # K=2 of 4 blocks: about half the model, plus two small heads
    # On disk too, once the optimizer's moments (2x the delta; best.pt keeps them for --resume) are left out:
    torch.save(student.model.state_dict(), root / "full_state.pt")
    torch.save(dict(ckpt, optimizer=None), root / "delta_only.pt")
    assert os.path.getsize(root / "delta_only.pt") < os.path.getsize(root / "full_state.pt")
    # Other base weights are refused.
    other = save_base(root / "other_base.pt", seed=2)
    with pytest.raises(UserError, match="--base-file"):
        dp.load_student(path, base_file=other)


def test_teacher_with_another_label_space_is_one_line(root, teacher, vit_argv, capsys):
    ckpt = load(teacher)
    three = dict(ckpt, num_classes=3, class_names=["a", "b", "c"],
                 model=dict(ckpt["model"], **{"fc.weight": ckpt["model"]["fc.weight"][:3],
                                              "fc.bias": ckpt["model"]["fc.bias"][:3]}))
    torch.save(three, root / "teacher3.pt")
    shuffled = dict(ckpt, class_names=list(reversed(ckpt["class_names"])))   # 10 classes, other order
    torch.save(shuffled, root / "teacher_shuffled.pt")
    for name, needle in (("teacher3.pt", "(3 classes: a, b, c"), ("teacher_shuffled.pt", "(10 classes: ankle boot")):
        argv = [a if a != teacher else str(root / name) for a in vit_argv]
        err = one_line_error(capsys, argv + ["--epochs", "1", "--output", str(root / f"bad_{name}")])
        assert "--teacher" in err and name in err and needle in err and "(10: t-shirt/top" in err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(root, vit_argv):
    out = root / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "distill_partial.py", *vit_argv, "--epochs", "2", "--output", str(out)]
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f for f in os.listdir(out) if f != ".lock") == ["args.json", "best.pt", "last.pt", "log.jsonl"]   # rank 0 only
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert [e.get("epoch") for e in log[:-1]] == [1, 2] and "final" in log[-1]   # written once per epoch
    final = log[-1]["final"]
    assert final["ranks_agree"] is True and final["epochs_done"] == 2
    assert final["step"] == 2 * (96 - 32) // (16 * 2)   # each rank trains on half the images
    printed = [line[line.index("final: ") + len("final: "):] for line in p.stdout.splitlines() if "final: " in line]
    assert len(printed) == 1 and json.loads(printed[0]) == final   # only rank 0 prints


# ----------------------------------------------------------------------------- students, seeds and flags

@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_clean_head_is_exact_for_every_vit_pooling(pool):
    torch.manual_seed(0)
    model = tt.create_model(VIT, 10, model_kwargs=dict(VIT_KW, global_pool=pool, class_token=False))
    cfg = tt.model_data_config(model, 32)
    ref = tt.Normalized(copy.deepcopy(model), cfg).eval()
    student = dp.BranchStudent(model, cfg, 2)
    with torch.no_grad():
        x = images(4, seed=0)
        assert torch.equal(student(x)[0], ref(x))


def test_models_without_a_block_path_take_tune_last_all_only():
    """BEiT and ConvNeXt are not stem -> blocks -> norm in timm's ViT sense: a partial branch is refused in
    one sentence, --tune-last all works (clean head = the model); a distilled DeiT's two heads are refused."""
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    for arch, kwargs in (("beit_base_patch16_224", kw), ("convnext_atto", dict(dims=(8, 8, 8, 8)))):
        model = tt.create_model(arch, 10, model_kwargs=kwargs).eval()
        cfg = tt.model_data_config(model, 32)
        with pytest.raises(UserError, match="only --tune-last all works"):
            dp.BranchStudent(model, cfg, 1)
        student = dp.BranchStudent(model, cfg, "all")
        dp.BranchStudent(copy.deepcopy(model), cfg, student.k)   # what load_student rebuilds from the saved k
        with torch.no_grad():
            x = images(2, seed=0)
            assert torch.equal(student(x)[0], model(student.wrap.normalize(x)))
    model = tt.create_model("deit_tiny_distilled_patch16_224", 10, model_kwargs=kw)
    with pytest.raises(UserError, match="several classifiers"):
        dp.BranchStudent(model, tt.model_data_config(model, 32), "all")


def test_a_base_with_a_new_classifier_is_rebuilt(root):
    """Base weights for another class count get a classifier drawn from --seed: the delta's base record
    keeps the seed, so the base rebuilds whatever the caller's random state; --base-file also stands in
    for hub weights."""
    torch.manual_seed(5)
    path = str(root / "base7.pth")
    torch.save(tt.create_model(VIT, 7, model_kwargs=VIT_KW).state_dict(), path)   # plain weights, 7 classes
    args = dp.get_parser().parse_args(["--student", VIT, "--pretrained-file", path, "--seed", "3"])
    torch.manual_seed(3)
    base = dp.base_record(args, VIT, tt.create_model(VIT, 10, pretrained_file=path, model_kwargs=VIT_KW), 10)
    torch.manual_seed(123)
    assert dp.fingerprint(dp.build_base(base)) == base["fingerprint"]
    hub = {k: v for k, v in base.items() if k not in ("file", "sha256")} | {"source": "hub"}
    assert dp.fingerprint(dp.build_base(hub, pretrained_file=path)) == base["fingerprint"]


def test_optimisation_flags_reach_the_step(root, monkeypatch, capsys):
    student, _ = tiny_student("cnn", 2)
    cpu = torch.device("cpu")
    sgd = dp.build_optimizer(student, "sgd", 0.1, 0.0, cpu, momentum=0.5).param_groups[0]
    assert sgd["momentum"] == 0.5 and sgd["nesterov"]
    assert not dp.build_optimizer(student, "sgd", 0.1, 0.0, cpu, momentum=0.0).param_groups[0]["nesterov"]
    z, y = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    assert dp.method_loss(z, z, z, y, smoothing=0.2).item() == pytest.approx(
        3 * F.cross_entropy(z, y, label_smoothing=0.2).item())
    parse = lambda *a: dp.resolve_defaults(dp.get_parser().parse_args(list(a)))
    assert parse("--opt", "ftp").weight_decay == 0 and parse().weight_decay == 0.05   # docs/REFERENCE.md: FTP, no decay
    built = {}

    def record(*a, **k):   # stop the run once the student is built
        built.update(k)
        raise UserError("built")
    monkeypatch.setattr(dp, "create_model", record)
    one_line_error(capsys, FMNIST + TINY_CNN + ["--drop-path", "0.1", "--output", str(root / "dp")])
    assert built["drop_path_rate"] == 0.1


def test_mc_dropout_tau_is_the_same_on_every_rank():
    """The calibration's dropout masks come from its own seed, not the rank's random state."""
    student, _ = tiny_student("vit", 2)
    loader = [(images(8, seed=s), torch.zeros(8)) for s in range(2)]
    taus = []
    for rank_state in (1, 2):
        torch.manual_seed(rank_state)
        taus.append(dp.calibrate_tau(student, loader, torch.device("cpu"), mc_samples=4, seed=7))
    assert taus[0] == taus[1] != dp.calibrate_tau(student, loader, torch.device("cpu"), mc_samples=4, seed=8)


def test_best_checkpoint_without_calibration_follows_the_new_heads():
    accs = dict(clean=50.0, robust=60.0, combined=70.0, auto=50.0)
    assert dp.selection_metric(accs, 0.1) == 50.0
    assert dp.selection_metric(accs, math.inf) == 70.0   # --calib-size 0: auto is the clean head, constant


# ----------------------------------------------------------------------------- what the losses and heads see

def test_mc_heads_average_probabilities():
    """With MC samples [S, B, C] a forced head answers log mean_s softmax (not the mean of logits), and the
    selector's choice of a head gives that head's answer."""
    clean = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    # [S=2, B=2, C=3]; image 1: the logits' mean favours class 0, the probabilities' mean class 1
    robust = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 4.1, -10.0]], [[0.0, 2.0, 0.0], [0.0, -10.0, 4.0]]])
    combined = torch.tensor([[[0.0, 0.2, 0.0], [0.0, 0.1, 0.0]], [[0.0, 0.3, 0.0], [0.0, 0.4, 0.0]]])
    want = softmax(robust).mean(0).log()
    got = dp.answer(clean, robust, combined, "robust", 0.0)
    torch.testing.assert_close(got, want)
    assert got[1].argmax() != robust.mean(0)[1].argmax()   # the two averages disagree on image 1
    log_p, choice, _ = dp.select_head(clean, robust, combined, 0.0)
    for i, c in enumerate(choice.tolist()):
        torch.testing.assert_close(log_p[i], dp.answer(clean, robust, combined, dp.HEADS[c], 0.0)[i])


@pytest.mark.parametrize("n", [1, 2])
def test_train_step_feeds_the_augmix_views_to_teacher_and_robust_head(monkeypatch, n):
    """x = [clean views; n AugMix views] (n = 2 with --jsd): the teacher and the robust head's loss see the
    AugMix rows, the combined head all of them; the view statistics are counts per image (the mean over
    its n views), so an epoch's percentages keep their meaning."""
    student, _ = tiny_student("cnn", 2)
    student.train()
    x, y, b = images(4 * (1 + n), seed=3), torch.arange(4), 4
    seen = {}

    class Teacher(torch.nn.Module):
        def forward(self, v):
            seen["teacher"] = v.clone()
            return F.one_hot(y.repeat(n), 10).float() * 9   # right and sure on every view

    def spy(robust_aug, combined_clean, combined_aug, *a, **k):
        seen["losses"] = (robust_aug.detach(), combined_clean.detach(), combined_aug.detach(), a[-1])
        return real(robust_aug, combined_clean, combined_aug, *a, **k)
    real = dp.method_loss
    monkeypatch.setattr(dp, "method_loss", spy)
    torch.manual_seed(0)
    opt = dp.build_optimizer(student, "sgd", 0.0, 0.0, torch.device("cpu"))
    autocast, scaler = tt.amp_setup(torch.device("cpu"), False, "bf16")
    state = torch.get_rng_state()
    jsd = 12.0 if n == 2 else 0.0
    _, stats = dp.train_step(student, Teacher(), x, y, opt, scaler, autocast, 2.0, 0.5, jsd=jsd)
    assert torch.equal(seen["teacher"], x[b:]) and seen["losses"][-1] == jsd
    torch.set_rng_state(state)   # the same dropout masks as in the step
    with torch.no_grad():
        clean, robust, combined = student(x, clean_rows=slice(b, None))
    for got, want in zip(seen["losses"], (robust[b:], combined[:b], combined[b:])):
        torch.testing.assert_close(got, want)
    frozen_right = (clean.argmax(-1) == y.repeat(n)).sum().item()   # the frozen clean head: unchanged by the step
    assert stats[0].item() == frozen_right / n and stats[1] == b and 0 < stats[2] <= b


def test_jsd_run_trains_on_two_views(root, teacher, monkeypatch):
    """distill_partial.py --jsd end to end: the loader makes two AugMix views per image, every step trains
    on [clean; view 1; view 2] with the weight 12, and the epoch's view statistics stay percentages."""
    shapes, step = [], dp.train_step
    monkeypatch.setattr(dp, "train_step", lambda student, teacher, x, y, *a, **k: (
        shapes.append((len(x), len(y), a[-1])), step(student, teacher, x, y, *a, **k))[1])
    out = root / "jsd"
    result, _ = run_distill(FMNIST + TINY_CNN + ["--teacher", teacher, "--tune-last", "1", "--jsd", "--epochs", "1",
                                                 "--output", str(out)])
    assert len(shapes) == STEPS_PER_EPOCH and all(n == 3 * b and w == 12.0 for n, b, w in shapes)
    epoch = [json.loads(line) for line in open(out / "log.jsonl") if '"epoch"' in line][0]
    assert all(0 <= epoch[k] <= 100 for k in ("student_on_views", "teacher_on_views", "teacher_weight"))
    assert math.isfinite(result["val"]["auto"])


def test_resume_of_a_run_older_than_a_flag_keeps_its_default():
    """A last.pt written before --jsd existed has no 'jsd' in its args: resuming it with the flag's default
    is fine, with --jsd 12 it is refused (it would switch to two views mid-run)."""
    parser = dp.get_parser()
    args = parser.parse_args(["--student", CNN, "--resume", "last.pt"])
    saved = {k: v for k, v in vars(args).items() if k != "jsd"}
    ckpt = dict(kind="delta", optimizer={}, args=saved)
    tt.check_resume(ckpt, args, "delta", "distill_partial.py", 1, parser, "--student")
    args.jsd = 12.0
    with pytest.raises(UserError, match=r"--jsd 12.0 \(the run predates the flag: 0.0\)"):
        tt.check_resume(ckpt, args, "delta", "distill_partial.py", 1, parser, "--student")


def test_calibration_runs_in_eval_mode_and_holdout_is_disjoint():
    student, _ = tiny_student("vit", 2)
    loader = [(images(8, seed=s), torch.zeros(8)) for s in range(2)]
    tau_eval = dp.calibrate_tau(student.eval(), loader, torch.device("cpu"))
    assert dp.calibrate_tau(student.train(), loader, torch.device("cpu")) == tau_eval and not student.training
    rest, held = data.holdout(list(range(50)), 12, seed=3)
    assert len(rest) + len(held) == 50 and not set(rest.indices) & set(held.indices)
    assert held.indices == data.holdout(list(range(50)), 12, seed=3)[1].indices
