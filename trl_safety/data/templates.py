"""Prompt templates of the papers (docs/design/algorithms.md §1.4): the Stanford-Alpaca template in its two variants.

- `"alpaca"`: the prompt ends right after `### Response:` (Vaccine, Lisa);
- `"alpaca_newline"`: the prompt ends with `### Response:\\n` (T-Vaccine, Booster, Antidote, Panacea, Antibody).

The generation-time template must be the training-time template: SST2/AGNews accuracy is an exact string match, and
one stray newline collapses it (docs/design/algorithms.md §9.10).
"""

from __future__ import annotations

from collections.abc import Callable


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

TEMPLATES = ("alpaca", "alpaca_newline")


def alpaca_prompt(instruction: str, input: str | None = None, *, newline: bool = False) -> str:
    """The Alpaca prompt for `instruction` (and `input` when non-empty); ends with `### Response:` (+ `\\n`)."""
    if input:
        text = f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    else:
        text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:"
    return text + "\n" if newline else text


def apply_template(template: str | None, instruction: str, input: str | None = None) -> str:
    """Format a prompt with a named template; `None` (or `"none"`) joins instruction and input with a newline."""
    if template in (None, "none", "raw"):
        return f"{instruction}\n{input}" if input else instruction
    if template == "alpaca":
        return alpaca_prompt(instruction, input, newline=False)
    if template == "alpaca_newline":
        return alpaca_prompt(instruction, input, newline=True)
    raise ValueError(f"Unknown template {template!r}; choose one of {TEMPLATES} or None.")


def prompt_formatter(template: str | Callable[[str], str] | None, tokenizer=None) -> Callable[[str], str] | None:
    """A function turning a bare prompt into model input: a named template, `"chat"` (the tokenizer's chat template
    with the generation prompt), a callable (returned as is), or `None` (identity)."""
    if template is None or callable(template):
        return template
    if template == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("prompt format 'chat' needs a tokenizer with a chat template.")

        def chat(prompt: str) -> str:
            messages = [{"role": "user", "content": prompt}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        return chat
    if template in ("none", "raw"):
        return None
    if template not in TEMPLATES:
        raise ValueError(f"Unknown prompt format {template!r}; choose one of {TEMPLATES + ('chat',)}, or a callable.")
    return lambda prompt: apply_template(template, prompt)
