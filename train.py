"""Train a classifier on poisoned data: ``python train.py fit -c configs/mnist_cnn_targeted.yaml``; or any
LightningModule on any LightningDataModule: ``python train.py fit --model my_pkg.MyModule --data my_pkg.MyData``."""

import sys

from lightning_unlearn.__main__ import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
