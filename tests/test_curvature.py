"""Curvature estimators against independent float64 references (full Hessians from ``torch.func``), the profiling
loop's guarantees (exact truncation, untouched parameters and gradients) and the profile's storage and summaries."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn.curvature import (
    ESTIMATORS,
    SharpnessProfile,
    accumulate_diagonal,
    check_exact,
    get_estimator,
    profile_model,
)
from lightning_unlearn.curvature._engine.conv import conv_mode as choose_conv_mode
from lightning_unlearn.curvature._engine.planner import choose_segments
from lightning_unlearn.curvature._support import init_sums, make_generator
from lightning_unlearn.curvature.exact import exact_factor
from lightning_unlearn.distributed import all_reduce_flat

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# Models and references
# ----------------------------------------------------------------------------------------------------------------------


class Residual(nn.Module):
    """Conv-BN-ReLU(inplace) stem, a grouped convolution with an in-place residual add, global pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.conv1(x)))
        out = self.conv2(h)
        out += h
        return self.fc(torch.flatten(self.pool(self.relu(out)), 1))


class Sequence(nn.Module):
    """A Linear layer applied to every position of a sequence (3-D input), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.embed(x)).flatten(1))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))


def make_case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in eval mode, float64 inputs, targets) of a small piecewise-linear network."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
        x, classes = torch.randn(12, 5, generator=g), 4
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 4))
        x, classes = torch.randn(10, 2, 6, 6, generator=g), 4
    elif name == "cnn_bn":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 2, dilation=2, padding=1),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 5),
        )
        x, classes = torch.randn(9, 2, 9, 9, generator=g), 5
    elif name == "residual":
        model = Residual()
        x, classes = torch.randn(8, 2, 5, 5, generator=g), 4
    elif name == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2),
            nn.BatchNorm1d(4),
            nn.LeakyReLU(0.1),
            nn.Conv1d(4, 2, 3, padding="same", padding_mode="circular"),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        x, classes = torch.randn(7, 2, 8, generator=g), 3
    elif name == "conv3d":
        model = nn.Sequential(
            nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 2 * 4, 3),
        )
        x, classes = torch.randn(5, 2, 4, 5, 3, generator=g), 3
    elif name == "one_position":
        # convolutions with a single output position (L = 1), the second on a 1×1 map with padding (mostly zero
        # patches), as in the last stage of an ImageNet-stem ResNet on 32×32 images
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5, 3)
        )
        x, classes = torch.randn(6, 2, 3, 3, generator=g), 3
    elif name == "sequence":
        model = Sequence()
        x, classes = torch.randn(6, 5, 3, generator=g), 3
    else:  # pragma: no cover
        raise KeyError(name)
    model = model.to(DTYPE)
    randomize_batchnorm(model, g)
    model.eval()
    y = torch.randint(0, classes, (x.shape[0],), generator=g)
    return model, x.to(DTYPE), y


CASES = ["mlp", "cnn", "cnn_bn", "residual", "conv1d", "conv3d", "one_position", "sequence"]


def full_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> dict:
    """Hessian of the mean loss w.r.t. every parameter pair, as nested dicts of tensors."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    return hessian(lambda ps: loss_fn(functional_call(model, ps, (x,)), y))(params)


def hessian_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> dict:
    h = full_hessian(model, x, y, loss_fn)
    out = {}
    for name, p in model.named_parameters():
        out[name] = h[name][name].reshape(p.numel(), p.numel()).diagonal().reshape(p.shape)
    return out


def hessian_matrix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> torch.Tensor:
    """The full (P, P) Hessian, parameters in ``named_parameters`` order."""
    h = full_hessian(model, x, y, loss_fn)
    names = [name for name, _ in model.named_parameters()]
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    rows = [torch.cat([h[a][b].reshape(sizes[a], sizes[b]) for b in names], 1) for a in names]
    return torch.cat(rows, 0)


def per_sample_logit_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C, P) Jacobians of each sample's logits w.r.t. all parameters (flattened in order)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def logits(ps: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, ps, (xi[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, x)
    return torch.cat([jac[name].reshape(x.shape[0], jac[name].shape[1], -1) for name in params], 2)


