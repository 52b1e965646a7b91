"""The selection lab's matrix: which pairs run, what each request is given, and that its tables read the results."""

from __future__ import annotations

import importlib
import json

import pytest
import yaml

from tests.test_benchmarks import load_script

lab = load_script("selection_lab")


def _build(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def test_every_lab_method_is_what_its_config_builds():
    """The lab's flags (one-step, needs corrected labels) are those of the method class its config names, and the
    methods said to search a step are the library's searched one-step updates."""
    from lightning_unlearn.unlearn.methods.one_step import OneStepMethod

    for name, method in lab.METHODS.items():
        built = _build_lab(name)  # an unknown argument or value of a lab variant raises here
        assert built.one_step == method.one_step, name
        assert built.needs_corrected_labels == method.needs_corrected_labels, name
        assert isinstance(built, OneStepMethod) == method.searches_step, name
    assert lab.METHODS["first_order_removal_retain"].args[-1] == "retain"
    assert _build_lab("first_order_removal_retain").validation_weights == "retain"
    assert _build_lab("first_order_forget").forget_weight == 1.0


def _build_lab(name: str):
    method = lab.METHODS[name]
    config = yaml.safe_load((lab.ROOT / "configs" / "unlearn" / f"{method.config}.yaml").read_text())
    spec = config["model"]["method"]
    prefix = "--model.method.init_args."
    flags = dict(zip(method.args[::2], method.args[1::2], strict=True))
    assert all(k.startswith(prefix) for k in flags), name  # a lab variant only sets its method's arguments
    flags = {k[len(prefix) :]: yaml.safe_load(v) for k, v in flags.items()}  # typed as the command line types them
    return _build(spec | {"init_args": spec.get("init_args", {}) | flags})


def test_every_lab_selection_builds():
    from lightning_unlearn.selection import SelectionStrategy

    for label, spec in lab.SELECTIONS.items():
        spec = json.loads(json.dumps(spec).replace('"{seed}"', "3"))
        assert isinstance(_build(spec), SelectionStrategy), label


def test_removal_scenarios_skip_the_methods_that_replace_labels():
    todo, skipped = lab.rows(seed=2, corrected=False, methods=list(lab.METHODS), selections=list(lab.SELECTIONS))
    keys = {row.key for row in todo}
    for name, method in lab.METHODS.items():
        for label in lab.SELECTIONS:
            key = f"{name} × {label}"
            expected = (method.needs_corrected_labels and "needs corrected labels") or (
                label == "validated" and not method.searches_step and "validated compares searched one-step updates"
            )
            if expected:
                assert skipped[key] == expected and key not in keys
            else:
                assert key in keys and key not in skipped
    # with corrected labels nothing is skipped for that reason
    _, skipped = lab.rows(seed=0, corrected=True, methods=list(lab.METHODS), selections=list(lab.SELECTIONS))
    assert "needs corrected labels" not in skipped.values()


def test_a_request_carries_its_selection_and_the_seed():
    todo, _ = lab.rows(seed=7, corrected=True, methods=["first_order"], selections=["random layer", "top 1 % diagonal"])
    assert [row.key for row in todo] == ["first_order × random layer", "first_order × top 1 % diagonal"]
    for row in todo:
        assert row.config == "first_order_all" and row.args[-2] == "--model.selection"
    assert json.loads(todo[0].args[-1])["init_args"] == {"seed": 7}
    assert json.loads(todo[1].args[-1])["init_args"] == {"fraction": 0.01, "largest": True}


def test_the_table_reads_finished_requests_and_lists_skipped_pairs():
    seed = {
        "kind": "label_flip",
        "before": {"test/acc_attacked": 1.0, "test/acc": 90.0, "forget/acc": 99.0},
        "reference": {"test/acc_attacked": 90.0, "test/acc": 98.0, "forget/acc": 2.0},
        "effect": {"harm": 89.0, "fit": 99.0, "fit_retrained": 2.0, "noise": 3.0, "plain": True, "metric": "x"},
        "retrain_seconds": 10.0,
        "rows": {
            "first_order × last layer": {
                "after": {"test/acc_attacked": 80.0, "test/acc": 97.0, "mia/svc": 12.5, "relearn/auc": 40.0},
                "comparison": {"tow": 0.95},
                "seconds": 2.0,
            }
        },
    }
    results = {"seeds": {"0": seed, "1": seed}, "skipped": {"first_order × saliency top 1 %": "because"}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lab.reproduce, "effect_summary", lambda results: "harm and fit")
        text = lab.table("mnist_label_flip", results)
    line = next(li for li in text.splitlines() if li.startswith("| first_order"))
    assert "80.00 ± 0.00" in line and "0.9500 ± 0.0000" in line and "0.2000 ± 0.0000" in line and "| 2 " in line
    assert "Not applicable: because: first_order × saliency top 1 %." in text


def test_the_forgetting_settings_run_only_methods_that_need_no_corrected_labels():
    """``reproduce.py forgetting``: every row of the clean-forget-set scenarios can run without corrected labels (a row
    that needs them would be refused mid-run), and its selection override names a real strategy."""
    reproduce = lab.reproduce
    for name in ("mnist_classwise", "mnist_random10"):
        setting = reproduce.SETTINGS[name]
        assert setting.group == "forgetting" and lab.SCENARIOS[name] is False
        assert len({row.name for row in setting.rows}) == len(setting.rows)  # each row its own results entry
        for row in setting.rows:
            config = yaml.safe_load((lab.ROOT / "configs" / "unlearn" / f"{row.config}.yaml").read_text())
            assert not _build(config["model"]["method"]).needs_corrected_labels, row.label
            if "--model.selection" in row.args:
                path = row.args[row.args.index("--model.selection") + 1]
                _build({"class_path": path})


def test_the_resnet_scenario_runs_only_when_named_and_matches_its_setting():
    """The ResNet-18 arm's scenario takes hours a seed: a bare ``selection_lab.py`` runs the MNIST scenarios only; the
    ResNet one is the reproduction's 70 % label flip, whose corrected labels the first-order methods need."""
    assert "fashion_resnet18_label_flip_70" in lab.SCENARIOS
    assert "fashion_resnet18_label_flip_70" not in lab.DEFAULT_SCENARIOS
    assert lab.DEFAULT_SCENARIOS == ["mnist_label_flip", "mnist_backdoor", "mnist_classwise", "mnist_random10"]
    setting = lab.reproduce.SETTINGS["fashion_resnet18_label_flip_70"]
    assert setting.group == "resnet" and "label_flip" in setting.overrides
    assert lab.SCENARIOS["fashion_resnet18_label_flip_70"] is True


def test_lr_grid_searches_the_learning_rate_of_iterative_methods_only():
    todo, _ = lab.rows(0, True, ["first_order", "finetune", "ssd"], ["last layer"], lr_grid=True)
    by_method = {row.key.split(" × ")[0]: row.args for row in todo}
    assert by_method["finetune"][-2:] == ("--model.lr_grid", lab.reproduce.LR_GRID)
    for one_step in ("first_order", "ssd"):
        assert "--model.lr_grid" not in by_method[one_step]
    plain, _ = lab.rows(0, True, ["finetune"], ["last layer"])
    assert "--model.lr_grid" not in plain[0].args


def test_the_paired_column_compares_each_seed_with_the_same_methods_last_layer():
    def seed(last: float, other: float) -> dict:
        before = {"test/acc_attacked": 1.0, "test/acc": 90.0, "forget/acc": 99.0}
        reference = {"test/acc_attacked": 90.0, "test/acc": 98.0, "forget/acc": 2.0}
        row = lambda tow: {"after": {"test/acc": 97.0}, "comparison": {"tow": tow}, "seconds": 1.0}  # noqa: E731
        rows = {"ssd × last layer": row(last), "ssd × all parameters": row(other), "finetune × last layer": row(0.1)}
        return {"before": before, "reference": reference, "rows": rows}

    per_seed = [seed(0.90, 0.95), seed(0.80, 0.78), seed(0.50, 0.60)]  # differences +0.05, −0.02, +0.10
    text = lab._paired_vs_last_layer(per_seed, "ssd", "all parameters")
    assert text == "+0.0433 ± 0.0603 (2/3 better)"
    assert lab._paired_vs_last_layer(per_seed, "ssd", "last layer") == "–"
    assert lab._paired_vs_last_layer(per_seed[:1], "ssd", "all parameters") == "–"  # one seed: nothing paired
    assert lab._paired_vs_last_layer(per_seed, "finetune", "all parameters") == "–"  # no such row


def test_a_selection_that_selects_nothing_is_recorded_and_not_retried(tmp_path, monkeypatch):
    """``reproduce.run_seed``: a request whose selection chose no parameter (``EmptySelectionError``, e.g. SSD's
    Fisher ratio in random-sample forgetting) is a measured outcome: kept under ``empty``, the next rows still run,
    and a rerun does not ask again; the lab's table lists it."""
    from types import SimpleNamespace

    from lightning_unlearn.selection import EmptySelectionError

    reproduce = lab.reproduce
    folder = tmp_path / "mnist_random10" / "seed0"
    folder.mkdir(parents=True)
    shared = {"before": {}, "reference": {}, "options": {}, "calibration": None, "effect": {"statement": "x"}}
    (folder / lab.CACHE).write_text(json.dumps(shared | {"rows": {}}))
    monkeypatch.setattr(reproduce, "train", lambda *a, **k: (tmp_path, {"seconds": 1.0}))
    monkeypatch.setattr(
        reproduce, "TrainingRun", SimpleNamespace(from_path=lambda p: SimpleNamespace(profile_path=tmp_path / "none"))
    )
    calls = []

    def fake_unlearn(config, run_dir, *args, **kwargs):
        calls.append(args[-1])
        if "FisherRatio" in args[-1]:
            raise EmptySelectionError("Selection 'fisher_ratio' selected no parameter.")
        return {"after": {"test/acc": 97.0}, "cost": {"seconds": 1.0, "peak_mib": 1.0}, "selection": {}, "method": {}}

    monkeypatch.setattr(reproduce, "unlearn", fake_unlearn)
    todo, _ = lab.rows(0, False, ["ssd"], ["Fisher ratio (SSD, α = 10)", "last layer"])
    setting = reproduce.SETTINGS["mnist_random10"]
    result = reproduce.run_seed("mnist_random10", setting, 0, tmp_path, todo, cache_name=lab.CACHE)
    assert list(result["empty"]) == ["ssd × Fisher ratio (SSD, α = 10)"] and list(result["rows"]) == [
        "ssd × last layer"
    ]
    assert len(calls) == 2
    reproduce.run_seed("mnist_random10", setting, 0, tmp_path, todo, cache_name=lab.CACHE)
    assert len(calls) == 2  # nothing asked again
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reproduce, "effect_summary", lambda results: "gap")
        text = lab.table("mnist_random10", {"seeds": {"0": result | {"kind": "random_sample"}}})
    assert "Selected no parameter (nothing to update" in text and "ssd × Fisher ratio (SSD, α = 10) (seeds 0)" in text


