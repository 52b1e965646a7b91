"""Selection strategies on a hand-built profile, and the errors of bad selections, profiles and runs."""

import shutil

import pytest
import torch

from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.selection import (
    AllLayers,
    LargestLayer,
    LastLayer,
    NamedLayers,
    RandomEntries,
    RandomLayer,
    SmallestLayer,
    TopKParameters,
    get_strategy,
)
from lightning_unlearn.unlearn import FirstOrder, FreezeGuard, UnlearnModule

# layer -> (type, weight diag, bias diag); means: conv1 2.0, bn 0.1, fc1 0.5, fc2 3.0
LAYERS = {
    "net.conv1": ("Conv2d", torch.tensor([[1.0, 3.0], [2.0, 2.0]]), torch.tensor([2.0])),
    "net.bn": ("BatchNorm2d", torch.tensor([0.1, 0.1]), torch.tensor([0.1, 0.1])),
    "net.fc1": ("Linear", torch.tensor([[0.25, 0.75, 0.5]]), torch.tensor([0.5])),
    "net.fc2": ("Linear", torch.tensor([[9.0, 0.0]]), torch.tensor([0.0])),
}


@pytest.fixture
def profile():
    diagonals = {}
    for layer, (_, weight, bias) in LAYERS.items():
        diagonals[f"{layer}.weight"], diagonals[f"{layer}.bias"] = weight, bias
    return SharpnessProfile(diagonals, "exact", 10, layer_types={k: v[0] for k, v in LAYERS.items()})


def test_layer_statistics(profile):
    stats = {s.name: s for s in profile.layer_stats()}
    assert [s for s in stats] == list(LAYERS)
    assert stats["net.conv1"].mean == pytest.approx(2.0) and stats["net.conv1"].numel == 5
    assert stats["net.fc2"].max == 9.0 and stats["net.fc2"].median == 0.0
    assert profile.rank_layers() == ["net.bn", "net.fc1", "net.conv1", "net.fc2"]
    assert profile.rank_layers(descending=True, types=("Linear",)) == ["net.fc2", "net.fc1"]


@pytest.mark.parametrize(
    ("strategy", "layers"),
    [
        (SmallestLayer(), ["net.fc1"]),  # BatchNorm is not a candidate by default
        (SmallestLayer(layer_types="all"), ["net.bn"]),
        (LargestLayer(), ["net.fc2"]),
        (LastLayer(), ["net.fc2"]),
        (AllLayers(), list(LAYERS)),
        (NamedLayers(["net.conv1", "net.fc2"]), ["net.conv1", "net.fc2"]),
    ],
)
def test_layer_strategies_select_what_they_say(profile, strategy, layers):
    mask = strategy(profile)
    assert mask.layers == layers
    expected = {f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")}
    assert set(mask.trainable) == expected
    assert mask.num_selected == sum(profile.diagonals[name].numel() for name in expected)
    assert all(m.all() for m in mask.masks.values())


def test_random_layer_is_seeded_and_a_candidate(profile):
    picks = {tuple(RandomLayer(seed=s)(profile).layers) for s in range(20)}
    assert picks <= {("net.conv1",), ("net.fc1",), ("net.fc2",)} and len(picks) > 1
    assert RandomLayer(seed=3)(profile).layers == RandomLayer(seed=3)(profile).layers


def test_random_entries_draws_the_count_uniformly_and_is_seeded(profile):
    """``round(fraction × total)`` entries; the same seed the same mask; over many seeds every one of the 16 entries
    is drawn with probability k / total = 1/4 (binomial std over 4,000 draws ≈ 0.0068; tolerance 5 std), whatever its
    diagonal or its parameter: a control that looks at nothing."""
    counts = torch.zeros(profile.total)
    draws = 4000
    for seed in range(draws):
        mask = RandomEntries(fraction=0.25, seed=seed)(profile)
        assert mask.num_selected == 4 and mask.strategy == "random_entries" and mask.layers == []
        flat = torch.cat(
            [mask.masks.get(n, torch.zeros_like(d, dtype=torch.bool)).reshape(-1) for n, d in profile.diagonals.items()]
        )
        assert set(mask.masks) == {n for n in profile.diagonals if mask.masks.get(n, torch.zeros(1)).any()}
        counts += flat.float()
    assert torch.allclose(counts / draws, torch.full_like(counts, 0.25), atol=5 * (0.25 * 0.75 / draws) ** 0.5)
    same = [RandomEntries(0.25, seed=7)(profile).masks for _ in range(2)]
    assert same[0].keys() == same[1].keys() and all(torch.equal(same[0][n], same[1][n]) for n in same[0])
    assert RandomEntries(1e-9)(profile).num_selected == 1 and RandomEntries(1.0)(profile).num_selected == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"fraction": 0.0}, "`fraction`"), ({"fraction": 1.5}, "`fraction`"), ({"fraction": True}, "`fraction`"),
     ({"seed": 1.5}, "`seed`")],
)  # fmt: skip
def test_random_entries_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomEntries(**kwargs)
    assert get_strategy("random_entries", fraction=0.5, seed=3).seed == 3