def estimate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, seed: int = 0, **options) -> dict:
    """Mean-loss diagonal of one batch with an estimator used directly (no loop)."""
    estimator = get_estimator(name, **options)
    sums = init_sums(model)
    count = estimator.accumulate(model, x, y, sums, generator=make_generator(seed))
    assert count == x.shape[0]
    return {k: v / count for k, v in sums.items()}


def flat(d: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


@pytest.fixture(params=[None, "stream", "stack", "gram"])
def conv_mode(request) -> str | None:
    """The automatic choice of convolution algorithm, then each algorithm forced (the ``conv_mode`` option; ``gram``
    only where it applies, ungrouped convolutions)."""
    return request.param


# ----------------------------------------------------------------------------------------------------------------------
# exact
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_exact_equals_hessian_diagonal(case, conv_mode):
    model, x, y = make_case(case)
    check_exact(model)
    reference = hessian_diagonal(model, x, y)
    ours = estimate(model, x, y, "exact", conv_mode=conv_mode)
    for name, value in reference.items():
        assert ours[name].dtype == DTYPE
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-10, msg=f"{case}: {name}")
        assert (ours[name] >= 0).all()


def test_a_single_output_position_takes_the_rank_one_gram_form():
    """L = 1 (ResNet-18's last stage on 32×32 images with the ImageNet stem): the Gram form is one matrix product of
    ``Σ_c g_c²`` with ``u²``, cheaper than K outer products per sample; larger maps keep the direct products."""
    assert choose_conv_mode(9, 512, 1, 4608, 1) == "gram"
    assert choose_conv_mode(9, 64, 1024, 576, 1) == "stack"
    assert choose_conv_mode(1, 8, 676, 9, 1) == "stream"


@pytest.mark.parametrize("case", ["cnn_bn", "residual", "sequence"])
def test_exact_is_independent_of_chunking(case):
    """A tiny memory budget processes one sample at a time; the sums must not change."""
    model, x, y = make_case(case)
    whole = estimate(model, x, y, "exact")
    chunked = estimate(model, x, y, "exact", max_memory_mb=1e-4)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=0, atol=1e-12)


def test_exact_factor_reconstructs_the_cross_entropy_hessian():
    logits = torch.randn(6, 5, dtype=DTYPE) * 3
    logits[0, 2] = 40.0  # a confident sample
    columns = exact_factor(logits)
    assert columns.shape == (6, 4, 5)
    p = logits.softmax(-1)
    target = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(columns.transpose(1, 2) @ columns, target, rtol=0, atol=1e-14)


def test_exact_through_the_loop_equals_hessian_of_the_whole_dataset():
    model, x, y = make_case("residual")
    loader = DataLoader(TensorDataset(x, y), batch_size=3)  # 8 samples: batches 3, 3, 2
    profile = profile_model(model, loader, "exact")
    assert profile.num_samples == 8 and profile.estimator == "exact"
    reference = hessian_diagonal(model, x, y)
    for name, value in reference.items():
        torch.testing.assert_close(profile.diagonals[name].to(DTYPE), value.float().to(DTYPE), rtol=1e-5, atol=1e-8)