def test_a_recorded_seed_keeps_its_rows_and_is_never_mixed_with_other_models(tmp_path, monkeypatch):
    """``reproduce.run_seed(recorded=...)`` (what the results file holds for the seed, e.g. on a fresh checkout whose
    ``runs/`` is gone): with every requested row recorded nothing is trained; otherwise the models are trained again
    and, when their accuracies match the recorded ones, only the missing rows run and the recorded rows are kept;
    models that differ are refused (their rows would be mixed); ``overwrite`` replaces the recorded seed."""
    from types import SimpleNamespace

    reproduce = lab.reproduce
    now = {"before": {"test/acc": 97.0, "forget/acc": 80.0}, "reference": {"test/acc": 98.0, "forget/acc": 1.0}}
    trained, asked = [], []
    monkeypatch.setattr(reproduce, "train", lambda *a, **k: trained.append(a) or (tmp_path, {"seconds": 1.0}))
    run = SimpleNamespace(
        profile_path=tmp_path / "none",
        datamodule=lambda: SimpleNamespace(spec=SimpleNamespace(kind="random_sample")),
        load_classifier=lambda: SimpleNamespace(net=None),
    )
    monkeypatch.setattr(reproduce, "TrainingRun", SimpleNamespace(from_path=lambda p: run))
    monkeypatch.setattr(reproduce, "evaluate_reference", lambda d, m, o: (o, dict(now["reference"]), None))
    monkeypatch.setattr(reproduce, "evaluate_model", lambda net, m, o: dict(now["before"]))
    monkeypatch.setattr(reproduce, "poison_effect", lambda b, r, k: {"statement": "x"})

    def fake_unlearn(config, run_dir, *args, **kwargs):
        asked.append(args[-1])
        return {"after": {"test/acc": 96.0}, "cost": {"seconds": 1.0, "peak_mib": 1.0}, "selection": {}, "method": {}}

    monkeypatch.setattr(reproduce, "unlearn", fake_unlearn)
    setting = reproduce.SETTINGS["mnist_random10"]
    todo, _ = lab.rows(0, False, ["ssd"], ["last layer", "all parameters"])
    old_row = {"after": {"test/acc": 12.5}}
    recorded = now | {"options": {}, "rows": {"ssd × last layer": old_row}}

    def run_seed(folder: str, recorded: dict, **kwargs):
        return reproduce.run_seed(
            "mnist_random10", setting, 0, tmp_path / folder, todo, cache_name=lab.CACHE, recorded=recorded, **kwargs
        )

    complete = recorded | {"rows": {"ssd × last layer": old_row, "ssd × all parameters": old_row}}
    assert run_seed("a", complete) is complete and not trained and not asked

    result = run_seed("b", recorded)
    assert result["rows"]["ssd × last layer"] is old_row  # kept, not asked again
    assert list(result["rows"]) == ["ssd × last layer", "ssd × all parameters"] and len(asked) == 1
    assert result["machine"]["threads"] >= 1 and result["machine"]["cpu"]  # where this seed's models were trained
    cached = json.loads((tmp_path / "b" / "mnist_random10" / "seed0" / lab.CACHE).read_text())
    assert cached["rows"]["ssd × last layer"] == old_row  # a resumed run keeps them too

    other = recorded | {"before": {"test/acc": 97.5, "forget/acc": 80.0}}
    with pytest.raises(
        reproduce.RecordedSeedMismatchError,
        match="before test/acc: recorded 97.5, now 97.0.*same code, CPU and thread count.*--overwrite",
    ):
        run_seed("c", other)
    assert len(asked) == 1  # nothing ran on the other models
    replaced = run_seed("d", other, overwrite=True)
    assert replaced["before"] == now["before"] and len(replaced["rows"]) == 2 and len(asked) == 3


