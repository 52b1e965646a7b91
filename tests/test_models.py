"""Architectures (parameter counts of the paper) and the classifier's accuracy bookkeeping."""

import pytest
import torch

from lightning_unlearn.models import ClassifierModule, MnistCNN, ResNet18, build_model
from lightning_unlearn.models.classifier import accuracies_from_confusion, unpack_batch


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper():
    assert n_params(MnistCNN()) == 28_938
    assert n_params(ResNet18(10, 3, "imagenet")) == 11_181_642
    assert n_params(ResNet18(10, 3, "cifar")) == 11_173_962
    assert n_params(ResNet18(10, 1, "cifar")) == 11_173_962 - 2 * 64 * 9


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("mnist_cnn", {}, (2, 1, 28, 28)),
        ("resnet18", {"stem": "cifar"}, (2, 1, 28, 28)),
        ("resnet18", {"stem": "imagenet"}, (2, 3, 32, 32)),
    ],
)
def test_forward_shapes(name, kwargs, shape):
    model = build_model(name, num_classes=10, in_channels=shape[1], image_size=shape[-1], **kwargs).eval()
    assert model(torch.randn(shape)).shape == (2, 10)


def test_bad_architecture_arguments():
    with pytest.raises(ValueError, match="`architecture` must be one of"):
        build_model("vgg")
    with pytest.raises(ValueError, match="`stem` must be one of"):
        ResNet18(stem="tiny")
    with pytest.raises(ValueError, match="`image_size`"):
        MnistCNN(image_size=8)


def test_accuracies_from_confusion_by_hand():
    # 3 classes: class 0 (4 samples, 3 right), class 1 (2 samples, 2 right), class 2 (4 samples, 1 right)
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [2, 1, 1]])
    out = accuracies_from_confusion(confusion, attacked_class=2)
    assert out["acc"] == pytest.approx(60.0)
    assert out["acc_class_0"] == pytest.approx(75.0) and out["acc_class_1"] == pytest.approx(100.0)
    assert out["acc_attacked"] == pytest.approx(25.0)
    assert out["acc_other"] == pytest.approx(500 / 6)  # 5 right of 6, not the mean of per-class accuracies
    assert "acc_attacked" not in accuracies_from_confusion(confusion)


def test_unpack_batch_formats():
    x, y = torch.zeros(2, 3), torch.ones(2)
    for batch in [(x, y), (x, y, torch.arange(2)), {"image": x, "label": y}, {"x": x, "y": y}]:
        got_x, got_y = unpack_batch(batch)
        assert got_x is x and got_y is y
    with pytest.raises(ValueError, match="cannot find inputs"):
        unpack_batch({"pixels": x})


def test_default_optimizer_and_injected_one():
    module = ClassifierModule()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.05
    module = ClassifierModule(optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    assert isinstance(module.configure_optimizers(), torch.optim.Adam)
