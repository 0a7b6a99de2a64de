"""Zero- or few-shot task accuracy through lm-evaluation-harness (the optional ``rankwise[eval]`` extra).

lm-eval does the work: rankwise hands it the model object it already holds (dense, compressed or healed; a
:class:`~rankwise.nn.LowRankLinear` model is an ordinary ``PreTrainedModel`` to lm-eval's ``HFLM``), checks the task
names first (an unknown name lists close matches) and returns each task's metrics. The standard tasks (arc_easy,
hellaswag, piqa, winogrande ...) download their data from the Hugging Face hub. The tasks shipped in
``rankwise/eval/lm_eval_tasks`` (``pydoc_cloze``) are always indexed and need no network. A local task is a YAML file
in a directory passed as ``include`` (``dataset_path: json`` with ``data_files`` pointing at a local file needs no
network; a relative ``data_files`` path is read from the current directory, a relative ``include`` too).

lm-eval's own output is kept out of rankwise's (see :func:`_quiet`): its log messages below ERROR, its tqdm bars and
the ``fatal: not a git repository`` that git prints when lm-eval records a commit hash outside a repository. Progress
is rankwise's: one step per task name.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from rankwise._errors import first_line
from rankwise.progress import progress_bar

# Where lm-eval's stderr goes while it runs: opened once and never closed, so a handler or bar a library creates
# meanwhile never writes to a closed file later.
_DEVNULL = open(os.devnull, "w")  # noqa: SIM115


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("--tasks needs lm-evaluation-harness: pip install 'rankwise[eval]'") from None
    return lm_eval, HFLM, TaskManager


PACKAGED_TASKS = Path(__file__).with_name("lm_eval_tasks")  # the tasks rankwise ships (pydoc_cloze)


def task_manager(include: Sequence[str | Path] = ()) -> Any:
    """lm-eval's task index: its own tasks, those rankwise ships (:data:`PACKAGED_TASKS`) and the task YAML files
    under each ``include`` directory (relative to the current directory; a task there overrides one of the same name).

    Indexing reads every YAML file lm-eval ships (about 15 s on 2 CPU cores), so an index is kept for the process and
    handed out again while the same directories hold the same files (path, size and modification time of each file
    under ``include`` and :data:`PACKAGED_TASKS`): evaluating a dense and a compressed model, or several
    checkpoints, indexes once. A file added, removed or edited there gives a fresh index; a template that a task
    includes from outside those directories is not watched.

    Raises:
        ValueError: an ``include`` that is not a directory, or a YAML file under it that does not parse (lm-eval
            would skip it silently, and its task would then be reported unknown).
    """
    _, _, TaskManager = _lm_eval()
    # absolute: lm-eval reads a task's YAML only when the task runs, by then perhaps from another directory
    dirs = [Path(path).absolute() for path in include]
    for path, absolute in zip(include, dirs, strict=True):
        if not absolute.is_dir():
            why = "is a file" if absolute.exists() else "does not exist"
            raise ValueError(f"--task-dir {str(path)!r} is not a directory of lm-eval task YAML files ({absolute} "
                             f"{why})")
    files = {path: _task_files(path) for path in (*include, PACKAGED_TASKS)}  # named as the user did
    key = (tuple(map(str, dirs)), tuple((str(file), *_stamp(file)) for found in files.values() for file in found))
    manager = _INDEXES.get(key)
    if manager is None:
        for path in include:
            for file in files[path]:
                if file.suffix == ".yaml":  # the files lm-eval indexes (the others may be templates they include)
                    check_yaml(file)
        manager = TaskManager(include_path=[str(PACKAGED_TASKS), *map(str, dirs)])
        _INDEXES.clear()  # one index at a time: each holds every task's configuration
        _INDEXES[key] = manager
    return manager


_INDEXES: dict[tuple, Any] = {}  # the task index of this process, by its directories and their files


def _task_files(directory: str | Path) -> list[Path]:
    """The files under ``directory`` that lm-eval's index may read: its YAML files and whatever they include
    (templates are often named without ``.yaml``); not those in the directories lm-eval skips."""
    return [file for file in sorted(Path(directory).glob("**/*"))
            if file.is_file() and not _IGNORED_DIRS.intersection(file.parts)]


def _stamp(file: Path) -> tuple[int, int]:
    info = file.stat()
    return info.st_size, info.st_mtime_ns


_IGNORED_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints"})  # skipped by lm-eval's task index


def check_yaml(file: Path) -> None:
    """Refuse a task file that is not YAML, naming the file and where the parser stopped. Only the syntax is
    checked: tags such as lm-eval's ``!function`` are left to lm-eval."""
    import yaml

    try:
        with file.open("rb") as fh:
            yaml.compose(fh, Loader=yaml.SafeLoader)  # one document, tags unresolved (what lm-eval's loader parses)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = err.problem or first_line(err)
        if err.context and problem.startswith("but "):  # "expected a single document ..., but found another"
            problem = f"{err.context}, {problem}"
        raise ValueError(f"{file} is not valid YAML ({where}{problem})") from None
    except yaml.YAMLError as err:  # bytes that are not text, control characters
        raise ValueError(f"{file} is not valid YAML ({first_line(err)})") from None