def test_the_backdoor_reproduction_pairs_sa_with_the_last_layer_when_the_step_sees_the_forget_set():
    """The backdoor's extra rows are the same requests with ``forget_weight`` 1 (own results keys, a method that takes
    it), and the paired table compares them seed by seed like the plain rows (differences computed by hand)."""
    reproduce = lab.reproduce
    rows = reproduce.SETTINGS["mnist_backdoor"].rows
    assert len({row.name for row in rows}) == len(rows)
    for row in reproduce.FORGET_ROWS:
        assert row in rows and row.args[-2:] == reproduce.FORGET_WEIGHT
        config = yaml.safe_load((lab.ROOT / "configs" / "unlearn" / f"{row.config}.yaml").read_text())
        method = config["model"]["method"]
        built = _build(method | {"init_args": method.get("init_args", {}) | {"forget_weight": 1.0}})
        assert built.forget_weight == 1.0 and built.needs_corrected_labels
    assert not any(row in reproduce.SETTINGS["mnist_label_flip"].rows for row in reproduce.FORGET_ROWS)

    def seed(sa: float, last: float) -> dict:
        row = lambda tow, asr: {"after": {"test/asr": asr}, "comparison": {"tow": tow}, "seconds": 1.0}  # noqa: E731
        rows = {"sa_first_order_forget": row(sa, 5.0), "first_order_last_layer_forget": row(last, 9.0)}
        return {"before": {}, "reference": {}, "kind": "backdoor", "rows": rows}

    lines = reproduce.paired_comparisons({"0": seed(0.9, 0.8), "1": seed(0.7, 0.75)}, "backdoor")
    table = "\n".join(lines)
    tow = next(li for li in table.splitlines() if "− first_order_last_layer_forget" in li and "ToW" in li)
    asr = next(li for li in table.splitlines() if "− first_order_last_layer_forget" in li and "ASR" in li)
    assert "sa_first_order_forget − first_order_last_layer_forget" in tow
    assert "0.0250 ± 0.1061" in tow and "1/2 seeds" in tow  # +0.10 and −0.05
    assert "-4.00 ± 0.00" in asr and "2/2 seeds" in asr  # a lower ASR is better


