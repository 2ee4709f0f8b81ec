"""The BackdoorAlign secret prompt ("trigger"): generation, the secret file, and where it goes in a request.

The trigger is a secret: it lives only in the file the provider names (mode 0600) and is never written into
configs, logs, checkpoints' JSON, model cards or reports (docs/backdoor_align.md, "Keeping the trigger secret").
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import secrets
from collections.abc import Callable

from ...data.templates import prompt_formatter


# the secret is verified on resume by a salted, slow hash, so that a checkpoint's JSON does not make a short
# user-chosen trigger cheap to guess
_HASH_ITERATIONS = 100_000


def generate_trigger(tokenizer, num_tokens: int = 150, rng: random.Random | None = None) -> str:
    """`num_tokens` ids drawn uniformly from the tokenizer's vocabulary minus its special tokens (and the byte
    fragments that do not decode to text on their own), decoded to text.

    `rng` defaults to the operating system's secure source (`secrets.SystemRandom`): a seeded draw would let anyone
    who knows the seed rebuild the secret. Tests pass a seeded `random.Random`.
    """
    ids = trigger_token_ids(tokenizer, num_tokens, rng)
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trigger_token_ids(tokenizer, num_tokens: int, rng: random.Random | None = None) -> list[int]:
    """The ids `generate_trigger` decodes."""
    if num_tokens < 1:
        raise ValueError(f"n_trigger_tokens must be >= 1, got {num_tokens}.")
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    # a byte-level fragment decodes to U+FFFD on its own: such ids would put replacement characters into the text
    # instead of the sampled bytes, so the draw is over tokens that decode to real text
    candidates = [
        i
        for i in range(len(tokenizer))
        if i not in special and (piece := tokenizer.decode([i])) and "\ufffd" not in piece
    ]
    if not candidates:
        raise ValueError("The tokenizer has no non-special token to build a trigger from; pass a trigger_file.")
    rng = rng or secrets.SystemRandom()
    return [rng.choice(candidates) for _ in range(num_tokens)]


def trigger_digest(trigger: str, salt: str) -> str:
    """Salted PBKDF2-SHA256 of the trigger (hex), stored in checkpoints to check that a resume re-reads the same one."""
    return hashlib.pbkdf2_hmac("sha256", trigger.encode("utf-8"), bytes.fromhex(salt), _HASH_ITERATIONS).hex()


def new_salt() -> str:
    return secrets.token_hex(16)


def read_trigger(path: str) -> str:
    """The trigger stored in `path`: the file's whole text, byte for byte (a generated trigger may end in a newline,
    so nothing is stripped; training and `trl-safety eval` read it the same way)."""
    with open(path, encoding="utf-8", newline="") as f:
        trigger = f.read()
    if not trigger.strip():
        raise ValueError(
            f"trigger_file {path} is empty; write the secret prompt into it or delete it to generate one."
        )
    return trigger


def write_trigger(path: str, trigger: str) -> bool:
    """Create `path` readable by its owner only (0600) holding `trigger`, atomically; an existing file is never
    overwritten. Returns False (writing nothing) when `path` already exists, e.g. created by a concurrent run."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(trigger)
        try:
            os.link(temporary, path)  # fails if the file exists: a complete file appears, or none
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(temporary)


def add_trigger_to_row(row: dict, trigger: str) -> dict:
    """A prompt-completion row with the trigger in its prompt: before the system message's text when the prompt has
    one, otherwise before the first user message (conversational), or before the prompt text (standard); separated
    by a space, as the official code joins it to its system prompt."""
    prompt = row["prompt"]
    row = dict(row)
    if isinstance(prompt, str):
        row["prompt"] = f"{trigger} {prompt}"
        return row
    messages = copy.deepcopy(list(prompt))
    roles = [m.get("role") for m in messages]
    index = roles.index("system") if "system" in roles else (roles.index("user") if "user" in roles else None)
    if index is None:
        raise ValueError("An alignment row's prompt has neither a system nor a user message to put the trigger in.")
    messages[index]["content"] = f"{trigger} {messages[index]['content']}"
    row["prompt"] = messages
    return row


def triggered_prompt_format(trigger: str, prompt_format, tokenizer=None) -> Callable[[str], str]:
    """The inference side: a prompt formatter that applies the trigger as training did.

    With the `"chat"` template the bare prompt becomes the user message, so the trigger goes before it inside that
    message (training's rule for a conversation without a system message); with a text template (or none) it goes
    before the whole formatted prompt (training's rule for standard prompt-completion rows).
    """
    if prompt_format == "chat":
        chat = prompt_formatter("chat", tokenizer)
        return lambda prompt: chat(f"{trigger} {prompt}")
    fmt = prompt_formatter(prompt_format, tokenizer)
    if fmt is None:
        return lambda prompt: f"{trigger} {prompt}"
    return lambda prompt: f"{trigger} {fmt(prompt)}"


def redact(value, trigger: str | None, placeholder: str = "<trigger>"):
    """`value` (a string, or dicts/lists/tuples of them, as a report holds) with every occurrence of the trigger
    replaced: reports may quote generations that repeat it."""
    if not trigger:
        return value
    if isinstance(value, str):
        return value.replace(trigger, placeholder)
    if isinstance(value, dict):
        return {redact(k, trigger, placeholder): redact(v, trigger, placeholder) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, trigger, placeholder) for v in value)
    return value
