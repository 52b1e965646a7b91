"""The exact GGN diagonal of any architecture (issue 31): the engine's generic ``torch.func`` path beside its per-layer
rules, against float64 autograd on a tiny ViT (``nn.TransformerEncoderLayer``: attention, GELU, LayerNorm, a
positional embedding), an MLP-Mixer and a token classifier (``nn.Embedding`` + ``nn.MultiheadAttention``); and
attention that profiles under every estimator."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn.curvature import get_estimator, profile_model
from lightning_unlearn.curvature._engine.capture import partition


class TinyViT(nn.Module):
    """Patch-embedding convolution, a pre-norm transformer encoder (GELU), LayerNorm, mean-pool, head."""

    def __init__(self, d: int = 8, heads: int = 2, layers: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, 4)
        self.pos = nn.Parameter(torch.randn(4, d) * 0.5)
        layer = nn.TransformerEncoderLayer(
            d, heads, 12, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(1))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 6), nn.GELU(), nn.Linear(6, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(d, 6), nn.GELU(), nn.Linear(6, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TinyMixer(nn.Module):
    def __init__(self, d: int = 6, num_classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, 4)
        self.block = MixerBlock(4, d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


class TokenClassifier(nn.Module):
    """Token ids → embedding + learnt positions → multi-head self-attention → mean-pool → head."""

    def __init__(self, vocab: int = 11, d: int = 8, length: int = 5, num_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.5)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(out).mean(1))


def _flat(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
    return torch.cat([p.reshape(-1) for p in params.values()]), [(n, p.shape) for n, p in params.items()]


def _unflat(vector: torch.Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in layout:
        size = shape.numel()
        out[name] = vector[offset : offset + size].reshape(shape)
        offset += size
    return out


def reference_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """The GGN diagonal ``mean_n diag(J_nᵀ (diag p − p pᵀ) J_n)`` (``kind="ggn"``) or the empirical Fisher diagonal
    ``mean_n (∇ℓ_n)²`` (``"fisher"``) of the mean cross-entropy, by float64 autograd (full Jacobians)."""
    model = model.double().eval()
    flat, layout = _flat({n: p.detach().clone() for n, p in model.named_parameters()})
    diagonal = torch.zeros_like(flat)
    for i in range(len(x)):

        def logits(v: torch.Tensor, i: int = i) -> torch.Tensor:
            return functional_call(model, _unflat(v, layout), (x[i : i + 1],))[0]

        jacobian = torch.autograd.functional.jacobian(logits, flat)  # (C, P)
        p = torch.softmax(logits(flat), 0)
        if kind == "ggn":
            diagonal += ((torch.diag(p) - torch.outer(p, p)) @ jacobian * jacobian).sum(0)
        else:
            diagonal += (jacobian.T @ (p - F.one_hot(y[i], len(p)).double())) ** 2
    return _unflat(diagonal / len(x), layout)


CASES = {
    "vit": (TinyViT, lambda g: torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), 4),
    "mixer": (TinyMixer, lambda g: torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), 3),
    "tokens": (TokenClassifier, lambda g: torch.randint(0, 11, (6, 5), generator=g), 3),
}


@pytest.mark.parametrize(("estimator", "kind"), [("exact", "ggn"), ("fisher", "fisher")])
@pytest.mark.parametrize("case", list(CASES))
def test_any_architecture_matches_float64_autograd(case, estimator, kind):
    build, inputs, num_classes = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    generator = torch.Generator().manual_seed(1)
    x, y = inputs(generator), torch.randint(0, num_classes, (6,), generator=generator)
    expected = reference_diagonal(model, x, y, kind)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # two batches: the sums run over both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not piecewise linear: the GGN diagonal" (strict=False)
        profile = profile_model(model, loader, estimator, strict=False)
    assert set(profile.diagonals) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(profile.diagonals[name].double(), value, rtol=1e-6, atol=1e-6 * value.abs().max())


def test_the_rules_and_the_generic_path_split_the_parameters_without_overlap():
    torch.manual_seed(0)
    vit = TinyViT().eval()
    layers, generic = partition(vit, "exact", torch.randn(2, 1, 8, 8))
    names = {name for name, _ in layers}
    # convolutions and the feed-forward Linear layers (called as modules) take the fast rules; attention's projections
    # are applied as functions inside nn.MultiheadAttention, so they go to the generic path with LayerNorm and `pos`
    assert {"patch", "head", "encoder.layers.0.linear1", "encoder.layers.0.linear2"} <= names
    assert "encoder.layers.0.self_attn.out_proj" not in names
    assert {"pos", "norm.weight", "encoder.layers.0.self_attn.in_proj_weight"} <= set(generic)
    assert "encoder.layers.0.self_attn.out_proj.weight" in generic
    covered = {f"{n}.{p}" for n, m in layers for p, _ in m.named_parameters(recurse=False)}
    assert covered.isdisjoint(generic) and covered | set(generic) == {n for n, _ in vit.named_parameters()}


@pytest.mark.parametrize("estimator", ["exact", "mc", "fisher", "hutchinson"])
def test_attention_profiles_under_every_estimator_with_the_users_kernel_choice_restored(estimator):
    """The fused scaled-dot-product-attention kernels have no double backward (Hutchinson's HVP) and no batching rule
    (the generic path's vmap): curvature runs with the math kernel, and the caller's setting is back afterwards."""
    torch.manual_seed(0)
    model = TinyViT()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profile = profile_model(model, DataLoader(TensorDataset(x, y), batch_size=4), estimator, strict=False)
    assert all(torch.isfinite(d).all() for d in profile.diagonals.values())
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before
    if estimator != "hutchinson":  # sums of squares: every parameter that moves the logits has some curvature
        assert all(bool((d >= 0).all()) and float(d.sum()) > 0 for d in profile.diagonals.values())
    assert get_estimator(estimator) is not None


@pytest.mark.parametrize("estimator", ["exact", "fisher"])
def test_a_model_whose_only_layer_makes_the_logits_is_profiled(estimator):
    """Logistic regression (one Linear layer on the inputs): the engine's backward pass is skipped when the only layer
    is the logits' source, and its layer state then got no gradient — every diagonal came out zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x, y = torch.randn(7, 3, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    expected = reference_diagonal(model, x, y, "ggn" if estimator == "exact" else "fisher")
    profile = profile_model(model, DataLoader(TensorDataset(x, y), batch_size=4), estimator)
    for name, value in expected.items():
        assert float(value.abs().max()) > 0
        torch.testing.assert_close(profile.diagonals[name].double(), value, rtol=1e-6, atol=1e-6 * value.abs().max())


def test_an_estimator_that_cannot_run_is_refused_before_the_first_training_step(tmp_path):
    """The profiler's check before training runs one real curvature product: an operation without the derivative an
    estimator needs fails there, not in ``on_train_end`` after the whole fit."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_unlearn.callbacks import SharpnessProfiler

    class SinBackward(torch.autograd.Function):  # a backward kernel without a derivative of its own
        @staticmethod
        def forward(ctx, grad, x):  # noqa: ANN001, ANN205
            return grad * x.cos()

        @staticmethod
        def backward(ctx, *grads):  # noqa: ANN001, ANN205
            raise RuntimeError("derivative for sin_backward is not implemented")

    class NoDoubleBackward(torch.autograd.Function):  # as the fused attention kernels: first derivatives only
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return SinBackward.apply(grad, x)

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.steps = 0
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.head(NoDoubleBackward.apply(self.body(x)))

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            self.steps += 1
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8)
    model = Model()
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[SharpnessProfiler(estimator="hutchinson", dataloader=loader, progress=False)],
    )  # fmt: skip
    with pytest.raises(MisconfigurationException, match="'hutchinson' estimator fails on a profiling batch"):
        trainer.fit(model, loader)
    assert model.steps == 0
    exact = SharpnessProfiler(estimator="exact", strict=False, dataloader=loader, progress=False)  # first order: fine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   default_root_dir=tmp_path, callbacks=[exact]).fit(Model(), loader)  # fmt: skip
    assert exact.profile is not None


def test_hutchinson_refuses_a_gradient_cut_off_from_the_parameters_instead_of_reading_zero():
    """A backward that detaches (a once-differentiable kernel) leaves the gradient of the layers below it constant:
    their Hessian-vector products would read zero. Under cross-entropy every gradient depends on the parameters, so
    the estimator refuses instead."""

    class Detaching(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return grad.detach() * x.cos().detach()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.head(Detaching.apply(self.body(x)))

    sums: dict[str, torch.Tensor] = {}
    with pytest.raises(ValueError, match=r"the gradient of \['body.weight', 'body.bias'\] cannot be differentiated"):
        get_estimator("hutchinson").accumulate(Model(), torch.randn(5, 4), torch.randint(0, 3, (5,)), sums)