def test_frozen_parameters_are_profiled_too():
    model, x, y = make_case("cnn")
    for p in model.parameters():
        p.requires_grad_(False)
    reference = hessian_diagonal(model, x, y)
    ours = estimate(model, x, y, "exact")
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-10)
    assert not any(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# models where exact does not apply
# ----------------------------------------------------------------------------------------------------------------------


def tanh_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # larger weights: stronger curvature of tanh, a clear GGN vs Hessian gap
    x = torch.randn(16, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, x, y


def test_tanh_network_is_refused_by_check_exact_and_exact():
    model, x, y = tanh_case()
    with pytest.raises(ValueError, match=r"'1' \(Tanh\)"):
        check_exact(model)
    with pytest.raises(ValueError, match=r"'1' \(Tanh\).*hutchinson"):
        estimate(model, x, y, "exact")
    assert not get_estimator("exact").exact_for_model(model)


def test_ggn_of_tanh_network_differs_from_its_hessian_diagonal():
    model, x, y = tanh_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict=False asks for the GGN diagonal: nothing to warn about
        ggn = flat(estimate(model, x, y, "exact", strict=False))
    true = hessian_matrix(model, x, y).diagonal()
    assert (ggn >= 0).all()
    assert (true < 0).any()  # the true diagonal has negative entries, the GGN never
    assert (ggn - true).abs().max() > 0.05 * true.abs().max()


def test_hutchinson_converges_to_the_true_diagonal_within_its_standard_error():
    """Hutchinson is unbiased with per-probe variance ``Σ_{j≠i} H_ij²`` for batch Hessian ``H``. Over batches of sizes
    n_b (N samples) with K probes each, the estimate of diag(H_mean) has variance ``Σ_b (n_b/N)² Σ_{j≠i} H_b,ij² / K``;
    every entry must lie within 5 standard errors (seeded)."""
    model, x, y = tanh_case()
    probes = 1500
    loader = DataLoader(TensorDataset(x, y), batch_size=6)  # batches of 6, 6, 4
    sums, count = accumulate_diagonal(model, loader, "hutchinson", seed=7, num_draws=probes)
    assert count == 16
    estimate_ = flat(sums) / count
    true = hessian_matrix(model, x, y).diagonal()
    variance = torch.zeros_like(true)
    for xb, yb in loader:
        h = hessian_matrix(model, xb, yb)
        off = (h**2).sum(1) - h.diagonal() ** 2
        variance += (len(xb) / count) ** 2 * off / probes
    z = (estimate_ - true) / variance.sqrt().clamp_min(1e-12)
    assert z.abs().max() < 5.0, z.abs().max()
    # and it does see the negative curvature the GGN misses
    assert (estimate_[true < -3 * variance.sqrt()] < 0).all()


def test_hutchinson_is_reproducible_and_rank_dependent():
    model, x, y = tanh_case()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    a, _ = accumulate_diagonal(model, loader, "hutchinson", seed=1)
    b, _ = accumulate_diagonal(model, loader, "hutchinson", seed=1)
    c, _ = accumulate_diagonal(model, loader, "hutchinson", seed=1, rank=1)
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


def test_layers_without_per_sample_rules_take_the_generic_path():
    """A LayerNorm has no per-layer rule: its parameters are computed by the generic torch.func path (checked against
    float64 autograd on attention, embeddings and free parameters in test_generic_curvature.py); ``exact`` still
    refuses with ``strict=True`` (its GGN diagonal is then not the Hessian's) and says what to do."""
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(DTYPE).eval()
    x, y = torch.randn(4, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 0])
    for name, options in (("exact", {"strict": False}), ("mc", {}), ("fisher", {})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sums = estimate(model, x, y, name, **options)
        assert float(sums["1.weight"].abs().sum()) > 0 and bool((sums["1.weight"] >= 0).all())
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\).*strict=False for the exact GGN diagonal"):
        check_exact(model)
    estimate(model, x, y, "hutchinson")  # works for anything differentiable


def test_batchnorm_in_training_mode_is_refused_and_a_reused_layer_is_computed():
    model, x, y = make_case("cnn_bn")
    model.train()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) is in training mode"):
        check_exact(model)
    with pytest.raises(ValueError, match="training mode"):
        estimate(model, x, y, "mc")

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(inputs)))

    twice = Twice().to(DTYPE).eval()  # a layer called twice: the generic path, exactly the per-sample squares
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 1, 2, 0])
    sums = estimate(twice, x, y, "fisher")
    grads = [torch.autograd.grad(F.cross_entropy(twice(x[i : i + 1]), y[i : i + 1]), list(twice.parameters()))
             for i in range(4)]  # fmt: skip
    torch.testing.assert_close(sums["fc.weight"], sum(g[0] ** 2 for g in grads) / 4)  # the mean loss's


