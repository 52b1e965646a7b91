"""Unlearn a plain ``nn.Module`` trained with a plain PyTorch loop: no Lightning code of yours at all.

    python examples/plain_module.py          # ~20 s on a laptop CPU

A ReLU MLP on scikit-learn's 8×8 digits, trained on data where 80 % of the training 3s are labelled 8.
``unlearn_model`` computes the exact Hessian diagonal of the training loss, picks the parameters with a validated
one-step update and changes them in place; it returns the report (before / after, and with a reference the
poison's harm, ToW and % restored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn import FirstOrder, UnlearnData, Validated, unlearn_model


def train(x: torch.Tensor, y: torch.Tensor, epochs: int = 60) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            optimizer.step()
    return net.eval()


def main() -> None:
    bunch = load_digits()
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(0))
    x = (torch.tensor(bunch.images, dtype=torch.float32) / 16.0)[order]
    y = torch.tensor(bunch.target)[order]
    (xt, yt), (xv, yv), (xs, ys) = (x[:1200], y[:1200]), (x[1200:1500], y[1200:1500]), (x[1500:], y[1500:])
    flipped = torch.nonzero(yt == 3).flatten()[: int(0.8 * (yt == 3).sum())]
    poisoned = yt.clone()
    poisoned[flipped] = 8
    keep = torch.ones(len(yt), dtype=torch.bool)
    keep[flipped] = False

    model, retrained = train(xt, poisoned), train(xt[keep], yt[keep])
    data = UnlearnData(
        forget=DataLoader(TensorDataset(xt[flipped], poisoned[flipped])),  # plain loaders (or datasets)
        corrected_labels=yt[flipped],
        retain=DataLoader(TensorDataset(xt[keep], yt[keep])),
        val=DataLoader(TensorDataset(xv, yv)),
        test=DataLoader(TensorDataset(xs, ys)),
        attacked_class=3,
    )
    report = unlearn_model(model, data, FirstOrder(), Validated(), reference=retrained, accelerator="cpu")

    print(report["poison_effect"]["statement"])
    before, after, reference = report["before"], report["after"], report["reference"]
    print(f"selection {report['selection']['strategy']}, step {report['method']['step']:.3g} (chosen on validation)")
    print(f"class-3 test accuracy: poisoned {before['test/acc_attacked']:.2f} %, unlearned "
          f"{after['test/acc_attacked']:.2f} %, retrained {reference['test/acc_attacked']:.2f} %; "
          f"% restored {report['restored']['test_restored/acc_attacked']:.1f}")  # fmt: skip
    accuracy = f"{before['test/acc']:.2f} → {after['test/acc']:.2f} %"
    print(f"test accuracy: {accuracy} (retrained {reference['test/acc']:.2f} %)")


if __name__ == "__main__":
    main()