def check_tasks(names: Sequence[str], manager: Any) -> list[str]:
    """``names`` if lm-eval knows each (a task, group or tag); otherwise ``ValueError`` listing close matches."""
    if not names:
        raise ValueError("--tasks is empty: give lm-eval task names, e.g. arc_easy,hellaswag")
    known = set(manager.all_subtasks) | set(manager.all_groups) | set(manager.all_tags)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else "see `lm-eval ls tasks` for the list"
            raise ValueError(f"unknown lm-eval task {name!r}; {hint}")
    return list(names)


def evaluate_tasks(model: nn.Module, tokenizer: Any, names: Sequence[str], *, include: Sequence[str | Path] = (),
                   batch_size: int = 8, limit: int | None = None, num_fewshot: int | None = None,
                   seed: int = 1234, manager: Any = None, progress: bool = False
                   ) -> dict[str, dict[str, float | None]]:
    """Run lm-eval ``names`` on ``model`` (already loaded, on its device) and return ``{task: {metric: value}}``.

    Args:
        model: a Hugging Face causal LM, dense or compressed.
        tokenizer: its tokenizer.
        names: lm-eval task, group or tag names.
        include: directories with extra task YAML files (local tasks).
        batch_size: requests per forward pass.
        limit: at most this many documents per task (for a quick look; the accuracy is then a sample's).
        num_fewshot: examples in each prompt (default: the task's own setting, usually 0).
        seed: lm-eval's Python, NumPy, torch and few-shot seeds (the same seed, the same result).
        manager: a :func:`task_manager` already built (indexing the tasks takes seconds); default: built here.
        progress: show progress, one step per name (lm-eval's own bars are never shown).

    Each name is run by its own lm-eval call, seeded afresh: a task's result does not depend on the other names
    asked for. Metrics are lm-eval's names, with the filter kept only where it is not the default (``acc``,
    ``acc_norm``, ``acc_stderr``, ``exact_match,strict-match`` ...); a value lm-eval cannot compute (a standard error
    over one document) is ``None``. The model's train/eval mode, the tokenizer and the logging levels are left as
    they were.
    """
    lm_eval, HFLM, _ = _lm_eval()
    manager = manager if manager is not None else task_manager(include)
    check_tasks(names, manager)
    was_training = model.training
    output: dict[str, Any] = {}
    try:
        with _quiet():
            # HFLM may give the tokenizer a pad token: a copy keeps the caller's unchanged
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        for name in progress_bar(list(dict.fromkeys(names)), "lm-eval tasks", enabled=progress):
            with _quiet():  # inside the loop: rankwise's progress lines come between two tasks, not hidden
                run = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                              numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed, bootstrap_iters=1000)
            output.update(run["results"])
    finally:
        model.train(was_training)
    results: dict[str, dict[str, float | None]] = {}
    for task, metrics in output.items():
        values: dict[str, float | None] = {}
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            values[metric if filt == "none" else key] = float(value) if math.isfinite(value) else None
        if values:
            results[task] = values
    return results


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's own output off for the duration, each source where it starts:

    - its loggers (``lm-eval``, older versions; ``lm_eval``) at ERROR; an error (a local task's ``doc_to_choice``
      that returns no list ...) is still shown, on stderr as it was before the redirect below when no handler is
      configured (logging's last resort would write it to the redirected one);
    - ``sys.stderr`` to ``os.devnull``: where its tqdm bars (and those of ``datasets`` while it reads a task's data)
      are drawn; lm-eval has no switch for all of them (``disable_tqdm`` reaches only the model's request loops, not
      the task's request building), and ``TQDM_DISABLE`` is read once, when tqdm is imported (long before). Python
      warnings in these calls are dropped with them; errors still come as exceptions;
    - its ``get_git_commit_hash``, which runs ``git describe`` with git's stderr on the process's own (file
      descriptor 2, out of ``sys.stderr``'s reach): outside a git repository git prints ``fatal: not a git
      repository``. The hash (of whatever repository the current directory is in, not of the model) is not used
      here, so the lookup is skipped; git has no setting that keeps it quiet, and ``GIT_DIR`` set to a missing
      path only changes the message. An lm-eval without this function is left as it is.
    """
    import unittest.mock

    from lm_eval import evaluator

    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval")]
    levels = [logger.level for logger in loggers]
    with contextlib.ExitStack() as stack:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(logging.ERROR)
            stack.callback(logger.setLevel, level)
            if not logger.hasHandlers():
                handler = logging.StreamHandler(sys.stderr)
                logger.addHandler(handler)
                stack.callback(logger.removeHandler, handler)
        stack.enter_context(contextlib.redirect_stderr(_DEVNULL))
        if hasattr(evaluator, "get_git_commit_hash"):
            stack.enter_context(unittest.mock.patch.object(evaluator, "get_git_commit_hash", lambda: None))
        yield


def describe(results: dict[str, dict[str, float | None]]) -> str:
    """One line per task: its accuracies (with standard errors where lm-eval gives them)."""
    lines = []
    for task, metrics in results.items():
        parts = []
        for key in ("acc", "acc_norm", "exact_match"):
            if metrics.get(key) is not None:
                err = metrics.get(f"{key}_stderr")
                parts.append(f"{key} {metrics[key]:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
        parts = parts or [f"{k} {v:.4g}" for k, v in metrics.items() if v is not None]
        lines.append(f"{task}: {', '.join(parts)}")
    return "\n".join(lines)