def test_unknown_estimator_names_the_argument():
    with pytest.raises(ValueError, match=r"`estimator` must be one of \['exact', 'fisher', 'hutchinson', 'mc'\]"):
        get_estimator("bfgs")
    assert set(ESTIMATORS) == {"exact", "mc", "hutchinson", "fisher"}
    assert get_estimator("mc", num_draws=3).num_draws == 3


# ----------------------------------------------------------------------------------------------------------------------
# mc and fisher
# ----------------------------------------------------------------------------------------------------------------------


def test_mc_is_an_unbiased_estimate_of_the_ggn_diagonal():
    """Per sample i and sampled class c the MC term is ``X_ic = (J_iᵀ(p_i - e_c))²``; its exact mean and variance follow
    from enumerating the classes. Over N samples and K draws each the estimate's variance is ``Σ_i Var_i / (N² K)``;
    every entry must lie within 5 standard errors of the exact GGN diagonal (seeded)."""
    model, x, y = make_case("cnn_bn")
    draws = 400
    mc = flat(estimate(model, x, y, "mc", seed=11, num_draws=draws))
    jac = per_sample_logit_jacobians(model, x)  # (N, C, P)
    with torch.no_grad():
        p = model(x).softmax(-1)
    n, c = p.shape
    vectors = p[:, None, :] - torch.eye(c, dtype=DTYPE)[None]  # (N, C(class), C(logit))
    terms = torch.einsum("ncl,nlp->ncp", vectors, jac) ** 2  # X_ic
    mean_i = (p[:, :, None] * terms).sum(1)
    var_i = (p[:, :, None] * terms**2).sum(1) - mean_i**2
    ggn = mean_i.mean(0)
    torch.testing.assert_close(ggn, flat(estimate(model, x, y, "exact")), rtol=0, atol=1e-10)
    std = (var_i.sum(0) / (n**2 * draws)).sqrt()
    z = (mc - ggn) / std.clamp_min(1e-15)
    assert (mc >= 0).all()
    assert z.abs().max() < 5.0, z.abs().max()


def test_mc_draws_do_not_depend_on_chunking_and_follow_the_seed():
    model, x, y = make_case("cnn")
    a = flat(estimate(model, x, y, "mc", seed=5, num_draws=2))
    b = flat(estimate(model, x, y, "mc", seed=5, num_draws=2, max_memory_mb=1e-4))
    c = flat(estimate(model, x, y, "mc", seed=6, num_draws=2))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.allclose(a, c)


def empirical_fisher_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Mean over samples of the squared per-sample cross-entropy gradients, one backward pass per sample."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            total[name] += p.grad**2
    model.zero_grad(set_to_none=True)
    return {name: value / len(x) for name, value in total.items()}


