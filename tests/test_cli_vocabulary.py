"""One CLI vocabulary: an option name means one thing, with one default, in every command that has it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from rankwise.cli.app import app

# Where one name legitimately carries a command's own variant, and why. Everything else must agree exactly.
OWN_VARIANT = {
    "--method": "each command's own registry: compression methods (compress), adapter methods (adapt)",
    "--bits": "compare takes a comma list of budgets, one row each",
    "--sequential": "compare adds rows without, with or both (off|on|both)",
    "--update-u": "compare adds rows without, with or both (off|on|both)",
    "--anchored": "compare adds rows without, with or both (off|on|both)",
    "--steps": "heal trains for a 10-minute time budget unless --steps is given; adapt trains 100 steps",
}


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    found = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found.update(_commands(command, (*prefix, name)))
        else:
            found[" ".join((*prefix, name))] = command
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _options() -> dict[str, list[tuple[str, Any, str, str]]]:
    by_name = defaultdict(list)
    for command_name, command in COMMANDS.items():
        for param in command.params:
            if param.param_type_name != "option":
                continue
            for name in param.opts:
                kind = "flag" if param.is_flag else str(param.type_descriptor.annotation)
                by_name[name].append((command_name, param.default, param.help or "", kind))
    return by_name


def test_every_command_is_walked():
    assert {"compress", "eval", "compare", "compensate", "generate", "info", "heal", "adapt", "export", "verify",
            "cache list", "cache clear"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(_options()))
def test_one_meaning_and_one_default(name):
    uses = _options()[name]
    if name in OWN_VARIANT or len(uses) == 1:
        return
    defaults = {repr(default) for _, default, _, _ in uses}
    helps = {text for _, _, text, _ in uses}
    kinds = {kind for _, _, _, kind in uses}
    where = ", ".join(command for command, *_ in uses)
    assert len(defaults) == 1, f"{name} has defaults {sorted(defaults)} across {where}"
    assert len(helps) == 1, f"{name} has {len(helps)} meanings across {where}: {sorted(helps)}"
    assert len(kinds) == 1, f"{name} takes {sorted(kinds)} across {where}"


def test_shared_names_have_the_shared_defaults():
    from rankwise.cli import common

    expected = {"--batch-size": common.BATCH_SIZE, "--eval-samples": common.EVAL_SAMPLES,
                "--calib-samples": common.CALIB_SAMPLES, "--calib-select": common.CALIB_SELECT,
                "--seq-len": common.SEQ_LEN, "--dtype": common.DTYPE, "--device": common.DEVICE,
                "--targets": common.TARGETS}
    options = _options()
    for name, value in expected.items():
        assert {default for _, default, _, _ in options[name]} == {value}, name
    assert (common.BATCH_SIZE, common.EVAL_SAMPLES, common.DTYPE) == (4, 16, "auto")


def test_every_output_option_is_required():
    for command_name, command in COMMANDS.items():
        for param in command.params:
            if "--out" in getattr(param, "opts", ()):
                assert param.required, command_name


def test_choices_are_listed_in_help():
    runner = CliRunner()
    text = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "400"}).output
    from rankwise.allocate import ALLOCATIONS
    from rankwise.methods import method_names

    for name in [*method_names(), *ALLOCATIONS, "factored", "dense", "bf16", "fp16", "auto"]:
        assert name in text, name
    assert "<bool>" not in text
    assert "[required]" in text
    adapt_help = runner.invoke(app, ["adapt", "--help"], env={"COLUMNS": "400"}).output
    assert "lora_sb" in adapt_help and "<bool>" not in adapt_help


def test_adapter_names_listed_without_peft_agree_with_the_registry():
    from rankwise.adapt.methods import METHODS
    from rankwise.cli.adapt import ADAPTERS

    assert set(ADAPTERS) == set(METHODS)


@pytest.mark.parametrize(("args", "needle"), [
    (["compress", "--out", "x", "--method", "nope"], "'nope' is not one of"),
    (["compress", "--out", "x", "--dtype", "int8"], "'int8' is not one of"),
    (["compress", "--ratios", "0.2", "--out", "x"], "No such option: --ratios"),
    (["eval", "--ratio", "0.2"], "No such option: --ratio"),
    (["compress"], "Missing option '--out'"),
    (["adapt", "--data", "t.txt", "--out", "x"], "No such option: --data"),
])
def test_bad_options_are_one_line_errors(args, needle):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_dtype_aliases_and_auto():
    import torch

    from rankwise.stream import compute_dtype, dtype_name, parse_dtype

    assert [dtype_name(n) for n in ("bf16", "fp16", "fp32", "half", "auto", None)] == [
        "bfloat16", "float16", "float32", "float16", "auto", None]
    assert parse_dtype("bf16") is torch.bfloat16
    from rankwise.io.save import resolve_dtype

    assert resolve_dtype("fp16", torch.float32) is torch.float16  # save(dtype=...) takes the aliases too
    assert compute_dtype("auto", torch.bfloat16, "cpu") is torch.float32
    assert compute_dtype("auto", torch.float32, "cpu") is torch.float32
    assert compute_dtype("auto", torch.bfloat16, "cuda") is torch.bfloat16
    assert compute_dtype(None, torch.bfloat16, "cpu") is torch.bfloat16
    assert compute_dtype("float16", torch.float32, "cpu") is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        dtype_name("int8")


def test_training_dtype(monkeypatch):
    import torch

    from rankwise.cli.common import training_autocast

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # a CPU without bfloat16 arithmetic
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert training_autocast("auto", "cpu") is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)  # one with AVX512-BF16
    assert training_autocast("auto", "cpu") is True
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: float32
    assert training_autocast("auto", "cpu") is False
    assert training_autocast("bf16", "cpu") is True
    assert training_autocast("float32", "cpu") is False
    with pytest.raises(ValueError, match="float16 is not supported for training"):
        training_autocast("fp16", "cpu")
