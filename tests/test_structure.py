"""The repository's shape: shared code names no pipeline, every pipeline uses the same module
names, every registered dataset follows the stage contract, the README's layout block is true."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import ROOT
from utils.datasets import StageDataset
from utils.registry import DATASETS, available_pipelines, load_pipeline

PIPELINES = [p for p in available_pipelines() if (ROOT / "utils" / p).is_dir()]
# Role modules every pipeline package has (utils/<pipeline>/), and those a torch stage adds.
REQUIRED = {"__init__", "layout", "preprocess", "folds", "synthetic", "metric", "pipeline"}
TORCH_STAGE = {"datasets", "losses"}


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_shared_code_names_no_pipeline():
    shared = [ROOT / "train.py", ROOT / "inference.py", *sorted((ROOT / "utils").glob("*.py"))]
    shared += sorted((ROOT / "models").glob("*.py"))
    for path in shared:
        text = path.read_text().lower()
        for name in PIPELINES:
            assert not re.search(rf"\b{name}\b", text), f"{path.relative_to(ROOT)} names {name}"


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_pipeline_has_the_role_modules(pipeline):
    package = ROOT / "utils" / pipeline
    modules = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").is_file()
    }
    assert modules >= REQUIRED, sorted(REQUIRED - modules)
    if (ROOT / "config" / pipeline / "base.yaml").read_text().find("dataset:") >= 0:
        assert modules >= TORCH_STAGE, sorted(TORCH_STAGE - modules)
    hooks = load_pipeline(pipeline)
    if hooks.after_oof is not None:
        assert hooks.after_oof.__module__ == f"utils.{pipeline}.report"
    if hooks.test is not None:
        assert hooks.test.__module__ == f"utils.{pipeline}.submit"
    assert hooks.preprocess.__module__ == f"utils.{pipeline}.preprocess"


def test_every_registered_dataset_follows_the_stage_contract():
    for name in PIPELINES:
        load_pipeline(name)
    assert DATASETS.names()
    for name in DATASETS.names():
        dataset = DATASETS.get(name)
        assert issubclass(dataset, StageDataset) and dataset.key_columns, name
    with pytest.raises(TypeError, match="must derive from StageDataset"):
        DATASETS.register("not_a_stage")(dict)


def test_train_py_stays_short():
    lines = [line for line in (ROOT / "train.py").read_text().splitlines() if line.strip()]
    assert len(lines) <= 300


def layout_block() -> list[str]:
    """The lines of the README's fenced block under '## Layout'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1]
    return section.split("```", 2)[1].splitlines()[1:]


def test_readme_layout_block_matches_git_ls_files():
    """Each line ``dir/  entry entry ...  # comment`` lists exactly the tracked entries of that
    folder (files, and sub-folders with a slash; package markers ``__init__.py`` aside); the
    line of ``./`` the top level's."""
    files = [f for f in tracked() if not f.endswith("__init__.py")]
    children: dict[str, set[str]] = {}
    for f in files:
        parts = f.split("/")
        for depth in range(len(parts)):
            folder = "/".join(parts[:depth]) + "/" if depth else "./"
            entry = parts[depth] + ("/" if depth < len(parts) - 1 else "")
            children.setdefault(folder, set()).add(entry)
    described = {}
    for line in layout_block():
        tokens = line.split("#", 1)[0].split()
        if tokens:
            described.setdefault(tokens[0], set()).update(tokens[1:])
    assert "./" in described, "the layout block lists the top level on a './' line"
    for folder, entries in described.items():
        assert folder in children, f"README layout names {folder}, which git does not track"
        assert entries == children[folder], (
            f"{folder}: README lists {sorted(entries - children[folder])} that git does not "
            f"track and misses {sorted(children[folder] - entries)}"
        )
    for entry in children["./"]:
        if entry.endswith("/") and entry not in {".ci/"}:
            assert entry in described, f"README layout has no line for {entry}"


def test_no_document_cites_a_file_outside_the_repository():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "../shared" not in text and "shared/reference" not in text, path.name
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith("http"):
                assert (path.parent / target).exists(), (
                    f"{path.name} links {target}, which is missing"
                )