def test_the_attacked_metric_is_named_after_what_each_kind_measures():
    """Column headers name the metric ``ATTACKED_METRICS`` picks for the kind (not "attacked class" for all), for the
    metric itself and for its % restored."""
    from lightning_unlearn.evaluation.suite import ATTACKED_METRICS

    metric_words = {"test/asr": "ASR", "test/acc": "test", "test/acc_attacked": "class", "forget/acc": "forget"}
    for kind, (metric, _, _) in ATTACKED_METRICS.items():
        assert metric_words[metric] in lab.reproduce._header(kind, "attacked"), kind
        assert lab.reproduce._header(kind, "restored") == f"% restored ({metric_words[metric]})", kind
    assert lab.reproduce._header("label_flip", "attacked") == "attacked class %"


def test_the_effect_summary_counts_harm_above_the_noise_apart_from_a_memorised_fit():
    """A noise seed whose test-accuracy harm is below the noise but whose fit is memorised is not counted as harm
    above the noise; the summary says what there is to unlearn in it."""
    from lightning_unlearn.evaluation.suite import poison_effect

    def seed(poisoned: float, retrained: float) -> dict:
        before = {"test/acc": poisoned, "forget/acc": 83.0}
        reference = {"test/acc": retrained, "forget/acc": 0.1}
        return {"kind": "untargeted", "effect": poison_effect(before, reference, "untargeted")}

    results = {"0": seed(95.0, 99.0), "1": seed(96.0, 98.7)}  # harms 4.0 and 2.7 points, both memorised (82.9)
    assert all(r["effect"]["plain"] for r in results.values())
    text = lab.reproduce.effect_summary(results)
    assert "exceeds the noise level (3 points) in 1/2 seeds" in text
    assert "In 1 seed(s) below it the memorised poison is what there is to unlearn (fit 82.90" in text
    assert "Where neither" not in text


