"""Tests for the FTP optimizer (Fast Trainable Projection, Tian et al., NeurIPS 2023).

Run: python -m pytest -q test_ftp.py
"""
import copy
import math

import pytest
import torch
from torch import nn

from distill_partial import FTP

B1, B2, EPS = 0.9, 0.999, 1e-8  # defaults of both the base AdamW and the radius Adam


def _toy_data(steps, seed=0):
    """Per-step batches of a regression whose optimum is far from any small init."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 4, generator=g) for _ in range(steps)]
    a = torch.randn(4, 2, generator=g) * 3
    return [(x, x @ a + 2.0) for x in xs]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _groups(model, head_wd=0.0):
    return [{"params": model[0].parameters()},
            {"params": model[2].parameters(), "project": False, "weight_decay": head_wd}]


def _train(model, opt, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _row_l1(t):
    return t.abs().reshape(t.shape[0], -1).sum(1) if t.dim() >= 2 else t.abs().sum().reshape(1)


def test_projection_bound_and_free_head_equals_adamw():
    model = _model()
    head0 = [p.detach().clone() for p in model[2].parameters()]
    opt = FTP(_groups(model, head_wd=0.05), lr=1e-2)
    ref_params = [p.clone().requires_grad_(True) for p in head0]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.05)
    for x, y in _toy_data(30):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for rp, p in zip(ref_params, model[2].parameters()):  # replay the head's grads
            rp.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p in model[0].parameters():
        st = opt.state[p]
        dev = _row_l1(p.detach() - st["anchor"])
        assert st["radius"].item() > 1e-4  # the radius did learn something
        assert (dev <= st["radius"] + 1e-6).all()
        assert torch.isclose(dev.max(), st["radius"], atol=1e-6)  # the ball is active, not slack
        assert not torch.equal(p.detach(), st["anchor"])
    for p, rp, p0 in zip(model[2].parameters(), ref_params, head0):
        assert "anchor" not in opt.state[p] and "radius" not in opt.state[p]
        assert torch.allclose(p.detach(), rp.detach(), atol=1e-6)
        assert (p.detach() - p0).abs().max() > 0.1  # moved far: no ball around the head


def test_radius_grows_and_loss_decreases():
    torch.manual_seed(1)
    lin = nn.Linear(4, 2)  # every weight projected: only a growing radius lets the loss fall
    opt = FTP(lin.parameters(), lr=1e-2)
    losses, radii = [], []
    for x, y in _toy_data(60, seed=1):
        opt.zero_grad()
        loss = nn.functional.mse_loss(lin(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        radii.append(opt.state[lin.weight]["radius"].item())
    assert radii[0] == pytest.approx(1e-8)
    assert radii[-1] > 0.1 and radii[-1] > radii[10] > radii[1]
    assert opt.state[lin.bias]["radius"].item() > 0.1
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_state_dict_round_trip_is_exact(tmp_path):
    n = 8
    batches = _toy_data(2 * n, seed=2)
    full = _model(seed=3)
    first = copy.deepcopy(full)
    opt_full = FTP(_groups(full), lr=1e-2)
    _train(full, opt_full, batches)

    opt_first = FTP(_groups(first), lr=1e-2)
    _train(first, opt_first, batches[:n])
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed = _model(seed=99)  # different init: its fresh anchor is wrong until the load
    resumed.load_state_dict(ck["model"])
    opt_resumed = FTP(_groups(resumed), lr=1e-2)
    opt_resumed.load_state_dict(ck["opt"])
    st = opt_resumed.state[resumed[0].weight]
    for key in ("anchor", "radius", "radius_exp_avg", "radius_exp_avg_sq", "radius_step",
                "prev_c", "prev_n", "step", "exp_avg", "exp_avg_sq"):
        assert torch.is_tensor(st[key]), key

    _train(first, opt_first, batches[n:])
    _train(resumed, opt_resumed, batches[n:])
    for a, b, c in zip(full.parameters(), first.parameters(), resumed.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(opt_full.state[full[0].weight]["radius"], st["radius"])


# Hand-picked 2x3 gradients: row 0 has a zero entry (row norms differ), and at step 2 row 0 flips
# sign (it stays inside the ball) while row 1 keeps pushing away from W0 (g_r < 0, radius grows).
G1 = torch.tensor([[0.5, -0.2, 0.0], [1.0, -2.0, 3.0]])
G2 = torch.tensor([[-0.5, 0.2, 0.0], [1.5, -1.0, 2.0]])
W0 = torch.tensor([[0.3, -1.2, 0.7], [2.0, 0.1, -0.4]])


def _steps(grads, lr, k=1.0):
    w = nn.Parameter(W0.clone())
    opt = FTP([w], lr=lr, k=k)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w, opt.state[w]


@pytest.mark.parametrize("lr", [1e-2, 1e-3])  # 1e-3: the radius hits its max(n_prev) clip
def test_first_two_steps_match_hand_computation(lr):
    w0, g1, g2 = W0.double(), G1.double(), G2.double()
    # Step 1: AdamW's first update is -lr * g / (|g| + eps); radius starts at 1e-8.
    c1 = -lr * g1 / (g1.abs() + EPS)
    n1 = c1.abs().sum(1, keepdim=True)
    w1 = w0 + (1e-8 / n1).clamp(0, 1) * c1
    # Step 2: radius hyper-gradient and one bias-corrected Adam step (m_hat = g, v_hat = g^2).
    g_r = (g2 * c1 / n1).sum().item()
    assert g_r < 0
    m, v = (1 - B1) * g_r, (1 - B2) * g_r ** 2
    r2 = 1e-8 - 1e-2 * (m / (1 - B1)) / (math.sqrt(v / (1 - B2)) + EPS)
    r2 = min(max(r2, 1e-8), n1.max().item())
    m2 = B1 * (1 - B1) * g1 + (1 - B1) * g2
    v2 = B2 * (1 - B2) * g1 ** 2 + (1 - B2) * g2 ** 2
    w2_free = w1 - lr * (m2 / (1 - B1 ** 2)) / ((v2 / (1 - B2 ** 2)).sqrt() + EPS)
    c2 = w2_free - w0
    n2 = c2.abs().sum(1, keepdim=True)
    w2 = w0 + (r2 / n2).clamp(0, 1) * c2
    assert n2[0].item() < r2 < n2[1].item() or lr == 1e-3  # lr 1e-2: row 0 free, row 1 projected

    w, st = _steps([G1], lr)
    assert st["radius"].item() == pytest.approx(1e-8)
    assert torch.allclose(w.detach().double(), w1, atol=1e-6, rtol=0)
    w, st = _steps([G1, G2], lr)
    assert st["radius"].item() == pytest.approx(r2, abs=1e-6)
    if lr == 1e-3:
        assert r2 == pytest.approx(n1.max().item())
    assert torch.allclose(w.detach().double(), w2, atol=1e-6, rtol=0)
    assert torch.allclose(st["prev_n"].double(), n2, atol=1e-6, rtol=0)


def test_k_scales_positive_hypergradient_only():
    # Steps 1-2 push away from W0 (g_r < 0 at step 2: k must not matter), step 3 pulls back
    # (g_r > 0: k multiplies it inside the radius Adam).
    grads = [G1, G1, -3 * G1]
    _, st1 = _steps(grads[:2], 1e-2, k=1.0)
    _, st3 = _steps(grads[:2], 1e-2, k=3.0)
    assert st1["radius"].item() > 1e-3
    assert torch.equal(st1["radius"], st3["radius"])
    g_r = (grads[2] * st1["prev_c"] / st1["prev_n"]).sum().item()
    assert g_r > 0
    radii = {}
    for k in (1.0, 3.0):
        # One radius Adam step by hand from the state after step 2 (radius step 1 -> 2).
        m = B1 * st1["radius_exp_avg"].item() + (1 - B1) * k * g_r
        v = B2 * st1["radius_exp_avg_sq"].item() + (1 - B2) * (k * g_r) ** 2
        r = st1["radius"].item() - 1e-2 * (m / (1 - B1 ** 2)) / (math.sqrt(v / (1 - B2 ** 2)) + EPS)
        r = min(max(r, 1e-8), st1["prev_n"].max().item())
        _, st = _steps(grads, 1e-2, k=k)
        assert st["radius"].item() == pytest.approx(r, abs=1e-7)
        assert st["radius_exp_avg"].item() == pytest.approx(m, rel=1e-5)
        radii[k] = st["radius"].item()
    assert radii[3.0] < radii[1.0] - 1e-4  # the scaled positive hyper-gradient shrinks r more


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_resume_keeps_the_fp32_radius_with_other_parameter_dtypes(dtype):
    batches = [(x.to(dtype), y.to(dtype)) for x, y in _toy_data(8, seed=4)]
    full, first = _model(seed=5).to(dtype), _model(seed=5).to(dtype)
    opt_full, opt_first = FTP(_groups(full), lr=1e-2), FTP(_groups(first), lr=1e-2)
    _train(full, opt_full, batches)
    _train(first, opt_first, batches[:4])
    resumed = copy.deepcopy(first)
    opt_resumed = FTP(_groups(resumed), lr=1e-2)
    opt_resumed.load_state_dict(copy.deepcopy(opt_first.state_dict()))
    st = opt_resumed.state[resumed[0].weight]
    assert st["radius"].dtype == torch.float32 and st["radius_exp_avg_sq"].dtype == torch.float32
    assert torch.equal(st["radius"], opt_first.state[first[0].weight]["radius"])
    _train(resumed, opt_resumed, batches[4:])
    for a, c in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, c)


def test_weight_decay_reaches_the_step():
    """build_optimizer passes --weight-decay to FTP: with a zero gradient only the decay moves a free tensor."""
    from distill_partial import build_optimizer
    import distill_partial as dp
    student = dp.BranchStudent(_cnn(), {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}, 1)
    opt = build_optimizer(student, "ftp", 1e-2, 0.5, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.5]
    w = student.head_robust.weight
    before = w.detach().clone()
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(w, before * (1 - 1e-2 * 0.5))


def _cnn():
    import train_teacher
    torch.manual_seed(0)
    return train_teacher.create_model("resnet18", 3, model_kwargs=dict(layers=[1, 1, 1, 1], channels=[4, 8, 8, 8]))
