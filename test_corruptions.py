"""Tests for the batched ImageNet-C corruptions (CPU, generated images, fixed seeds).

    python -m pytest -q test_corruptions.py
"""
import colorsys
import io
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from data import CORRUPTION_FNS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt, measure_corruption_throughput

ALL = CORRUPTIONS + EXTRA_CORRUPTIONS
# no random draw at all: the seed must not matter and each image is corrupted on its own
DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                 "gaussian_blur", "saturate")
RANDOM = tuple(n for n in ALL if n not in DETERMINISTIC)
# jpeg_compression and frost go through torchvision.io, which announces its move to TorchCodec
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def natural_images(n, h, w=None, seed=0):
    """Smooth structured colour images: a few oriented sinusoids per channel plus flat rectangles."""
    w = w or h
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    images = []
    for _ in range(n):
        r = torch.rand(9, generator=g)
        img = torch.stack([0.5 + 0.25 * torch.sin(2 * math.pi * 3 * (r[c] * xx + r[c + 3] * yy) + 6 * r[c + 6])
                           for c in range(3)])
        for _ in range(3):
            a = torch.rand(2, generator=g)
            y0, x0 = int(a[0] * h * 0.6), int(a[1] * w * 0.6)
            img[:, y0:y0 + int(h * 0.3), x0:x0 + int(w * 0.3)] = torch.rand(3, 1, 1, generator=g)
        images.append(img)
    return torch.stack(images).clamp(0, 1)


def structural_psnr(out, ref):
    """PSNR (dB, mean over the batch) of out - ref after removing each channel's uniform shift: frost at
    severity 1 (weights 1 * x + 0.3 * frost) mostly brightens, which plain PSNR counts as heavy damage."""
    d = out - ref
    d = d - d.mean(dim=(2, 3), keepdim=True)
    return (10 * torch.log10(1 / d.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10))).mean().item()


def test_names_and_dispatch():
    assert CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                           "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                           "elastic_transform", "pixelate", "jpeg_compression")
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert set(CORRUPTION_FNS) == set(ALL)
    assert all(fn.__name__ == name for name, fn in CORRUPTION_FNS.items())