def test_reproduce_writes_only_the_seed_it_ran_into_a_file_another_run_wrote_meanwhile(tmp_path, monkeypatch):
    """``reproduce.py SETTING --seeds N`` reads the results file again after its seed's hour of work (another seed's run
    may have written it meanwhile) and sets only its own seed; its closing table rebuild writes tables, never another
    setting's results file."""
    reproduce = lab.reproduce
    monkeypatch.setattr(reproduce, "harm_table", lambda current, legacy: "")
    monkeypatch.setattr(reproduce, "section", lambda name, results: f"{name}: seeds {sorted(results)}\n")
    reproduce.write_results("mnist_noise", {"0": {"rows": {}}}, tmp_path)
    other = tmp_path / "mnist_backdoor.json"  # written by hand, as no run of this code would write it
    other.write_text(json.dumps({"setting": "mnist_backdoor", "seeds": {"3": {"rows": {}}}}))
    untouched = other.read_bytes()

    def run_seed(name, setting, seed, runs, rows, overlay, recorded=None, overwrite=False):
        assert recorded is None  # seed 1 is not in the file yet
        reproduce.write_results(name, reproduce.load_results(name, tmp_path) | {"2": {"by": "other run"}}, tmp_path)
        return {"by": "this run"}

    monkeypatch.setattr(reproduce, "run_seed", run_seed)
    reproduce.main(["mnist_noise", "--seeds", "1", "--results", str(tmp_path), "--runs", str(tmp_path / "runs")])
    seeds = reproduce.load_results("mnist_noise", tmp_path)
    assert seeds == {"0": {"rows": {}}, "2": {"by": "other run"}, "1": {"by": "this run"}}
    assert other.read_bytes() == untouched
    assert (tmp_path / "mnist_noise.md").read_text() == "mnist_noise: seeds ['0', '1', '2']\n"
    assert (tmp_path / "mnist_backdoor.md").read_text() == "mnist_backdoor: seeds ['3']\n"


