"""Generated ImageNet-C against the original scripts: damage per corruption and severity.

The reference numbers below were computed once with Hendrycks' make_imagenet_c.py (224 px) and
make_cifar_c.py (32 px), run unchanged except for the patches today's numpy / scikit-image / scipy need,
on the images of fidelity_images() with numpy seeds 0-3 (see docs/corruption_fidelity.md). Each pair is
(PSNR in dB, mean absolute difference in 0-255 levels) between the clean and the corrupted image, both as
the uint8 the released files hold, averaged over images and seeds.

    python -m pytest -q test_fidelity.py
    python test_fidelity.py          # prints the README's fidelity table
"""
import numpy as np
import pytest

from data import CORRUPTIONS, EXTRA_CORRUPTIONS


# (PSNR dB, mean absolute difference) per severity 1-5 of the original scripts, mean over
# fidelity_images(size) and numpy seeds 0 .. REFERENCE_SEEDS - 1 (frost: FROST_SEEDS, because the
# reference picks one of five very different photographs per image).
REFERENCE = {
    224: {
        "gaussian_noise": ((22.02, 16.10), (18.59, 23.94), (15.31, 35.13), (12.62, 48.40), (10.33, 64.19)),
        "shot_noise": ((20.99, 17.79), (17.39, 27.15), (14.51, 38.22), (11.34, 56.20), (9.63, 69.67)),
        "impulse_noise": ((20.64, 3.80), (17.60, 7.66), (15.84, 11.48), (13.08, 21.68), (11.07, 34.48)),
        "defocus_blur": ((23.06, 13.53), (22.21, 14.96), (21.06, 17.18), (20.38, 18.68), (19.83, 19.99)),
        "glass_blur": ((22.34, 14.47), (22.49, 14.36), (20.12, 18.83), (20.52, 18.09), (20.13, 19.10)),
        "motion_blur": ((22.61, 14.06), (20.90, 17.24), (19.58, 20.21), (18.62, 22.78), (18.10, 24.31)),
        "zoom_blur": ((20.45, 17.78), (19.56, 19.74), (19.34, 20.31), (18.82, 21.63), (18.53, 22.42)),
        "snow": ((14.77, 43.07), (10.64, 70.13), (10.70, 68.95), (9.16, 82.41), (7.86, 97.72)),
        "frost": ((12.38, 60.92), (11.25, 68.32), (10.68, 72.38), (11.19, 68.14), (10.85, 70.52)),
        "fog": ((15.89, 33.43), (14.97, 37.15), (14.20, 40.51), (14.14, 40.71), (13.67, 42.87)),
        "brightness": ((22.10, 18.97), (16.19, 37.21), (13.18, 51.90), (11.40, 62.57), (10.39, 69.05)),
        "contrast": ((19.12, 22.83), (17.78, 26.64), (16.62, 30.45), (15.60, 34.26), (15.13, 36.16)),
        "elastic_transform": ((14.70, 35.79), (13.30, 42.98), (18.46, 22.41), (18.35, 22.68), (18.01, 23.56)),
        "pixelate": ((26.06, 9.14), (25.25, 10.32), (23.92, 11.99), (22.82, 13.67), (22.25, 14.65)),
        "jpeg_compression": ((23.71, 12.74), (23.12, 13.66), (22.75, 14.28), (21.88, 15.84), (21.03, 17.55)),
        "speckle_noise": ((22.19, 14.80), (19.81, 19.56), (15.34, 33.09), (13.49, 41.33), (11.66, 52.08)),
        "gaussian_blur": ((25.77, 9.85), (22.87, 13.86), (21.65, 16.04), (20.89, 17.59), (19.92, 19.82)),
        "spatter": ((32.14, 0.92), (24.12, 4.58), (22.05, 7.81), (18.49, 9.35), (16.33, 15.13)),
        "saturate": ((17.22, 23.66), (15.02, 30.50), (16.18, 27.20), (12.16, 43.56), (11.76, 45.50)),
    },
    32: {
        "gaussian_noise": ((28.01, 8.05), (24.51, 12.05), (22.04, 16.03), (21.04, 18.00), (20.14, 19.96)),
        "shot_noise": ((29.86, 6.38), (26.87, 9.02), (22.94, 14.20), (21.71, 16.39), (20.02, 19.96)),
        "impulse_noise": ((25.62, 1.23), (22.56, 2.49), (20.75, 3.75), (18.37, 6.45), (16.93, 8.95)),
        "defocus_blur": ((37.50, 2.62), (29.70, 6.44), (26.32, 9.51), (23.39, 13.31), (21.64, 16.31)),
        "glass_blur": ((19.12, 16.95), (19.24, 17.03), (20.10, 16.68), (16.89, 24.90), (17.62, 23.60)),
        "motion_blur": ((24.85, 10.90), (22.07, 15.19), (20.57, 18.21), (20.57, 18.21), (19.59, 20.56)),
        "zoom_blur": ((23.46, 12.38), (21.94, 14.79), (20.80, 16.97), (19.82, 19.09), (19.09, 20.88)),
        "snow": ((25.41, 11.21), (19.06, 25.44), (18.12, 27.08), (15.36, 39.53), (12.94, 54.46)),
        "frost": ((18.12, 31.69), (14.67, 46.97), (14.05, 50.25), (15.08, 44.49), (15.63, 41.21)),
        "fog": ((27.26, 9.00), (21.25, 17.99), (18.99, 23.34), (17.47, 27.80), (15.76, 33.82)),
        "brightness": ((28.34, 9.24), (22.08, 18.95), (18.57, 28.27), (16.21, 36.91), (13.26, 51.08)),
        "contrast": ((26.83, 9.41), (20.81, 18.81), (19.23, 22.56), (17.89, 26.32), (16.21, 31.96)),
        "elastic_transform": ((16.42, 28.70), (17.01, 26.71), (17.75, 24.48), (18.28, 22.98), (19.46, 19.88)),
        "pixelate": ((31.10, 2.58), (26.79, 5.79), (26.04, 6.81), (24.48, 9.81), (22.53, 13.80)),
        "jpeg_compression": ((22.94, 13.97), (21.69, 16.28), (21.38, 16.85), (21.07, 17.51), (20.75, 18.23)),
        "speckle_noise": ((29.64, 6.29), (25.27, 10.43), (23.73, 12.48), (21.31, 16.53), (19.47, 20.50)),
        "gaussian_blur": ((37.84, 2.51), (26.56, 9.26), (24.75, 11.43), (23.62, 13.04), (22.21, 15.41)),
        "spatter": ((30.50, 1.03), (25.95, 2.81), (22.65, 6.84), (23.67, 2.99), (21.06, 5.19)),
        "saturate": ((17.12, 23.96), (14.92, 30.89), (20.61, 16.15), (14.70, 32.87), (12.72, 41.38)),
    },
}
REFERENCE_SEEDS = {224: 4, 32: 16}
FROST_SEEDS = {224: 48, 32: 64}
MAX_DPSNR = 1.0  # dB, at every severity
MAX_MAD_RATIO = 0.10  # mean absolute difference within 10%
CLEAR_DROP = 0.3  # dB: where the original loses this much from one severity to the next, so must we
A_SUM, B_SUM = 113737471, 2446163  # pixel sums of fidelity_images(224) and (32)


