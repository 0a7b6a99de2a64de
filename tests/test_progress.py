"""Progress that works in logs: plain lines off a terminal (at most one per RANKWISE_PROGRESS_SECONDS, one at the
end, none for a stage that fails), rich bars with an ETA on a terminal, nothing when disabled; and lm-eval's own
output (tqdm bars, git's complaint outside a repository) kept out of ``rankwise eval --tasks``."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from rankwise.progress import SECONDS_VARIABLE, progress_bar, report_seconds, step_bar

LINE = re.compile(r"^stage: (\d+)/5 \((\d+)%\) (\d\d):(\d\d) elapsed, ETA (\d\d):(\d\d)$")
END = re.compile(r"^stage: 5/5 \(100%\) \d\d:\d\d elapsed, done$")


def test_off_a_terminal_a_line_per_item_with_interval_zero(capsys, monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "0")
    assert list(progress_bar(range(5), "stage")) == [0, 1, 2, 3, 4]
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 5, err  # one per item; the last item's line is the end line
    for done, line in enumerate(lines[:4], start=1):
        match = LINE.match(line)
        assert match is not None, line
        assert int(match[1]) == done and int(match[2]) == 20 * done
    assert END.match(lines[4]), lines[4]


def test_off_a_terminal_a_long_interval_prints_only_the_end_line(capsys, monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "1000")
    assert list(progress_bar(range(5), "stage")) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and END.match(lines[0]), lines


def test_off_a_terminal_the_default_interval_is_thirty_seconds(capsys, monkeypatch):
    monkeypatch.delenv(SECONDS_VARIABLE, raising=False)
    assert report_seconds() == 30.0
    list(progress_bar(range(5), "stage"))
    assert END.match(capsys.readouterr().err)


def test_an_unknown_total_shows_the_count_and_no_eta(capsys, monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "0")
    assert list(progress_bar(iter("abc"), "letters")) == ["a", "b", "c"]
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r"\d\d:\d\d", "mm:ss", line) for line in lines] == [
        "letters: 1 mm:ss elapsed", "letters: 2 mm:ss elapsed", "letters: 3 mm:ss elapsed, done"]


def test_a_stage_that_fails_prints_no_end_line(capsys, monkeypatch):
    """A fast failure prints nothing but its error: the CLI's one `error: ...` line stays alone."""
    monkeypatch.setenv(SECONDS_VARIABLE, "1000")
    with pytest.raises(RuntimeError, match="boom"):
        for i in progress_bar(range(5), "stage"):
            if i == 2:
                raise RuntimeError("boom")
    assert capsys.readouterr().err == ""


def test_disabled_is_silent(capsys, monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "not read when disabled")
    assert list(progress_bar(range(5), "stage", enabled=False)) == [0, 1, 2, 3, 4]
    with step_bar("train", 3, enabled=False) as bar:
        for step in (1, 2, 3):
            bar.update(step, loss=1.0)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "30s"])