def test_fisher_is_the_mean_of_squared_per_sample_gradients_at_true_labels():
    model, x, y = make_case("residual")
    reference = flat(empirical_fisher_diagonal(model, x, y))
    torch.testing.assert_close(flat(estimate(model, x, y, "fisher")), reference, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# the profiling loop
# ----------------------------------------------------------------------------------------------------------------------


def test_max_samples_truncates_exactly():
    model, x, y = make_case("cnn")
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 10 samples: 4, 4, 2
    sums, count = accumulate_diagonal(model, loader, "exact", max_samples=6)
    assert count == 6
    reference = hessian_diagonal(model, x[:6], y[:6])
    for name, value in reference.items():
        torch.testing.assert_close(sums[name] / count, value, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="max_samples"):
        accumulate_diagonal(model, loader, "exact", max_samples=0)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_parameters_gradients_and_modes_are_left_as_they_were(name):
    model, x, y = make_case("cnn_bn")
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    model[6].weight.requires_grad_(False)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grad_before = model[0].weight.grad
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    sums, count = accumulate_diagonal(model, loader, name, strict=True)
    assert count == len(x) and set(sums) == {n for n, _ in model.named_parameters()}
    for key, value in model.state_dict().items():  # parameters and BatchNorm running statistics
        assert torch.equal(value, params[key]), key
    assert model[0].weight.grad is grad_before and torch.equal(grad_before, torch.full_like(grad_before, 3.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert not model[6].weight.requires_grad and model[0].weight.requires_grad
    assert model.training and all(m.training for m in model.modules())


def test_batches_made_under_inference_mode_and_dict_batches():
    model, x, y = make_case("mlp")
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    batches = [{"image": xi[:5], "label": yi[:5]}, {"image": xi[5:], "label": yi[5:]}]
    with torch.inference_mode():
        sums, count = accumulate_diagonal(model, batches, "exact")
    reference = hessian_diagonal(model, x, y)
    for name, value in reference.items():
        torch.testing.assert_close(sums[name] / count, value, rtol=0, atol=1e-10)


def test_sums_and_count_of_all_ranks_travel_in_one_flat_collective():
    """``profile_model(reduce=...)`` calls the all-reduce once, with every sum and the count in one float64 tensor;
    ``all_reduce_flat`` gives back each tensor's shape and dtype (or the dtype asked for)."""
    model, x, y = make_case("cnn_bn")
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    calls: list[torch.Tensor] = []

    def two_ranks(flat: torch.Tensor) -> torch.Tensor:  # two ranks that saw the same shard
        calls.append(flat)
        return flat * 2

    single = profile_model(model, loader, "exact")
    doubled = profile_model(model, loader, "exact", reduce=two_ranks, world_size=2)
    total = sum(p.numel() for p in model.parameters())
    assert len(calls) == 1 and calls[0].dtype == torch.float64 and calls[0].shape == (total + 1,)
    assert doubled.num_samples == 2 * single.num_samples
    for name, value in single.diagonals.items():
        assert torch.equal(doubled.diagonals[name], value)
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    out = all_reduce_flat(tensors, lambda flat: flat + 1)
    assert out["a"].dtype == torch.float32 and torch.equal(out["a"], tensors["a"] + 1)
    assert out["b"].dtype == torch.int64 and torch.equal(out["b"], tensors["b"] + 1)
    assert all_reduce_flat(tensors, None, dtype=torch.float64)["b"].dtype == torch.float64
    assert all_reduce_flat({}, lambda flat: flat) == {}


# ----------------------------------------------------------------------------------------------------------------------
# the profile
# ----------------------------------------------------------------------------------------------------------------------


def small_profile() -> tuple[SharpnessProfile, nn.Module]:
    model, x, y = make_case("cnn_bn")
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    return profile_model(model, loader, "exact", dataset="random"), model


def test_profile_save_load_round_trip_is_atomic(tmp_path):
    profile, model = small_profile()
    path = profile.save(tmp_path / "sub" / "profile.pt")
    assert sorted(os.listdir(path.parent)) == ["profile.pt"]  # no temporary file left behind
    loaded = SharpnessProfile.load(path)
    assert loaded.estimator == "exact" and loaded.num_samples == 9 and loaded.dataset == "random"
    assert loaded.architecture == profile.architecture and loaded.weights == profile.weights
    assert list(loaded.diagonals) == list(profile.diagonals)
    for name, value in profile.diagonals.items():
        assert torch.equal(loaded.diagonals[name], value)
    assert [s.name for s in loaded.layer_stats()] == ["0", "1", "3", "6"]
    assert [s.type for s in loaded.layer_stats()] == ["Conv2d", "BatchNorm2d", "Conv2d", "Linear"]
    loaded.check_compatible(model)
    with pytest.raises(ValueError, match="architecture"):
        loaded.check_compatible(nn.Sequential(nn.Linear(2, 2)))
    assert "Conv2d" in loaded.to_table()


def test_profile_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        SharpnessProfile.load(tmp_path / "missing.pt")
    profile, _ = small_profile()
    path = profile.save(tmp_path / "profile.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable sharpness profile"):
        SharpnessProfile.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable sharpness profile"):
        SharpnessProfile.load(path)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_top_parameters_selects_exactly_the_requested_count(fraction):
    profile, _ = small_profile()
    total = sum(d.numel() for d in profile.diagonals.values())
    for largest in (True, False):
        masks = profile.top_parameters(fraction, largest=largest)
        chosen = torch.cat([m.reshape(-1) for m in masks.values()])
        assert int(chosen.sum()) == max(1, round(fraction * total))
        values = torch.cat([d.reshape(-1) for d in profile.diagonals.values()])
        if 0 < chosen.sum() < total:
            inside, outside = values[chosen], values[~chosen]
            assert (inside.min() >= outside.max()) if largest else (inside.max() <= outside.min())


def test_top_parameters_breaks_ties_by_position():
    profile = SharpnessProfile({"a": torch.ones(4), "b": torch.ones(3)}, "exact", 1)
    masks = profile.top_parameters(3 / 7)
    assert masks["a"].tolist() == [True, True, True, False] and not masks["b"].any()


def test_rank_layers_orders_by_mean_and_filters_types():
    diagonals = {
        "conv.weight": torch.full((2, 2), 3.0),
        "conv.bias": torch.full((2,), 3.0),
        "bn.weight": torch.full((2,), 1.0),
        "fc.weight": torch.full((3,), 2.0),
    }
    types = {"conv": "Conv2d", "bn": "BatchNorm2d", "fc": "Linear"}
    profile = SharpnessProfile(diagonals, "exact", 10, layer_types=types)
    assert profile.rank_layers() == ["bn", "fc", "conv"]
    assert profile.rank_layers(descending=True) == ["conv", "fc", "bn"]
    assert profile.rank_layers(types=("Conv2d", "Linear")) == ["fc", "conv"]
    assert math.isclose(profile.layer_stats()[0].mean, 3.0)


# ----------------------------------------------------------------------------------------------------------------------
# Memory: backward segments and chunks of samples
# ----------------------------------------------------------------------------------------------------------------------


class Blocks(nn.Module):
    """A stem and two residual blocks (block inputs are cut points), then a linear head on pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)])
            for _ in range(2)
        )
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.stem(x))
        for conv1, bn, conv2 in self.blocks:
            h = self.relu(conv2(self.relu(bn(conv1(h)))) + h)
        return self.fc(F.max_pool2d(h, 2).flatten(1))


def make_blocks(n: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = Blocks().to(DTYPE)
    randomize_batchnorm(model, g)
    model.eval()
    return model, torch.randn(n, 2, 8, 8, generator=g, dtype=DTYPE), torch.randint(0, 5, (n,), generator=g)


@pytest.fixture(params=["auto", "none", "all"])
def segments(request) -> str:
    """Backward segments as planned, switched off, or at every cut point (one layer group per block): the
    ``segments`` option."""
    return request.param


@pytest.mark.parametrize("case", ["blocks", "residual", "cnn", "cnn_bn", "sequence"])
def test_exact_equals_hessian_diagonal_whatever_the_segments(case, segments):
    model, x, y = make_blocks() if case == "blocks" else make_case(case)
    reference = hessian_diagonal(model, x, y)
    estimator = get_estimator("exact", segments=segments)
    ours = estimate_with(estimator, model, x, y)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-10, msg=f"{case}/{segments}: {name}")
    if segments == "all" and case in ("blocks", "residual", "cnn_bn"):
        assert len(estimator.last_segments[-1]) > 1  # the forced split really happened
    if segments == "none":
        assert estimator.last_segments and all(len(chunk) == 1 for chunk in estimator.last_segments)


def test_cut_points_are_the_tensors_every_gradient_flows_through():
    """Block inputs and the head's input separate the layers; inside a block the skip connection bypasses conv2."""
    model, x, y = make_blocks()
    estimator = get_estimator("exact", segments="all")
    estimate_with(estimator, model, x, y)
    block0, block1 = ["blocks.0.0", "blocks.0.1", "blocks.0.2"], ["blocks.1.0", "blocks.1.1", "blocks.1.2"]
    assert estimator.last_segments[-1] == [["fc"], block1, block0, ["stem"]]


def test_choose_segments_minimises_the_largest_need():
    # four layers of 10 elements each, a cut before layer 2 whose tensor has 1 element, 2 columns, no graph
    ranges, peak = choose_segments([10, 10, 10, 10], {2: 1}, 2, 4, [0] * 5)
    assert ranges == [(2, 4), (0, 2)] and peak == 4 * (20 + 2)
    # a boundary as large as the states it would free is not worth it: one segment
    ranges, peak = choose_segments([10, 10, 10, 10], {2: 20}, 2, 4, [0] * 5)
    assert ranges == [(0, 4)] and peak == 4 * 40
    # the graph still alive counts: the top segment holds all of it
    ranges, peak = choose_segments([10, 10, 10, 10], {2: 1}, 2, 4, [0, 0, 0, 100, 200])
    assert ranges == [(2, 4), (0, 2)] and peak == 200 + 4 * 22
    # every cut: that split, and its largest need
    ranges, peak = choose_segments([10, 10, 10, 10], {2: 20}, 2, 4, [0] * 5, every_cut=True)
    assert ranges == [(2, 4), (0, 2)] and peak == 4 * (20 + 2 * 20)


def test_segments_lower_the_planned_peak_and_the_reserved_state_memory():
    model, x, y = make_blocks(8)
    planned = get_estimator("exact", max_memory_mb=64)
    estimate_with(planned, model, x, y)
    whole = get_estimator("exact", max_memory_mb=64, segments="none")
    estimate_with(whole, model, x, y)
    (plan,) = planned._plans.values()
    (plan_whole,) = whole._plans.values()
    assert plan.peak_bytes < plan_whole.peak_bytes
    assert planned._buffers._arena.numel() < whole._buffers._arena.numel()


def estimate_with(estimator, model, x, y) -> dict:
    sums = init_sums(model)
    count = estimator.accumulate(model, x, y, sums, generator=make_generator(0))
    return {k: v / count for k, v in sums.items()}


def test_a_small_budget_shrinks_chunks_and_temporaries_but_not_the_result():
    model, x, y = make_blocks(12)
    large = get_estimator("exact", max_memory_mb=64)
    small = get_estimator("exact", max_memory_mb=1e-4)
    a, b = estimate_with(large, model, x, y), estimate_with(small, model, x, y)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-12)
    assert large.last_chunk_size == 12 and small.last_chunk_size == 1
    # the layer states live in the arena, sized for one chunk; the product temporaries follow `chunk_elements`
    assert small._buffers._arena.numel() * 12 == large._buffers._arena.numel()
    assert small._buffers.chunk_elements < large._buffers.chunk_elements


def test_automatic_budget_is_one_training_step():
    """``max_memory_mb=None``: chunks sized so that graph + states fit the memory of a training step on the batch."""
    model, x, y = make_blocks(40)
    auto = get_estimator("exact", min_auto_budget_mb=0)
    assert auto.max_memory_mb is None and auto.options()["max_memory_mb"] is None
    result = estimate_with(auto, model, x, y)
    (plan,) = auto._plans.values()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    step_bytes = 40 * plan.graph_bytes + params
    assert plan.graph_bytes > 0 and plan.peak_bytes > plan.graph_bytes
    expected = int((step_bytes - step_bytes / 8) // plan.peak_bytes)
    expected = -(-40 // -(-40 // expected))
    assert 1 <= auto.last_chunk_size == expected < 40
    reference = estimate_with(get_estimator("exact", max_memory_mb=1024), model, x, y)
    for name in result:
        torch.testing.assert_close(result[name], reference[name], rtol=0, atol=1e-12)


def test_the_graph_measurement_counts_saved_activations():
    """The 1-sample pass measures what autograd saves: for Linear-ReLU-Linear, the input and the ReLU output (saved by
    ReLU and by the second Linear: counted once); the first Linear's output is not kept."""
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(DTYPE).eval()
    x, y = torch.randn(4, 5, dtype=DTYPE), torch.tensor([0, 1, 2, 0])
    estimator = get_estimator("exact")
    estimate_with(estimator, model, x, y)
    (plan,) = estimator._plans.values()
    assert plan.graph_bytes == 8 * (5 + 7)
    assert plan.graph_before[-1] == plan.graph_bytes


def test_max_memory_mb_is_validated():
    with pytest.raises(ValueError, match="max_memory_mb"):
        get_estimator("exact", max_memory_mb=0)
    with pytest.raises(ValueError, match="max_memory_mb"):
        get_estimator("mc", max_memory_mb=-1.0)


# ----------------------------------------------------------------------------------------------------------------------
# pooled products (first convolution -> ReLU -> max-pooling)
# ----------------------------------------------------------------------------------------------------------------------


class Functional(nn.Module):
    """conv -> F.relu -> F.max_pool2d written functionally (no ReLU or pooling modules), twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, bias=False)
        self.conv2 = nn.Conv2d(3, 4, 2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, stride=2, padding=1, ceil_mode=True)  # overlapping windows
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class TwoUsers(nn.Module):
    """The first convolution's output also feeds a second branch: its gradient is not only the pooled one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 3 * 3 + 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        pooled = F.max_pool2d(F.relu(h), 2).flatten(1)
        return self.fc(torch.cat([pooled, h.mean((2, 3))], 1))


POOLED_MODELS = {
    # name: (model, input shape, classes, the layers expected to take the pooled path)
    "inplace_overlapping": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True),
            nn.Conv2d(3, 2, 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 1 * 1, 3),
        ),
        (2, 7, 7),
        3,
        {"0"},
    ),
    "functional": (Functional, (2, 11, 11), 3, {"conv1"}),
    "two_users": (TwoUsers, (2, 6, 6), 4, set()),
    "batchnorm_between": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)
        ),
        (2, 6, 6),
        3,
        set(),
    ),
    "leaky_relu": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.LeakyReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)),
        (2, 6, 6),
        3,
        set(),
    ),
    "avg_pool": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)),
        (2, 6, 6),
        3,
        set(),
    ),
}


