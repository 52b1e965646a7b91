"""The documentation site (mkdocs.yml, docs/) builds in strict mode, and a broken link fails that build.

`make docs` runs the same build. The packages are the `docs` extra, which `make install` (so `make test`, so CI)
installs: without them these tests fail, they do not skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _require_docs_packages() -> None:
    missing = []
    for name in DOCS_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    if missing:
        pytest.fail(f"the documentation packages are not installed ({', '.join(missing)}): pip install -e '.[docs]'")


def _build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    _require_docs_packages()
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # material's notice about its successor, not a warning of ours
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_site_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    result = _build(ROOT / "mkdocs.yml", site, ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the strict build failed:\n{output}"
    assert (site / "index.html").is_file()
    api = site / "api" / "index.html"
    assert api.is_file(), sorted(p.name for p in site.iterdir())
    assert "UnlearnModule" in api.read_text(encoding="utf-8")


def test_a_broken_link_fails_the_strict_build(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    # mkdocstrings reads the package from the repository root: `paths: [.]` names it relative to the config file
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "paths: [.]" in config
    (copy / "mkdocs.yml").write_text(config.replace("paths: [.]", f"paths: [{json.dumps(str(ROOT))}]"))
    with open(copy / "docs" / "index.md", "a", encoding="utf-8") as index:
        index.write("\nSee [the missing page](no-such-page.md).\n")

    result = _build(copy / "mkdocs.yml", tmp_path / "site", copy)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"the strict build passed with a broken link:\n{output}"
    assert "no-such-page.md" in output, output