def test_a_bad_interval_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(SECONDS_VARIABLE, value)
    with pytest.raises(ValueError, match=rf"^RANKWISE_PROGRESS_SECONDS={value!r} is not valid; .*a number >= 0") as err:
        next(progress_bar(range(5), "stage"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="RANKWISE_PROGRESS_SECONDS"):
        step_bar("train", 3).__enter__()


@pytest.mark.parametrize("value,seconds", [("0", 0.0), (" 2.5 ", 2.5), ("", 30.0)])
def test_interval_values(monkeypatch, value, seconds):
    monkeypatch.setenv(SECONDS_VARIABLE, value)
    assert report_seconds() == seconds


def test_step_bar_lines_carry_the_latest_metrics(monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "0")
    log = io.StringIO()  # a console on a file that is not a terminal: what a log gets
    with step_bar("train", 4, start=1, console=Console(file=log)) as bar:
        for step in (2, 3, 4):
            bar.update(step, loss=4.0 / step, tokens_per_s=1000.0)
    lines = [re.sub(r"\d\d:\d\d", "mm:ss", line) for line in log.getvalue().splitlines()]
    assert lines == ["train: 2/4 (50%) mm:ss elapsed, ETA mm:ss  loss 2  tokens per s 1000",
                     "train: 3/4 (75%) mm:ss elapsed, ETA mm:ss  loss 1.333  tokens per s 1000",
                     "train: 4/4 (100%) mm:ss elapsed, done  loss 1  tokens per s 1000"]


def test_step_bar_that_fails_prints_no_end_line(monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "1000")
    log = io.StringIO()
    with pytest.raises(RuntimeError, match="diverged"), step_bar("train", 4, console=Console(file=log)) as bar:
        bar.update(1, loss=1.0)
        raise RuntimeError("diverged")
    assert log.getvalue() == ""


def test_on_a_terminal_bars_show_the_time_remaining(monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "0")  # read, but lines are for logs only
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, force_interactive=True, width=120)
    assert list(progress_bar(range(5), "known", console=terminal)) == [0, 1, 2, 3, 4]
    drawn = screen.getvalue()
    # rich's TimeRemainingColumn draws -:--:-- before it has a speed; the elapsed column shows 0:00:00 from the start
    assert "known" in drawn and "ETA" in drawn and "-:--:--" in drawn and "elapsed" not in drawn
    screen.truncate(0)
    assert list(progress_bar(iter(range(5)), "unknown", console=terminal)) == [0, 1, 2, 3, 4]
    assert "unknown" in screen.getvalue() and "ETA" not in screen.getvalue()  # no total, no time remaining
    screen.truncate(0)
    with step_bar("train", 3, console=terminal) as bar:
        for step in (1, 2, 3):
            bar.update(step, loss=0.5)
    assert "ETA" in screen.getvalue() and "loss 0.5" in screen.getvalue()


def test_force_color_does_not_make_a_log_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # set in many CI jobs for coloured output: rich then claims a terminal
    monkeypatch.setenv(SECONDS_VARIABLE, "1000")
    list(progress_bar(range(5), "stage"))
    assert END.match(capsys.readouterr().err)


# lm-eval inside rankwise eval --tasks


def _not_a_repository(path: Path) -> None:
    """Skip unless git, run in ``path``, complains: the message the quieting must keep out."""
    try:
        git = subprocess.run(["git", "describe", "--always"], cwd=path, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("git is not installed: lm-eval's git_hash lookup is silent anyway")
    if "not a git repository" not in git.stderr:
        pytest.skip(f"{path} is inside a git repository")


def _local_task(tmp_path: Path) -> Path:
    """A copy of the shipped pydoc_cloze task (its YAML, loader and data) named local_cloze, in ``tmp_path/tasks``."""
    from rankwise.eval.tasks import PACKAGED_TASKS

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("pydoc_cloze.py", "pydoc_cloze.jsonl"):
        shutil.copy(PACKAGED_TASKS / name, tasks / name)
    text = (PACKAGED_TASKS / "pydoc_cloze.yaml").read_text()
    (tasks / "local_cloze.yaml").write_text(text.replace("task: pydoc_cloze", "task: local_cloze"))
    return tasks


def test_lm_eval_prints_nothing_of_its_own(tmp_path, monkeypatch, capfd):
    """No tqdm bars, no `fatal: not a git repository` (git writes it to file descriptor 2, hence capfd), and
    rankwise's own progress line for the task run. A relative task directory is read from the directory the task
    index is built in, even when the task runs from another."""
    pytest.importorskip("lm_eval")
    from rankwise.eval.tasks import evaluate_tasks, task_manager
    from tests.tiny_models import tiny_model, tiny_tokenizer

    _local_task(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    _not_a_repository(work)
    monkeypatch.chdir(tmp_path)
    manager = task_manager(["tasks"])
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match=r"--task-dir 'tasks' is not a directory"):
        task_manager(["tasks"])  # relative to the current directory: not here
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv(SECONDS_VARIABLE, "0")
    capfd.readouterr()
    scores = evaluate_tasks(tiny_model(), tiny_tokenizer(), ["local_cloze"], manager=manager, limit=8,
                            progress=True)
    out, err = capfd.readouterr()
    assert 0.0 <= scores["local_cloze"]["acc"] <= 1.0
    assert "not a git repository" not in err, err
    assert re.fullmatch(r"lm-eval tasks: 1/1 \(100%\) \d\d:\d\d elapsed, done\n", err), err  # nothing else
    assert out == ""
