"""The installable package: a built wheel ships every config of ``configs/`` and finds it outside the repository.

The wheel is built from a copy of the source tree (no ``build/`` or ``*.egg-info`` left in the checkout), without build
isolation (no download), installed with ``pip install --target`` into a temporary folder (torch and the other
dependencies come from the test's environment) and used from a working directory outside the repository.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPO_CONFIGS = ROOT / "configs"
#: Top-level entries of the checkout that are no input of the build (environments, runs, data, build outputs, VCS).
NOT_SOURCE = {".git", ".venv", "runs", "data", "build", "dist", ".pytest_cache", ".ruff_cache", "tests", "benchmarks"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    top = Path(directory).resolve() == ROOT
    return {n for n in names if n == "__pycache__" or (top and (n in NOT_SOURCE or n.endswith(".egg-info")))}


def repo_configs() -> dict[str, bytes]:
    """The repository's configs by name relative to ``configs/`` (``debug.yaml``, ``unlearn/x.yaml``)."""
    return {p.relative_to(REPO_CONFIGS).as_posix(): p.read_bytes() for p in sorted(REPO_CONFIGS.rglob("*.yaml"))}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(target, env, elsewhere, build_log)``: the wheel installed into ``target``; ``env`` puts it on the path."""
    work = tmp_path_factory.mktemp("packaging")
    source, wheels, target, elsewhere = work / "source", work / "wheels", work / "site", work / "elsewhere"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_ignore)
    elsewhere.mkdir()
    env = os.environ | {"OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300,
    )  # fmt: skip
    build_log = build.stdout + build.stderr
    assert build.returncode == 0, build_log
    (wheel,) = wheels.glob("lightning_unlearn-*.whl")
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    return target, env | {"PYTHONPATH": str(target)}, elsewhere, build_log


def test_wheel_builds_without_deprecation_warnings(installed):
    *_, build_log = installed
    flagged = [line for line in build_log.splitlines() if "deprecat" in line.lower() or "BuildBackendWarning" in line]
    assert not flagged, "\n".join(flagged)


def test_installed_wheel_ships_and_loads_every_config(installed):
    """Outside the repository, the installed package lists the repository's configs (same names, same bytes), finds
    each with the lookup the demo and the benchmarks use, and the CLI parses each (``--print_config``)."""
    target, env, elsewhere, _ = installed
    script = textwrap.dedent(
        """
        import contextlib, io, json
        import yaml
        import lightning_unlearn
        from lightning_unlearn.__main__ import main
        from lightning_unlearn.experiment import CONFIGS, available_configs, config_path

        report = {"package": lightning_unlearn.__file__, "configs": str(CONFIGS), "files": {}, "parsed": {}}
        for name in available_configs():
            path = config_path(name)
            report["files"][name] = path.read_text()
            assert isinstance(yaml.safe_load(report["files"][name]), dict), name
            if name.startswith("unlearn/"):
                argv = ["unlearn", "-c", str(path), "--model.run", "RUN", "--print_config"]
            elif "model" not in yaml.safe_load(report["files"][name]):  # an overlay (debug, retrain): on a setting
                argv = ["train", "fit", "-c", str(config_path("mnist_cnn_targeted")), "-c", str(path), "--print_config"]
            else:
                argv = ["train", "fit", "-c", str(path), "--print_config"]
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                try:
                    main(argv)
                except SystemExit as exit:
                    assert exit.code in (0, None), (name, exit.code)
            report["parsed"][name] = printed.getvalue()
        try:
            config_path("no_such_config")
        except FileNotFoundError as error:
            report["missing"] = str(error)
        print("REPORT " + json.dumps(report))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line.removeprefix("REPORT "))

    # the installed copy, not the checkout, was imported and read
    assert Path(report["package"]).is_relative_to(target), report["package"]
    assert Path(report["configs"]) == target / "lightning_unlearn" / "configs"
    assert not (target / "lightning_unlearn" / "configs").is_symlink()  # real files in the wheel, no link to the repo

    expected = repo_configs()
    assert len(expected) >= 20 and "unlearn/sa_first_order.yaml" in expected  # not vacuous: both folders are read
    assert sorted(report["files"]) == sorted(expected)
    assert {name: text.encode() for name, text in report["files"].items()} == expected
    for name, printed in report["parsed"].items():
        marker = "class_path: lightning_unlearn.unlearn." if name.startswith("unlearn/") else "architecture:"
        assert marker in printed, (name, printed[-2000:])
    assert "available: [" in report["missing"] and "'mnist_cnn_label_flip.yaml'" in report["missing"]


def test_installed_console_script_runs_outside_the_repository(installed):
    target, env, elsewhere, _ = installed
    script = target / "bin" / "lightning-unlearn"
    assert script.is_file()
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "usage: lightning-unlearn" in run.stdout and "demo" in run.stdout
