"""The lm-eval task rankwise ships (pydoc_cloze) is found and read from any directory without a task directory, its
files are installed with the package, and a ``--task-dir`` is read relative to the current directory."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest

from rankwise.eval.tasks import PACKAGED_TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_task_found_and_read_from_any_directory(tmp_path, monkeypatch):
    """From an empty directory, no task directory given: lm-eval knows pydoc_cloze, and its documents are the
    shipped items, read offline."""
    pytest.importorskip("lm_eval")
    from rankwise.eval.tasks import check_tasks, task_manager

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = task_manager()
    assert check_tasks(["pydoc_cloze"], manager) == ["pydoc_cloze"]
    if hasattr(manager, "load"):  # newer lm-eval (load_task_or_group deprecated)
        task = manager.load(["pydoc_cloze"])["tasks"]["pydoc_cloze"]
    else:
        task = manager.load_task_or_group(["pydoc_cloze"])["pydoc_cloze"]
    shipped = [json.loads(line) for line in (PACKAGED_TASKS / "pydoc_cloze.jsonl").read_text().splitlines()]
    docs = list(task.test_docs())
    assert len(docs) == len(shipped) == 80
    assert docs == shipped
    assert all(len(doc["choices"]) == 4 and 0 <= doc["label"] < 4 for doc in docs)
    assert list(tmp_path.iterdir()) == []  # nothing written to the current directory


def test_task_dir_is_relative_to_the_current_directory_and_indexed_once(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from rankwise.eval.tasks import task_manager

    (tmp_path / "work" / "tasks").mkdir(parents=True)
    (tmp_path / "work" / "tasks" / "mine.yaml").write_text((PACKAGED_TASKS / "pydoc_cloze.yaml").read_text()
                                                            .replace("task: pydoc_cloze", "task: mine"))
    (tmp_path / "a-file").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        task_manager(["tasks"])
    assert str(info.value) == (f"--task-dir 'tasks' is not a directory of lm-eval task YAML files "
                               f"({tmp_path / 'tasks'} does not exist)")
    with pytest.raises(ValueError, match=r"^--task-dir 'a-file' is not a directory of lm-eval task YAML files "
                                         r"\(.*a-file is a file\)$"):
        task_manager(["a-file"])
    monkeypatch.chdir(tmp_path / "work")
    manager = task_manager(["tasks"])
    assert {"mine", "pydoc_cloze"} <= set(manager.all_subtasks)  # the task directory's and the shipped one
    assert task_manager(["tasks"]) is manager  # indexed once while the task files stay as they were
    (tmp_path / "work" / "tasks" / "other.yaml").write_text((PACKAGED_TASKS / "pydoc_cloze.yaml").read_text()
                                                             .replace("task: pydoc_cloze", "task: other"))
    fresh = task_manager(["tasks"])  # a file added: indexed again
    assert fresh is not manager and {"mine", "other"} <= set(fresh.all_subtasks)


def test_packaged_task_files_are_package_data():
    """Every file of the shipped tasks is a module or matches pyproject.toml's package-data (else pip install
    leaves it out and the task is unknown or unreadable once installed)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package = ".".join(PACKAGED_TASKS.relative_to(ROOT).parts)
    patterns = config["tool"]["setuptools"]["package-data"][package]
    files = [f for f in PACKAGED_TASKS.iterdir() if f.is_file() and f.suffix not in (".py", ".pyc")]
    assert {f.suffix for f in files} >= {".yaml", ".jsonl"}
    for file in files:
        assert any(fnmatch.fnmatch(file.name, pattern) for pattern in patterns), file.name
    assert (PACKAGED_TASKS / "__init__.py").is_file()  # a package: found by setuptools, its data installed
