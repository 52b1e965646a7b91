"""The speed benchmark runs end to end on a tiny setting (it is a script, not a test of speed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_profile_speed_times_every_method_and_the_passes_of_exact(tmp_path, capsys):
    bench = load_script("profile_speed")
    out = tmp_path / "speed.json"
    argv = ["--models", "mnist_cnn", "--batch-size", "8", "--repeats", "1", "--no-memory", "--no-backpack"]
    bench.main([*argv, "--phases", "--out", str(out)])
    results = json.loads(out.read_text())
    methods = results["models"]["mnist_cnn"]["methods"]
    assert set(methods) == {"fwd+bwd", "exact", "mc", "fisher", "hutchinson", bench.PASSES}
    assert all(m["ms"] > 0 for m in methods.values())
    assert "forward/backward passes" in capsys.readouterr().out


def test_exact_passes_compute_nothing_and_leave_the_estimator_intact():
    bench = load_script("profile_speed")
    model, x, y = bench.setup("mnist_cnn", torch.device("cpu"), 4)
    methods = bench.make_methods(model, x, y, ["exact", bench.PASSES])
    assert all(v.abs().sum() == 0 for v in methods[bench.PASSES]().values())  # no products: nothing summed
    diagonal = methods["exact"]()  # after the passes-only run: real products again
    assert all(v.abs().sum() > 0 for v in diagonal.values())


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_script_prints_its_help(name, capsys):
    """``--help`` is a user's first call; argparse %-formats every help string (a literal "%" breaks it)."""
    with pytest.raises(SystemExit) as exit_:
        load_script(name).main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_klom_is_the_hand_computed_kl_of_normal_fits_with_its_baselines():
    """KLoM (benchmarks/auto.py): per sample, KL(N(μ_u, σ_u²) ‖ N(μ_r, σ_r²)) of the margins over the ensembles, in
    float64 against the closed form; the poisoned side and the retrained halves (the noise floor) beside it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = load_script("auto")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    retrained = torch.tensor([[0.0, 0.0], [2.0, 2.0], [0.0, 2.0], [2.0, 0.0]])  # per sample: μ 1, σ² 4/3
    unlearned = retrained + torch.tensor([1.0, 0.0])  # sample 0 shifted by 1, sample 1 the same
    per_seed = [{f"{k}/{split}": t[i] for k, t in (("unlearned", unlearned), ("retrained", retrained),
                                                    ("poisoned", retrained + 3.0))
                 for split in ("forget", "val", "test")} for i in range(4)]  # fmt: skip
    out = bench.klom(per_seed)["forget"]
    var = 4.0 / 3.0
    assert out["mean"] == pytest.approx((1.0 / (2 * var) + 0.0) / 2, rel=1e-9)  # equal σ: KL = Δμ² / 2σ²
    assert out["poisoned"]["mean"] == pytest.approx(9.0 / (2 * var), rel=1e-9) and out["models_per_side"] == 4
    halves = out["retrained_halves"]  # rows 0–1 against rows 2–3: the same fits (μ 1, σ² 2) for both samples
    assert halves["mean"] == pytest.approx(0.0, abs=1e-12) and halves["models_per_side"] == 2
    shifted = [s | {"retrained/forget": s["retrained/forget"] + torch.tensor([2.0, 0.0]) * (i >= 2)}
               for i, s in enumerate(per_seed)]  # fmt: skip
    assert bench.klom(shifted)["forget"]["retrained_halves"]["mean"] == pytest.approx(4.0 / (2 * 2.0) / 2, rel=1e-9)


def test_the_benchmark_figures_draw_every_measured_row_from_results_files():
    """``profile_speed.py --figure`` and ``auto.py --tables`` draw their figures from results files: one bar per
    estimator and model that was measured, one dot per row with a measured cost (oracle rows hollow)."""
    speed = load_script("profile_speed")
    results = {"models": {"m": {"label": "tiny net", "methods": {"exact": {"ratio": 3.0}, "hutchinson": {"ratio": 2.0}},
                                "backpack_max_rel_diff": 1e-6}}}  # fmt: skip
    ax = speed.estimators_figure([results]).axes[0]
    assert sorted(p.get_height() for p in ax.patches) == [2.0, 3.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tiny net\nvs BackPACK 1e-06"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        auto = load_script("auto")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = {"auto": {"comparison": {"tow": 0.97}, "epochs": 0.4}, "oracle_finetune": {"comparison": {"tow": 0.99},
            "epochs": 1.3}, "oracle_one_step_last": {"tow": 0.995}}  # fmt: skip
    ax = auto.cost_figure({"mnist_label_flip": {"0": {"rows": rows}}}).axes[0]
    points = [(tuple(c.get_offsets()[0]), c.get_facecolors().size > 0) for c in ax.collections]
    assert points == [((0.4, 0.97), True), ((1.3, 0.99), False)]  # no cost, no dot; the oracle hollow