@pytest.mark.parametrize("largest", [True, False])
def test_topk_selects_exact_count_by_value(profile, largest):
    total = profile.total  # 16
    mask = TopKParameters(fraction=0.25, largest=largest)(profile)
    assert mask.num_selected == round(0.25 * total) == 4
    selected = torch.cat(
        [mask.masks.get(n, torch.zeros_like(d, dtype=torch.bool)).reshape(-1) for n, d in profile.diagonals.items()]
    )
    values = torch.cat([d.reshape(-1) for d in profile.diagonals.values()])
    chosen, rest = values[selected], values[~selected]
    assert (chosen.min() >= rest.max()) if largest else (chosen.max() <= rest.min())


def test_bad_selections(profile):
    with pytest.raises(ValueError, match="`strategy` must be one of"):
        get_strategy("sharpest")
    with pytest.raises(ValueError, match="`layers` names unknown layers"):
        NamedLayers(["net.fc3"])(profile)
    with pytest.raises(ValueError, match="`layers` must name at least one layer"):
        NamedLayers([])
    with pytest.raises(ValueError, match="`layer_types`.*matches no layer"):
        SmallestLayer(layer_types=("LSTM",))(profile)
    with pytest.raises(ValueError, match="`fraction`"):
        TopKParameters(fraction=0.0)


def test_mask_of_another_model_is_refused(profile):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="another model"):
        FreezeGuard(model, AllLayers()(profile))


def test_profile_of_another_model_or_other_weights_is_refused(poisoned_run, bn_run, tmp_path):
    other = TrainingRun.from_path(bn_run).profile_path
    with pytest.raises(ValueError, match="another architecture"):
        UnlearnModule(str(poisoned_run), FirstOrder(), SmallestLayer(), profile=str(other)).prepare()
    stale = SharpnessProfile.load(TrainingRun.from_path(poisoned_run).profile_path)
    stale.weights = "0123456789abcdef"
    stale.save(tmp_path / "stale.pt")
    with pytest.raises(ValueError, match="other weights"):
        UnlearnModule(str(poisoned_run), profile=str(tmp_path / "stale.pt")).prepare()
    UnlearnModule(str(poisoned_run), profile=str(tmp_path / "stale.pt"), allow_stale_profile=True).prepare()


def test_missing_run_pieces_are_clear(poisoned_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a checkpoint"):
        UnlearnModule(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        UnlearnModule(str(tmp_path / "empty"))
    # a checkpoint without any poison record (no poison.json, no datamodule state)
    copy_dir = tmp_path / "copy"
    shutil.copytree(poisoned_run, copy_dir)
    (copy_dir / "poison.json").unlink()
    ckpt = next((copy_dir / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    for key in [k for k in state if k.endswith("PoisonedDataModule")]:
        del state[key]
    torch.save(state, ckpt)
    with pytest.raises(FileNotFoundError, match="No poison record"):
        TrainingRun.from_path(copy_dir).load_record()
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="not a readable Lightning checkpoint"):
        UnlearnModule(str(copy_dir))


def test_profile_file_roundtrip_and_corruption(profile, tmp_path):
    path = profile.save(tmp_path / "p.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["p.pt"]
    loaded = SharpnessProfile.load(path)
    assert loaded.layer_types == profile.layer_types and loaded.num_samples == 10
    assert all(torch.equal(loaded.diagonals[n], d) for n, d in profile.diagonals.items())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable sharpness profile"):
        SharpnessProfile.load(path)
    with pytest.raises(FileNotFoundError, match="No sharpness profile"):
        SharpnessProfile.load(tmp_path / "none.pt")