@pytest.mark.parametrize("name", ALL)
def test_contract(name):
    x = natural_images(3, 32, 40)  # non-square catches H/W mix-ups
    original = x.clone()
    rng_state = torch.get_rng_state()
    for severity in range(1, 6):
        out = corrupt(x, name, severity, seed=1)
        assert torch.equal(x, original), "the input was written into"
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, corrupt(x, name, severity, seed=1))
        other = corrupt(x, name, severity, seed=2)
        if name in RANDOM:
            assert not torch.equal(out, other), f"{name} severity {severity} ignores the seed"
        else:
            assert torch.equal(out, other)
        assert (out - x).abs().max() > 1e-3, f"{name} severity {severity} leaves the image unchanged"
    assert torch.equal(rng_state, torch.get_rng_state()), "the global RNG was used"
    out64 = corrupt(x.double(), name, 3, seed=1)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), corrupt(x, name, 3, seed=1), atol=1e-6, rtol=0)
    out16 = corrupt(x.bfloat16(), name, 3, seed=1)
    assert out16.dtype == torch.bfloat16 and out16.min() >= 0 and out16.max() <= 1
    strided = torch.stack([x, x], -1)[..., 0]  # the same values, not a dense tensor
    torch.testing.assert_close(corrupt(strided, name, 3, seed=1), corrupt(x, name, 3, seed=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_imagenet_size_branch(name):
    """The 224-px (ImageNet-C) constants, non-square, at severity 5."""
    x = natural_images(2, 128, 144)
    out = corrupt(x, name, 5, seed=0)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert structural_psnr(out, x) < 35


# Reference constants that are not monotone in image damage, so only severity 5 vs 1 is checked:
# glass_blur (CIFAR/Tiny severity 1 has almost no pre-blur, so its shuffle shows more than at 2-3),
# spatter (water at 1-3, mud at 4-5), saturate (1-2 desaturate, 3-5 oversaturate).
NOT_MONOTONE = ("glass_blur", "spatter", "saturate")


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", [n for n in ALL if n != "elastic_transform"])
def test_damage_grows_with_severity(name, size):
    x = natural_images(8, size)
    psnr = [structural_psnr(corrupt(x, name, s, seed=3), x) for s in range(1, 6)]
    assert psnr[4] < psnr[0] - 0.3, f"{name} at {size} px: PSNR by severity {psnr}"
    if name not in NOT_MONOTONE:
        assert all(b <= a + 0.3 for a, b in zip(psnr, psnr[1:])), f"{name} at {size} px: {psnr}"


@pytest.mark.parametrize("size", [32, 64])
def test_elastic_local_warp_grows_with_severity(size):
    """Elastic's severity 1 (CIFAR, Tiny) is a pure random affine map; the local, non-affine part of the
    warp then grows with severity. (Plain PSNR is dominated by the affine part, which the reference
    shrinks as severity grows.) Read the warp off an image of its own pixel coordinates."""
    n = 6
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    ramp = torch.stack([xx / (size - 1), yy / (size - 1), torch.full_like(xx, 0.5)])[None].repeat(n, 1, 1, 1)
    m = size // 4  # the centre, where the warp reads inside the image (bilinear reproduces a ramp exactly)
    design = torch.stack([xx[m:-m, m:-m].flatten(), yy[m:-m, m:-m].flatten(), torch.ones((size - 2 * m) ** 2,
                                                                                          dtype=torch.float64)], 1)
    residual = []
    for severity in range(1, 6):
        out = corrupt(ramp, "elastic_transform", severity, seed=0)[:, :2, m:-m, m:-m] * (size - 1)
        src = out.flatten(2).transpose(1, 2)  # [n, pixels, 2]: where each output pixel was read
        fit = torch.linalg.lstsq(design.expand(n, -1, -1), src).solution
        residual.append((design @ fit - src).pow(2).sum(-1).mean().sqrt().item())
        if severity == 1:
            assert (src - design[:, :2]).abs().max() > 0.2, "severity 1 should move the image"
    assert residual[0] < 0.02, residual
    assert all(b > a for a, b in zip(residual, residual[1:])), residual


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_batch_rows_equal_single_images(name):
    x = natural_images(4, 64, 56)
    batch = corrupt(x, name, 5)
    for i in range(len(x)):
        assert torch.equal(batch[i:i + 1], corrupt(x[i:i + 1], name, 5))


@pytest.mark.parametrize("name", RANDOM)
def test_random_draws_differ_per_image(name):
    x = natural_images(1, 32).repeat(2, 1, 1, 1)
    out = corrupt(x, name, 3, seed=0)
    assert not torch.equal(out[0], out[1])


def test_errors():
    x = natural_images(1, 32)
    with pytest.raises(ValueError, match="gaussian_noise.*saturate"):
        corrupt(x, "gaussian", 1)
    for bad in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="1 to 5"):
            corrupt(x, "fog", bad)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        corrupt(x[:, :1], "fog", 1)
    with pytest.raises(ValueError, match="float"):
        corrupt((x * 255).to(torch.uint8), "fog", 1)


def _write_frost_files(folder, value=None):
    """Six small stand-ins for the ImageNet-C frost images, written as the names and formats it ships."""
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")):
        if value is None:
            img = (torch.rand(3, 6, 7, generator=g) * 255).to(torch.uint8)
            img = torch.nn.functional.interpolate(img[None].float(), size=(90 + i, 110), mode="bilinear")[0]
            img = img.round().to(torch.uint8)
        else:
            img = torch.full((3, 90, 110), value, dtype=torch.uint8)
        data = torchvision.io.encode_png(img) if name.endswith(".png") else torchvision.io.encode_jpeg(img, quality=95)
        (folder / name).write_bytes(data.numpy().tobytes())


def test_frost_uses_frost_dir(tmp_path):
    x = natural_images(4, 32)
    _write_frost_files(tmp_path)
    from_files = corrupt(x, "frost", 3, seed=0, frost_dir=str(tmp_path))
    assert not torch.allclose(from_files, corrupt(x, "frost", 3, seed=0))  # procedural
    assert torch.equal(from_files, corrupt(x, "frost", 3, seed=0, frost_dir=str(tmp_path)))
    assert not torch.equal(from_files, corrupt(x, "frost", 3, seed=1, frost_dir=str(tmp_path)))
    assert torch.equal(corrupt(x, "frost", 3, seed=0, frost_dir=str(tmp_path / "missing")),
                       corrupt(x, "frost", 3, seed=0))  # no files there: the documented procedural fallback
    big = corrupt(natural_images(2, 128), "frost", 2, seed=0, frost_dir=str(tmp_path))  # enlarged crops
    assert big.shape == (2, 3, 128, 128)


def test_frost_blend_weights(tmp_path):
    """CIFAR-10-C frost severity 3 is 0.9 * x + 0.4 * frost (make_cifar_c.py)."""
    x = natural_images(3, 32)
    (tmp_path / "black").mkdir()
    (tmp_path / "white").mkdir()
    _write_frost_files(tmp_path / "black", 0)
    _write_frost_files(tmp_path / "white", 255)
    torch.testing.assert_close(corrupt(x, "frost", 3, frost_dir=str(tmp_path / "black")), 0.9 * x,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(corrupt(x, "frost", 3, frost_dir=str(tmp_path / "white")),
                               (0.9 * x + 0.4).clamp(0, 1), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- parity with the reference code

def _to_uint8_hwc(x):
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_jpeg_and_pixelate_match_pil():
    x = natural_images(2, 64)
    x = torch.from_numpy(_to_uint8_hwc(x)).permute(0, 3, 1, 2).float() / 255  # exactly representable in 8 bits
    for severity, quality, ratio in ((1, 65, .9), (5, 25, .5)):  # Tiny ImageNet-C constants (64 px)
        jpeg, pix = [], []
        for img in _to_uint8_hwc(x):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=quality)
            jpeg.append(np.asarray(Image.open(buf)))
            small = Image.fromarray(img).resize((int(64 * ratio),) * 2, Image.BOX)
            pix.append(np.asarray(small.resize((64, 64), Image.BOX)))
        ours = corrupt(x, "jpeg_compression", severity).permute(0, 2, 3, 1).numpy() * 255
        assert np.abs(ours - np.stack(jpeg)).mean() < 0.5  # same libjpeg: identical
        ours = corrupt(x, "pixelate", severity).permute(0, 2, 3, 1).numpy() * 255
        assert np.abs(ours - np.stack(pix)).max() <= 1.001  # PIL rounds to 8 bits between its two passes


def test_jpeg_split_over_threads_is_one_libjpeg_call(monkeypatch):
    """On the CPU the batch is split over torch's threads (uneven pieces here: 5 images, 3 threads): the
    output is what one libjpeg call over the whole batch gives, in order, as a contiguous float tensor."""
    import data
    monkeypatch.setattr(data, "_JPEG_THREAD_PIXELS", 1)
    x = natural_images(5, 224, seed=2)
    u8 = (x * 255).round().to(torch.uint8)
    libjpeg = torch.stack(torchvision.io.decode_jpeg(torchvision.io.encode_jpeg(list(u8), quality=15)))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        ours = corrupt(x, "jpeg_compression", 3)  # ImageNet-C quality 15
    finally:
        torch.set_num_threads(threads)
    assert ours.is_contiguous()
    assert torch.equal((ours * 255).round().to(torch.uint8), libjpeg)


def test_jpeg_emulation_is_libjpeg_pixel_for_pixel():
    """_jpeg_emulate (the non-CPU path) reproduces libjpeg's round trip exactly: MCU padding of odd sizes,
    chroma of at most 2 samples (no fancy upsampling), low and high qualities (tables capped at 255)."""
    from data import _jpeg_emulate
    g = torch.Generator().manual_seed(0)
    for h, w in ((224, 224), (32, 32), (28, 28), (37, 45), (17, 9), (8, 3), (1, 1)):
        x = torch.rand(2, 3, h, w, generator=g)
        x[1] = natural_images(1, h, w)[0]
        for quality in (7, 25, 65, 95):
            u8 = list((x * 255).round().to(torch.uint8))
            libjpeg = torch.stack(torchvision.io.decode_jpeg(torchvision.io.encode_jpeg(u8, quality=quality)))
            ours = (_jpeg_emulate(x, quality) * 255).round().to(torch.uint8)
            assert torch.equal(ours, libjpeg), (h, w, quality)


def test_poisson_draws_invert_the_exact_cdf():
    """data._poisson: each draw is the float64 inverse CDF of Poisson(top * x) at its uniform, for 8-bit
    and in-between x (the latter add a small second Poisson term), and the draws have the right law."""
    from data import _poisson, _rand
    top, n = 60, 200_000
    levels = torch.tensor([0, 1, 17, 128, 255]).repeat_interleave(n // 5)
    x8 = levels / 255
    u = _rand((n,), torch.Generator().manual_seed(3), "cpu")  # _poisson's first draw
    k = torch.arange(200, dtype=torch.float64)
    lam = x8.double()[:, None] * top
    cdf = torch.where(lam > 0, (k * lam.clamp_min(1e-300).log() - lam - torch.lgamma(k + 1)).exp(),
                      (k == 0).double()).cumsum(1)
    exact = (cdf < u.double()[:, None]).sum(1)
    draws = _poisson(x8, top, torch.Generator().manual_seed(3))
    assert (draws.long() != exact).float().mean() < 1e-4  # float32 table vs float64 CDF at ties only
    for value in (17 / 255, 0.3337, 0.9):  # Poisson(60 * value): mean, variance, total variation to the pmf
        draws = _poisson(torch.full((n,), value), top, torch.Generator().manual_seed(4)).long()
        lam = torch.tensor(top * value, dtype=torch.float64)
        pmf = (k * lam.log() - lam - torch.lgamma(k + 1)).exp()
        freq = torch.bincount(draws, minlength=len(k))[:len(k)].double() / n
        assert abs(draws.double().mean() - lam) < 0.05 and abs(draws.double().var() / lam - 1) < 0.02, value
        assert 0.5 * (freq - pmf).abs().sum() < 0.01, value


def test_brightness_and_saturate_match_hsv_round_trip():
    x = natural_images(1, 32)
    x[..., :4, :4] = 0.5  # grey pixels: skimage gives them hue 0, so saturate's offset tints them red
    x[..., 4:6, :4] = 0  # black pixels: brightness makes them grey
    pixels = x[0].permute(1, 2, 0).reshape(-1, 3).double().numpy()
    for name, severity, edit in (("brightness", 4, lambda h, s, v: (h, s, min(v + .2, 1))),
                                 ("saturate", 5, lambda h, s, v: (h, min(s * 2.5 + .2, 1), v))):  # CIFAR constants
        ref = np.array([colorsys.hsv_to_rgb(*edit(*colorsys.rgb_to_hsv(*p))) for p in pixels])
        ours = corrupt(x, name, severity)[0].permute(1, 2, 0).reshape(-1, 3).double().numpy()
        assert np.abs(ours - ref.clip(0, 1)).max() < 1e-5, name


def test_blurs_match_scipy():
    from scipy import ndimage
    x = natural_images(2, 32)
    xn = x.double().numpy()
    ref = np.stack([[ndimage.gaussian_filter(c, 1.0, mode="nearest", truncate=4.0) for c in img] for img in xn])
    torch.testing.assert_close(corrupt(x, "gaussian_blur", 5).double(), torch.from_numpy(ref).clamp(0, 1),
                               atol=1e-5, rtol=0)  # CIFAR severity 5: sigma 1
    zoomed = []
    for img in xn.transpose(0, 2, 3, 1):
        acc = img.copy()
        for z in np.arange(1, 1.26, 0.01):  # CIFAR severity 5 zoom factors; the reference's clipped_zoom
            ch = int(np.ceil(32 / z))
            top = (32 - ch) // 2
            big = ndimage.zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
            trim = (big.shape[0] - 32) // 2
            acc = acc + big[trim:trim + 32, trim:trim + 32]
        zoomed.append(acc / 27)
    torch.testing.assert_close(corrupt(x, "zoom_blur", 5).double(),
                               torch.from_numpy(np.stack(zoomed).transpose(0, 3, 1, 2)).clamp(0, 1), atol=1e-5, rtol=0)


def test_motion_blur_is_imagemagick_kernel():
    """Impulse response of Tiny ImageNet-C motion blur, severity 3 (radius 10, sigma 2) equals ImageMagick's
    MotionBlurImage kernel for some angle in [-45, 45]: taps exp(-i^2 / 8), i = 0..20, normalised, at
    offsets (ceil(i cos a - 0.5), ceil(i sin a - 0.5)) on a one-sided line."""
    x = torch.zeros(4, 3, 64, 64)
    x[:, :, 32, 32] = 1
    out = corrupt(x, "motion_blur", 3, seed=5)[:, 0].double()
    i = torch.arange(21, dtype=torch.float64)
    taps = torch.exp(-i ** 2 / 8)
    taps = taps / taps.sum()
    a = torch.deg2rad(torch.linspace(-45, 45, 9001, dtype=torch.float64))[:, None]
    offsets = torch.stack([torch.ceil(i * torch.sin(a) - 0.5), torch.ceil(i * torch.cos(a) - 0.5)], -1).long()
    patterns = torch.unique(offsets, dim=0)
    matched = []
    for img in out:
        for k, pattern in enumerate(patterns):
            expected = torch.zeros(64, 64, dtype=torch.float64)
            expected.index_put_((32 - pattern[:, 0], 32 - pattern[:, 1]), taps, accumulate=True)
            if (img - expected).abs().max() < 1e-6:
                matched.append(k)
                break
        else:
            pytest.fail("impulse response is not an ImageMagick motion-blur kernel")
    assert len(set(matched)) > 1  # one random angle per image


def test_measure_corruption_throughput():
    speeds = measure_corruption_throughput(32, batch_size=4, repeats=1)
    assert list(speeds) == list(ALL)
    assert all(math.isfinite(v) and v > 0 for v in speeds.values())
    speeds = measure_corruption_throughput(32, images=natural_images(2, 32), repeats=1)  # given images
    assert list(speeds) == list(ALL)
    assert all(math.isfinite(v) and v > 0 for v in speeds.values())


# ----------------------------------------------------------------------------- device independence

# Values the CPU code gives (x = torch.rand with seed 0 / 1, corrupt seed 5 / 9): measured numbers
# depend on them, so CPU outputs must never change by accident. glass_blur, frost (procedural) and
# spatter (water) were re-pinned when they were made as damaging as the original scripts
# (test_fidelity.py), shot_noise when its Poisson draws became table inversions (data._poisson, same
# distribution), the procedural frost when its needles became a scatter of 150 seeds (no FFT), and
# every corruption that draws random numbers when they became a counter-based generator made on the
# device that uses them (data._rand, same distributions).
# (float64 sum of the whole output, four pixels [b, c, y, x])
PIXELS = [(0, 0, 5, 7), (0, 1, 16, 16), (1, 2, 30, 3), (1, 0, 11, 25)]
PINNED_32 = {
    "gaussian_noise": (3055.9065776397474, [0.7269548177719116, 0.9815848469734192, 0.06811153143644333, 0.7184900641441345]),
    "shot_noise": (3054.699998466298, [0.6800000071525574, 1.0, 0.20999999344348907, 1.0]),
    "impulse_noise": (3052.7108722925186, [0.6883496046066284, 0.9921276569366455, 0.16151654720306396, 0.9276339411735535]),
    "defocus_blur": (3059.8143913671374, [0.5043898820877075, 0.8160945177078247, 0.36180564761161804, 0.5713514685630798]),
    "glass_blur": (3031.3410549089313, [0.33786240220069885, 0.8882590532302856, 0.5844348073005676, 0.7261009812355042]),
    "motion_blur": (3062.620281123556, [0.4150756299495697, 0.672521710395813, 0.37359321117401123, 0.5034380555152893]),
    "zoom_blur": (3048.1842270493507, [0.5571966767311096, 0.6804133057594299, 0.524405300617218, 0.5416381359100342]),
    "snow": (3753.9970217607915, [0.8328580260276794, 1.0, 0.2921021580696106, 1.0]),
    "frost": (4140.852026734501, [0.925169825553894, 1.0, 0.2340586930513382, 0.9372522830963135]),
    "fog": (3119.7134919539094, [0.6694108247756958, 0.7579965591430664, 0.2777075469493866, 0.7421773076057434]),
    "brightness": (3550.8310150262405, [0.8171496987342834, 1.0, 0.16698028147220612, 0.9999999403953552]),
    "contrast": (3057.647896170616, [0.5752152800559998, 0.6961371898651123, 0.3727814853191376, 0.6631823182106018]),
    "elastic_transform": (3052.8697210112587, [0.43739598989486694, 0.780978798866272, 0.6713747978210449, 0.23568472266197205]),
    "pixelate": (3057.647900402546, [0.6883496046066284, 0.678451657295227, 0.41355395317077637, 0.9276339411735535]),
    "jpeg_compression": (3060.7255665399134, [0.8274509906768799, 0.8196078538894653, 0.4941176474094391, 0.5882353186607361]),
    "speckle_noise": (3040.941813165722, [0.72821044921875, 0.9764379262924194, 0.13888686895370483, 0.6366205215454102]),
    "gaussian_blur": (3057.5209864899516, [0.47971147298812866, 0.7646911144256592, 0.3972976803779602, 0.5153355002403259]),
    "spatter": (3248.660508289933, [0.6883496046066284, 0.9921276569366455, 0.16151654720306396, 0.9276339411735535]),
    "saturate": (2634.1233841255307, [0.6317001581192017, 0.9921276569366455, 0.0, 0.9276339411735535]),
}
PINNED_224 = {
    "gaussian_noise": (75485.88178626262, [0.8459072113037109, 0.4163622260093689, 1.0, 0.7679411172866821]),
    "shot_noise": (69475.40097652376, [0.20000000298023224, 0.800000011920929, 0.6000000238418579, 1.0]),
    "impulse_noise": (75195.75946569443, [0.0, 0.5145577788352966, 0.8762259483337402, 0.9164770245552063]),
    "glass_blur": (74895.21465268731, [0.5127536654472351, 0.4838264286518097, 0.5019630789756775, 0.49654218554496765]),
    "motion_blur": (75194.68303327262, [0.5199638605117798, 0.5512039065361023, 0.5670275688171387, 0.41587528586387634]),
    "snow": (121190.22409899533, [0.8172802329063416, 0.741692066192627, 1.0, 1.0]),
    "frost": (125604.82739755511, [0.9095972776412964, 0.886484682559967, 1.0, 1.0]),
    "fog": (75923.39051508904, [0.31826213002204895, 0.28725671768188477, 0.43807512521743774, 0.4643343389034271]),
    "elastic_transform": (75161.8663202268, [0.3411966860294342, 0.3528440296649933, 0.7811243534088135, 0.9339073300361633]),
    "spatter": (70324.12628053129, [0.5977752804756165, 0.23394426703453064, 0.8762259483337402, 0.9164770245552063]),
    "speckle_noise": (71078.05805930035, [0.8544953465461731, 0.42710667848587036, 1.0, 0.6808677911758423]),
}


def test_cpu_outputs_are_pinned():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x224 = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    for table, images, severity, seed, batch0 in ((PINNED_32, x, 3, 5, False), (PINNED_224, x224, 4, 9, True)):
        for name, (total, values) in table.items():
            y = corrupt(images, name, severity, seed=seed)
            got = [y[(0,) + i[1:] if batch0 else i].item() for i in PIXELS]
            # float round-off of another CPU's BLAS at most; a changed random draw moves these by >1e-3
            assert got == pytest.approx(values, abs=2e-6), name
            assert y.double().sum().item() == pytest.approx(total, rel=1e-6), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ALL)
def test_cuda_gives_the_cpu_image(name):
    """Same (seed, corruption, severity, image) -> the same corrupted image on CPU and CUDA, up to float
    round-off (random numbers from a keyed integer hash, bit-identical on every device)."""
    for size in (32, 224):
        x = natural_images(2, size, seed=4)
        for severity in (1, 3, 5):
            cpu = corrupt(x, name, severity, seed=3)
            gpu = corrupt(x.cuda(), name, severity, seed=3)
            assert gpu.device.type == "cuda"
            diff = (gpu.cpu() - cpu).abs()
            # thresholds (salt/pepper, snow flakes, glass-blur uint8 floor, JPEG) may flip a rare pixel
            assert diff.mean() < 2e-3 and (diff > 1e-3).float().mean() < 0.01, (name, size, severity, diff.max())


def test_rand_many_draws_what_rand_draws_in_turn():
    """data._rand_many: the numbers of one _rand call per shape, in order (small draws made together)."""
    from data import UserError, _rand, _rand_many
    shapes = [(2, 3), (5,), (1 << 15,), (4, 1, 1), (3, 300), (1,)]  # one of them large enough to go alone
    many = _rand_many(shapes, torch.Generator().manual_seed(3), "cpu")
    gen = torch.Generator().manual_seed(3)
    for got, shape in zip(many, shapes, strict=True):
        assert got.shape == shape and torch.equal(got, _rand(shape, gen, "cpu"))
    with pytest.raises(UserError, match="at most 2\\^31"):  # int32 counters: refused before any work
        _rand_many([(2, 1 << 30)], gen, "cpu")


@pytest.mark.parametrize("delta", [1, 2, 3])
def test_glass_blur_copies_compose_the_reference_sweep(delta):
    """_follow_copies gives the very map of the reference's sequential loop (bottom-right to top-left;
    x[h, w] takes the value its neighbour holds at that moment), for offsets drawn as glass_blur does."""
    from data import _follow_copies, _sweep_order
    h, w = 11, 13
    pos, visit = _sweep_order(h, w, delta)
    off = torch.randint(-delta, delta, (len(pos), 2), generator=torch.Generator().manual_seed(delta))
    src = torch.arange(h * w)
    src[pos] = pos + off[:, 1] * w + off[:, 0]
    loop = list(range(h * w))
    for r in range(h - delta, delta, -1):
        for q in range(w - delta, delta, -1):
            loop[r * w + q] = loop[int(src[r * w + q])]
    assert _follow_copies(src, visit).tolist() == loop
    swept = sorted(r * w + q for r in range(h - delta, delta, -1) for q in range(w - delta, delta, -1))
    assert sorted(pos.tolist()) == swept  # every pixel of the sweep, once


def test_counter_generator_is_the_hash_it_names():
    """data._rand is lowbias32 of a keyed Weyl step, as written out here in numpy's wrapping uint32 (also
    across the pieces the CPU makes them in); its uniforms and normals have the right moments, and two draws
    from one generator are unrelated."""
    from data import _RAND_CHUNK, _rand, _randn
    gen = torch.Generator().manual_seed(11)
    k1, k2 = (np.int64(k) % (1 << 32) for k in torch.randint(-(1 << 31), 1 << 31, (2,), generator=gen).tolist())
    n = 2 * _RAND_CHUNK * torch.get_num_threads() + 1000  # three pieces
    x = np.arange(n, dtype=np.uint32) * np.uint32(0x9E3779B1) + np.uint32(k1)
    x ^= x >> 16
    x = (x * np.uint32(0x7FEB352D)) ^ np.uint32(k2)
    x ^= x >> 15
    x *= np.uint32(0x846CA68B)
    x ^= x >> 16
    want = ((x >> 9).astype(np.float64) + 0.5) / 2 ** 23
    u = _rand((10, 100), torch.Generator().manual_seed(11), "cpu")
    assert u.shape == (10, 100) and np.array_equal(u.flatten().double().numpy(), want[:1000])
    assert np.array_equal(_rand((n,), torch.Generator().manual_seed(11), "cpu").double().numpy(), want)
    gen = torch.Generator().manual_seed(0)
    u, v, z = _rand((1 << 20,), gen, "cpu"), _rand((1 << 20,), gen, "cpu"), _randn(((1 << 20) + 1,), gen, "cpu")
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 2e-3 and abs(u.var() * 12 - 1) < 1e-2
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1]) < 5e-3          # another key: another stream
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 5e-3  # neighbours unrelated
    assert z.shape == ((1 << 20) + 1,) and abs(z.mean()) < 5e-3 and abs(z.var() - 1) < 1e-2
    assert abs((z ** 4).mean() - 3) < 0.05   # Gaussian tails, not just two moments
