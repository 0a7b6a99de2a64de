"""``rankwise generate``: greedy completions of prompts by a dense, compressed or healed model."""

from __future__ import annotations

from typing import Annotated

import typer

from rankwise.cli.common import (
    DEVICE,
    DTYPE,
    MAX_NEW_TOKENS,
    DeviceOpt,
    DtypeOpt,
    FuseOpt,
    MaxNewTokensOpt,
    ModelArg,
    NoVerifyOpt,
    PromptOpt,
    ThreadsOpt,
    TrustOpt,
    one_line_errors,
    say,
    setup,
)


@one_line_errors
def generate(
    model: ModelArg = "smollm2",
    prompt: PromptOpt = None,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    chat: Annotated[bool, typer.Option("--chat", help="wrap each prompt in the tokenizer's chat template")] = False,
    device: DeviceOpt = DEVICE,
    dtype: DtypeOpt = DTYPE,
    threads: ThreadsOpt = None,
    trust_remote_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
    fuse: FuseOpt = False,
) -> None:
    """Complete each --prompt with MODEL greedily (deterministic) and print prompt and completion."""
    from rankwise.arch import is_encoder
    from rankwise.eval.generate import check_generation, check_prompts, complete
    from rankwise.io.models import load_model
    from rankwise.stream import compute_dtype, dtype_name

    if not prompt:
        raise ValueError("give at least one --prompt TEXT")
    if any(not p.strip() for p in prompt):
        raise ValueError("--prompt must not be empty")
    check_prompts(prompt, "--prompt")
    setup(device, threads)
    check_generation(model, prompt, max_new_tokens=max_new_tokens, chat=chat, trust_remote_code=trust_remote_code)
    loaded = load_model(model, device=device, trust_remote_code=trust_remote_code, verify=not no_verify)
    loaded.model.to(compute_dtype(dtype_name(dtype), next(loaded.model.parameters()).dtype, device))
    if is_encoder(loaded.model):
        raise ValueError(f"generate needs a causal LM; {model} is an encoder ({type(loaded.model).__name__}): "
                         "evaluate it with rankwise eval")
    if fuse:
        from rankwise.nn.fused import fuse_inputs_

        fuse_inputs_(loaded.model)
    for text, completion in zip(prompt, complete(loaded.model, loaded.tokenizer, prompt,
                                                  max_new_tokens=max_new_tokens, chat=chat), strict=True):
        say(f"### {text}\n{completion.strip()}\n")
