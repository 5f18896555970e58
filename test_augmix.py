"""The batched AugMix of --aug-device cuda (data.augmix_batch) against torchvision's v2.AugMix, on the CPU
(the same code runs on CUDA; a CUDA test checks it draws the same choices there).

    HF_HUB_OFFLINE=1 python -m pytest -q test_augmix.py
"""
import math

import pytest
import torch
from torchvision.transforms import v2

import data

TV = v2.AugMix(all_ops=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def colour_images(n, h=32, w=40, seed=0):
    """uint8 [n, 3, h, w]: oriented sinusoids per channel and a flat rectangle (edges, gradients, flat areas)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    images = []
    for _ in range(n):
        r = torch.rand(10, generator=g)
        img = torch.stack([0.5 + 0.4 * torch.sin(2 * math.pi * (1 + 2 * r[c]) * (r[c + 3] * xx + yy) + 6 * r[c + 6])
                           for c in range(3)]) * (0.5 + 0.5 * r[9])
        y0, x0 = int(r[0] * h / 2), int(r[1] * w / 2)
        img[:, y0:y0 + h // 3, x0:x0 + w // 3] = torch.rand(3, 1, 1, generator=g)
        images.append(img)
    return (torch.stack(images).clamp(0, 1) * 255).round().to(torch.uint8)


def torchvision_op(images, name, magnitude):
    return torch.stack([TV._apply_image_or_video_transform(im, name, magnitude, interpolation=TV.interpolation,
                                                           fill=TV._fill) for im in images])


def test_op_set_and_magnitudes_are_torchvisions():
    assert data.AUGMIX_ALL_OPS == tuple(v2.AugMix._AUGMENTATION_SPACE)
    assert data.AUGMIX_OPS == tuple(v2.AugMix._PARTIAL_AUGMENTATION_SPACE)
    for name, (fn, signed) in v2.AugMix._AUGMENTATION_SPACE.items():
        ours, our_signed = data.augmix_magnitudes(name, 32, 40)
        want = fn(10, 32, 40)
        assert our_signed == signed, name
        if want is None:
            assert not ours.any(), name
        else:
            torch.testing.assert_close(ours.float(), want.float(), msg=name)


@pytest.mark.parametrize("name", data.AUGMIX_ALL_OPS)
def test_each_op_matches_torchvision(name):
    """Per op at the largest magnitude of severity 3 (both signs): the pixel change has torchvision's mean
    and std, and the images agree to the uint8 rounding torchvision does after each op."""
    x = colour_images(8)
    table, signed = data.augmix_magnitudes(name, 32, 40)
    for magnitude in ([table[2].item(), -table[2].item()] if signed else [table[2].item()]):
        want = torchvision_op(x, name, magnitude).float() / 255
        got = data.augmix_op(x.float() / 255, name, torch.full((8,), magnitude))
        d_want, d_got = want - x / 255, got - x / 255
        assert abs(d_got.mean() - d_want.mean()) < 1.5 / 255, (name, magnitude)
        assert abs(d_got.std() - d_want.std()) < 1.5 / 255, (name, magnitude)
        assert (got - want).abs().mean() < 1 / 255, (name, magnitude)
        if name not in ("AutoContrast", "Equalize"):   # these two are idempotent-ish but not identity
            assert d_want.abs().mean() > 1e-3 or name == "Posterize"   # the op does something here


@pytest.mark.parametrize("all_ops,severity", [(False, 1), (True, 3)])
def test_augmix_statistics_match_torchvision(all_ops, severity):
    """Whole AugMix, 512 images: the pixel change (mean |d|, std d) within 12% of torchvision's; the gap
    between severities 1 and 3 (~2x) shows a wrong magnitude table or severity at once."""
    x = colour_images(512, seed=1)
    torch.manual_seed(0)
    t = v2.AugMix(severity=severity, all_ops=all_ops)
    want = torch.stack([t(im) for im in x]).float() - x.float()
    got = data.augmix_batch(x, severity=severity, all_ops=all_ops,
                            generator=torch.Generator().manual_seed(0)).float() - x.float()
    assert got.abs().mean().item() == pytest.approx(want.abs().mean().item(), rel=0.12)
    assert got.std().item() == pytest.approx(want.std().item(), rel=0.12)
    assert got.mean().item() == pytest.approx(want.mean().item(), abs=0.05 * want.std().item())


def test_contract_uint8_and_float():
    x = colour_images(16, 32, 32)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    rng = torch.get_rng_state()
    out8 = data.augmix_batch(x, generator=gen())
    assert torch.equal(torch.get_rng_state(), rng)   # an explicit generator leaves the global one alone
    assert out8.dtype == torch.uint8 and out8.shape == x.shape
    assert torch.equal(out8, data.augmix_batch(x, generator=gen()))   # deterministic given the generator
    outf = data.augmix_batch(x.float() / 255, generator=gen())
    assert outf.dtype == torch.float32 and outf.shape == x.shape and 0 <= outf.min() and outf.max() <= 1
    assert (outf * 255 - out8.float()).abs().max() < 1.01   # the same choices; uint8 truncates at the end
    assert (outf - x / 255).abs().mean() > 0.01   # it changes the images...
    changed = (out8.float() - x.float()).abs().mean(dim=(1, 2, 3))
    assert changed.std() > 0.1 * changed.mean()   # ...each its own way


def test_device_views_make_the_aug_views_on_the_device():
    """--aug-device cuda: the loader gives clean crops only; device_views appends n_aug AugMix views."""
    clean = colour_images(4).float() / 255
    views, batch_aug = data.augmix_views(lambda img: img, 2, "cuda")
    assert views.n_aug == 0 and isinstance(batch_aug, data.BatchAugMix)
    torch.manual_seed(0)
    x = data.device_views(clean, torch.device("cpu"), batch_aug, 2)
    assert x.shape == (12, 3, 32, 40) and torch.equal(x[:4], clean)
    assert not torch.equal(x[4:8], x[8:]) and not torch.equal(x[4:8], clean)   # two independent AugMix views
    views, batch_aug = data.augmix_views(lambda img: img, 1, "cpu")
    assert views.n_aug == 1 and batch_aug is None
    assert torch.equal(data.device_views((clean, clean + 1), torch.device("cpu")), torch.cat([clean, clean + 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_makes_the_cpu_choices():
    x = colour_images(64, 64, 64)
    for all_ops in (False, True):
        cpu = data.augmix_batch(x.float() / 255, all_ops=all_ops, generator=torch.Generator().manual_seed(1))
        gpu = data.augmix_batch(x.cuda().float() / 255, all_ops=all_ops, generator=torch.Generator().manual_seed(1))
        assert gpu.device.type == "cuda"
        diff = (gpu.cpu() - cpu).abs()
        assert diff.mean() < 1e-3 and (diff > 2 / 255).float().mean() < 0.01   # thresholds may flip a rare pixel


def test_bench_mfu_peaks():
    """bench.py reports MFU only against a known dense bf16 peak; unknown cards (and H100 PCIe/NVL) get none."""
    import bench
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") is None and bench.peak_tflops("Tesla T4") is None


def test_bench_ks_names_the_flag():
    """bench.py --ks takes 'all' or a K the student has; anything else stops before any timing."""
    import bench
    with pytest.raises(SystemExit) as e:
        bench.main(["--sections", "train", "--student", "vit_tiny_patch16_224", "--model-kwargs", "depth=2",
                    "--ks", "1,2"])
    assert "--ks 1,2" in str(e.value) and "1..1" in str(e.value)


def test_bench_compile_takes_torch_compile_modes():
    """bench.py --compile alone is torch.compile's default mode (as the training scripts compile); a mode may
    follow it (reduce-overhead: CUDA graphs); anything else stops at parsing, naming the flag."""
    import bench
    parse = bench.get_parser().parse_args
    assert parse(["--compile", "--sections", "train"]).compile == "default"
    assert parse(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parse([]).compile is None
    with pytest.raises(SystemExit):
        parse(["--compile", "fast"])


def test_bench_profile_writes_op_tables(tmp_path):
    """bench.py --profile DIR writes where the time of a timed train step (one K in this process, as
    bench_train runs each K) and of the batched AugMix goes: torch.profiler op tables."""
    import bench
    bench.main(["--sections", "train", "--student", "vit_tiny_patch16_224", "--model-kwargs", "depth=2", "img_size=32",
                "--num-classes", "10", "-b", "2", "--steps", "1", "--warmup", "0", "--tune-last", "1",
                "--profile", str(tmp_path)])
    result = bench.bench_augmix(torch.device("cpu"), 2, 1, str(tmp_path))
    assert result["batched_cpu_224px"] > 0 and result["batched_cpu_224px_synced"] > 0
    for name in ("train_k1.txt", "augmix_32px.txt", "augmix_224px.txt"):
        table = (tmp_path / name).read_text()
        assert table.startswith("3 calls") and "aten::" in table, name


def test_magnitude_tables_follow_height_and_width(monkeypatch):
    """TranslateX's range is a third of the width, TranslateY's of the height: the tables are built for
    (H, W) of the batch in that order, which a square image cannot tell apart."""
    calls, tables = [], data._augmix_tables
    monkeypatch.setattr(data, "_augmix_tables", lambda names, h, w: (calls.append((h, w)), tables(names, h, w))[1])
    data.augmix_batch(torch.zeros(2, 3, 16, 48, dtype=torch.uint8), generator=torch.Generator().manual_seed(0))
    assert calls == [(16, 48)]
    x_range = data.augmix_magnitudes("TranslateX", 16, 48)[0].max().item()
    y_range = data.augmix_magnitudes("TranslateY", 16, 48)[0].max().item()
    assert x_range == pytest.approx(48 / 3, abs=0.5) and y_range == pytest.approx(16 / 3, abs=0.5)
