"""Unlearn a training run's poisoned samples: ``python unlearn.py -c configs/unlearn/sa_first_order.yaml
--model.run runs/mnist_cnn_targeted/version_0 [--reference runs/mnist_cnn_targeted_retrain/version_0]``."""

import sys

from lightning_unlearn.__main__ import main

if __name__ == "__main__":
    main(["unlearn", *sys.argv[1:]])