def fidelity_images(size, n=6):
    """n fixed uint8 colour images [n, size, size, 3]: 1/f colour texture (the spectrum of natural
    photographs) under flat-coloured shapes with sharp edges. Only numpy's frozen legacy RandomState,
    so the original scripts' environment builds the same images."""
    images = []
    for k in range(n):
        rs = np.random.RandomState(1000 + k)
        f = np.fft.fftfreq(size)
        radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
        radius[0, 0] = 1.0
        field = np.fft.ifft2(np.fft.fft2(rs.standard_normal((3, size, size))) / radius ** 1.1).real
        field /= field.std(axis=(1, 2), keepdims=True)
        mix = 0.6 * np.eye(3) + 0.4 * rs.uniform(0, 1, (3, 3))  # correlated channels, like photographs
        img = np.einsum("cd,dhw->hwc", mix, field)
        img = 0.5 + 0.18 * img / img.std() + rs.uniform(-0.15, 0.15, 3)
        yy, xx = np.mgrid[0:size, 0:size] / size
        for _ in range(2 + k % 3):  # shapes with sharp edges
            cy, cx, r = rs.uniform(0.2, 0.8), rs.uniform(0.2, 0.8), rs.uniform(0.08, 0.25)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2 if rs.uniform() < 0.5 else \
                (abs(yy - cy) < r) & (abs(xx - cx) < r * rs.uniform(0.4, 1.0))
            img[inside] = 0.7 * rs.uniform(0, 1, 3) + 0.3 * img[inside]
        images.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    return np.stack(images)