@pytest.mark.parametrize("case", sorted(POOLED_MODELS))
@pytest.mark.parametrize("name", ["exact", "fisher"])
def test_pooled_products_are_exact_and_taken_only_where_they_hold(case, name):
    """Against the full Hessian (exact) and per-sample backward passes (fisher), in float64; the pooled
    path is taken exactly for a first convolution followed by a ReLU and a max-pooling, and nowhere else."""
    build, shape, classes, expected = POOLED_MODELS[case]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = build().to(DTYPE)
    randomize_batchnorm(model, g)
    model.eval()
    x = torch.randn(7, *shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (7,), generator=g)
    estimator = get_estimator(name)
    ours = estimate_with(estimator, model, x, y)
    assert estimator.last_pooled == expected
    reference = hessian_diagonal(model, x, y) if name == "exact" else empirical_fisher_diagonal(model, x, y)
    for pname, value in reference.items():
        torch.testing.assert_close(ours[pname], value, rtol=0, atol=1e-10, msg=f"{case}/{name}: {pname}")


def test_pooled_products_agree_with_the_general_path_on_the_mnist_cnn():
    """The MNIST CNN's first convolution takes the pooled path (its second does not: it is not a first layer), in
    chunks of every size; the result is the general path's to float64 rounding."""
    from lightning_unlearn.models.cnn import MnistCNN

    torch.manual_seed(0)
    model = MnistCNN().to(DTYPE).eval()
    x = torch.randn(16, 1, 28, 28, dtype=DTYPE)
    y = torch.randint(0, 10, (16,))
    estimators = {
        "pooled": get_estimator("exact"),
        "tiny": get_estimator("exact", max_memory_mb=1e-4),  # one sample per chunk
        "general": get_estimator("exact", pooling=False),
    }
    pooled, tiny, general = (estimate_with(estimator, model, x, y) for estimator in estimators.values())
    assert estimators["tiny"].last_chunk_size == 1
    assert estimators["pooled"].last_pooled == estimators["tiny"].last_pooled == {"conv1"}
    assert estimators["general"].last_segments and estimators["general"].last_pooled == set()
    for pname, value in general.items():
        scale = value.abs().max()
        torch.testing.assert_close(pooled[pname], value, rtol=0, atol=1e-12 * scale, msg=pname)
        torch.testing.assert_close(tiny[pname], value, rtol=0, atol=1e-12 * scale, msg=pname)
