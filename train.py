"""Train a classifier on poisoned data: ``python train.py fit -c configs/mnist_cnn_targeted.yaml``."""

import sys

from lightning_unlearn.__main__ import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