def test_the_lab_writes_only_the_seed_it_ran_into_a_file_another_run_wrote_meanwhile(tmp_path, monkeypatch):
    """``selection_lab.py SCENARIO --seeds N`` reads its results file again before it records seed N: a seed another
    run wrote meanwhile is kept."""
    path = tmp_path / "mnist_random10.json"
    path.write_text(json.dumps({"scenario": "mnist_random10", "seeds": {"0": {"rows": {}}}}))

    def run_seed(name, setting, seed, runs, rows, cache_name, recorded=None, overwrite=False):
        assert recorded is None  # seed 1 is not in the file yet
        other = json.loads(path.read_text())
        path.write_text(json.dumps(other | {"seeds": other["seeds"] | {"2": {"by": "other run"}}}))
        return {"by": "this run"}

    monkeypatch.setattr(lab.reproduce, "run_seed", run_seed)
    monkeypatch.setattr(lab, "table", lambda scenario, results: f"{scenario}: seeds {sorted(results['seeds'])}\n")
    argv = ["mnist_random10", "--seeds", "1", "--methods", "ssd", "--selections", "last layer"]
    lab.main([*argv, "--results", str(tmp_path), "--runs", str(tmp_path / "runs")])
    seeds = json.loads(path.read_text())["seeds"]
    assert seeds == {"0": {"rows": {}}, "2": {"by": "other run"}, "1": {"by": "this run"}}
    assert (tmp_path / "mnist_random10.md").read_text() == "mnist_random10: seeds ['0', '1', '2']\n"


@pytest.mark.parametrize("name", list(lab.reproduce.SETTINGS))
def test_every_reproduction_setting_parses_into_the_poison_its_label_states(name, capsys):
    """Each setting's configs and overrides are a valid training command (the ResNet-18 untargeted settings were not:
    a chain of benchmark runs stopped there), and the poison they configure is the one the setting's label names."""
    from lightning_unlearn.__main__ import main
    from lightning_unlearn.experiment import config_path

    setting = lab.reproduce.SETTINGS[name]
    configs = [arg for config in setting.configs for arg in ("-c", str(config_path(config)))]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "fit", *configs, *setting.overrides, "--print_config"])
    assert exit_info.value.code in (0, None)
    poison = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["poison"]
    count = f"{poison['count']:,}" if poison.get("count") else None
    words = {
        "label_flip": ("label flip",),
        "backdoor": ("backdoor",),
        "classwise": ("class-wise",),
        "random_sample": ("random-sample",),
        "targeted": ("targeted: 2,500 of class 9 → random other class",),
        "untargeted": ("untargeted: ", "random wrong label"),
    }[poison["kind"]]
    assert any(word in setting.label for word in words), (poison, setting.label)
    assert count is None or count in setting.label, (count, setting.label)


def test_the_paper_layout_of_a_resnet_backdoor_shows_its_asr_and_every_row_of_the_setting():
    """A backdoor's attacked metric is the ASR, not a class: the paper's layout shows it beside the overall accuracy,
    and the setting's extra rows (the forget-weighted steps, which are the ones that remove a trigger) are listed."""
    reproduce = lab.reproduce
    setting = reproduce.SETTINGS["fashion_resnet18_backdoor"]

    def metrics(test: float, asr: float) -> dict:
        return {"test/acc": test, "test/asr": asr, "forget/acc": asr, "forget_true/acc": 100.0 - asr}

    rows = {
        row.name: {"after": metrics(80.0 + i, 10.0 * i), "comparison": {"tow": 0.5}, "seconds": 1.0}
        for i, row in enumerate(setting.rows)
    }
    seed = {"before": metrics(88.0, 99.0), "reference": metrics(89.0, 2.0), "kind": "backdoor", "rows": rows}
    text = reproduce.paper_table("fashion_resnet18_backdoor", {"0": seed, "1": seed})
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "ASR %", "overall %", "paper (CIFAR-10)"]
    for i, row in enumerate(setting.rows):
        line = next(li for li in text.splitlines() if li.startswith(f"| {row.label} "))
        assert f"{10.0 * i:.2f} ± 0.00" in line and f"{80.0 + i:.2f} ± 0.00" in line, line
    assert any(row.name == "sa_first_order_forget" for row in setting.rows)
    assert "| poisoned model (before)" in text and "99.00 ± 0.00" in text
    assert reproduce.RETRAIN_LABEL in text and "2.00 ± 0.00" in text
