"""The step-size search's frozen-activation cache gives exactly the full network's validation numbers."""

import pytest
import torch
from torch import nn

from lightning_unlearn.models import build_model
from lightning_unlearn.unlearn.request.validation import FrozenActivationCache


def _loader(n=96, batch=32, shape=(1, 28, 28), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch], torch.arange(i, i + batch)) for i in range(0, n, batch)]


def _full(net, loader):
    correct, loss, total = 0, 0.0, 0
    with torch.no_grad():
        for x, y, _ in loader:
            logits = net(x)
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            total += len(y)
    return 100.0 * correct / total, loss / total


def _check_every_layer(net, loader):
    net = net.double().eval()
    layers = [name for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    for name in layers:
        params = list(net.get_submodule(name).parameters())
        cache = FrozenActivationCache(net, params, loader, "cpu")
        assert cache.cached, name
        for scale in (0.0, 0.05, -0.3):  # the search changes the selected parameters in place between calls
            with torch.no_grad():
                for p in params:
                    p.add_(scale * torch.ones_like(p))
            assert cache.evaluate() == pytest.approx(_full(net, loader), rel=1e-12, abs=1e-12), (name, scale)
    return layers


def test_cache_equals_full_forward_for_every_layer_of_the_cnn_with_batchnorm():
    torch.manual_seed(0)
    net = build_model("mnist_cnn", batch_norm=True)
    assert len(_check_every_layer(net, _loader())) == 6


def test_cache_equals_full_forward_through_residual_blocks():
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=10, in_channels=3, stem="cifar")
    loader = _loader(n=8, batch=4, shape=(3, 16, 16))
    net = net.double().eval()
    for name in ("layer1.0.conv1", "layer3.1.bn2", "layer4.1.conv2", "fc"):
        params = list(net.get_submodule(name).parameters())
        cache = FrozenActivationCache(net, params, loader, "cpu")
        with torch.no_grad():
            params[0].mul_(1.5)
        assert cache.cached and cache.evaluate() == pytest.approx(_full(net, loader), rel=1e-12), name
    # the later the selected layer, the smaller the part evaluated per call: the cached frontier is what it reads
    early = FrozenActivationCache(net, net.layer1[0].conv1.parameters(), loader, "cpu").cache_mb
    assert FrozenActivationCache(net, net.fc.parameters(), loader, "cpu").cache_mb < early


class _Branchy(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_untraceable_network_or_small_budget_falls_back_to_full_passes():
    torch.manual_seed(0)
    loader = _loader(n=40, batch=10, shape=(4,), classes=3)
    net = _Branchy().double().eval()
    cache = FrozenActivationCache(net, net.fc.parameters(), loader, "cpu")
    assert not cache.cached and cache.evaluate() == pytest.approx(_full(net, loader))
    cnn = build_model("mnist_cnn").double().eval()
    tight = FrozenActivationCache(cnn, cnn.fc2.parameters(), _loader(), "cpu", max_cache_mb=1e-3)
    assert not tight.cached and tight.evaluate() == pytest.approx(_full(cnn, _loader()))


def test_step_search_is_identical_with_and_without_the_cache(poisoned_run):
    from lightning_unlearn.selection import SmallestLayer
    from lightning_unlearn.unlearn import FirstOrder, UnlearnModule
    from lightning_unlearn.unlearn.module import unlearn_trainer

    reports, weights = [], []
    for cache_mb in (1024.0, 0.0):
        module = UnlearnModule(str(poisoned_run), FirstOrder(), SmallestLayer(), validation_cache_mb=cache_mb)
        module.prepare()
        unlearn_trainer(accelerator="cpu", max_epochs=1).fit(module)
        reports.append(module.method.report())
        weights.append({k: v.clone() for k, v in module.net.state_dict().items()})
    assert reports[0]["validation_cached"] and not reports[1]["validation_cached"]
    assert reports[0]["candidates"] == reports[1]["candidates"]  # bit-identical accuracies and losses
    assert reports[0]["step"] == reports[1]["step"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_negative_cache_budget_is_rejected(poisoned_run):
    from lightning_unlearn.unlearn import UnlearnModule

    with pytest.raises(ValueError, match="validation_cache_mb"):
        UnlearnModule(str(poisoned_run), validation_cache_mb=-1)