def damage(name, size, severities=range(1, 6), seeds=range(4), frost_dir=None):
    """[(PSNR dB, mean absolute difference)] per severity of data.corrupt on fidelity_images(size), as uint8."""
    import torch
    from data import corrupt
    clean = torch.from_numpy(fidelity_images(size)).permute(0, 3, 1, 2)
    x = clean.float() / 255
    rows = []
    for severity in severities:
        psnr, mad = [], []
        for seed in seeds:
            out = torch.floor(corrupt(x, name, severity, seed=seed, frost_dir=frost_dir) * 255)  # np.uint8 truncates
            d = out.double() - clean.double()
            psnr.append(10 * torch.log10(255 ** 2 / d.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)))
            mad.append(d.abs().mean(dim=(1, 2, 3)))
        rows.append((torch.cat(psnr).mean().item(), torch.cat(mad).mean().item()))
    return rows


def seeds_for(name, size):
    return range(FROST_SEEDS[size] if name == "frost" else REFERENCE_SEEDS[size])


def comparison(name, size, frost_dir=None):
    """[(dPSNR, mad ratio)] per severity: ours minus / over the original's."""
    ours = damage(name, size, seeds=seeds_for(name, size), frost_dir=frost_dir)
    return [(o[0] - r[0], o[1] / r[1]) for o, r in zip(ours, REFERENCE[size][name])], ours


@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("name", CORRUPTIONS + EXTRA_CORRUPTIONS)
def test_damage_matches_the_original_scripts(name, size):
    diffs, ours = comparison(name, size)
    for severity, (dpsnr, ratio) in enumerate(diffs, 1):
        assert abs(dpsnr) <= MAX_DPSNR, (name, size, severity, dpsnr)
        assert abs(ratio - 1) <= MAX_MAD_RATIO, (name, size, severity, ratio)
    ref = REFERENCE[size][name]
    for s in range(4):  # monotone where the original clearly is
        if ref[s][0] - ref[s + 1][0] > CLEAR_DROP:
            assert ours[s + 1][0] < ours[s][0], (name, size, s + 2, ours[s][0], ours[s + 1][0])


def test_fidelity_images_are_fixed():
    """The reference numbers belong to these exact images: a changed generator must fail loudly."""
    a, b = fidelity_images(224), fidelity_images(32)
    assert a.shape == (6, 224, 224, 3) and b.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    assert int(a.astype(np.int64).sum()) == A_SUM and int(b.astype(np.int64).sum()) == B_SUM


def markdown_table(frost_dir=None):
    """The README's fidelity table: dPSNR (ours - original) per corruption and severity."""
    lines = ["| corruption | 224 px: dPSNR at severity 1 / 2 / 3 / 4 / 5 (dB) | 32 px: same |", "|---|---|---|"]
    for name in CORRUPTIONS + EXTRA_CORRUPTIONS:
        cells = [" / ".join(f"{d:+.2f}" for d, _ in comparison(name, size)[0]) for size in (224, 32)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    if frost_dir:
        cells = [" / ".join(f"{d:+.2f}" for d, _ in comparison("frost", size, frost_dir)[0]) for size in (224, 32)]
        lines.append(f"| frost, photographs (--frost-dir) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    print(markdown_table(sys.argv[1] if len(sys.argv) > 1 else None))
