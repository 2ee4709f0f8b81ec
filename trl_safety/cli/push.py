"""`trl-safety push`: publish a saved defended model or adapter folder to the Hub with its card.

```bash
trl-safety push vaccine-aligned --repo_id my-org/llama-2-7b-vaccine --private
```

The folder must hold `defense_config.json` (written by every defense trainer's `save_model`). The command rewrites
`README.md` from it, adding the evaluation results found in the folder (`eval_report.json`, a bench `results.json`,
`eval_results.json`) and the licence notes of the datasets and judges they name, then uploads the folder with
`huggingface_hub`'s `create_repo` + `upload_folder`, skipping checkpoints as `Trainer.push_to_hub` does.
"""

from __future__ import annotations

import argparse
import json
import os

from trl_safety.cli.checks import OneLineArgumentParser, UsageError


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
# Same exclusions as `Trainer.push_to_hub`: private files and intermediate checkpoints
IGNORE_PATTERNS = ["_*", "checkpoint-*", "checkpoint-*/**"]


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog=prog,
        description="Push a saved defended model or adapter (a folder with defense_config.json) to the Hugging Face "
        "Hub, with a model card describing its defense.",
    )
    parser.add_argument("folder", help="Output folder of a defense trainer (`trainer.save_model(...)`).")
    parser.add_argument("--config", default=None, help="YAML file of options (keys: the option names, `folder`).")
    parser.add_argument("--repo_id", required=True, help="Hub repository, e.g. `my-org/llama-2-7b-vaccine`.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: the logged-in one).")
    parser.add_argument(
        "--commit_message", default="Upload defended model with trl-safety", help="Commit message of the upload."
    )
    parser.add_argument("--revision", default=None, help="Branch to push to (default: main).")
    parser.add_argument(
        "--dataset_name", default=None, help="Training dataset id for the card (default: kept from an existing card)."
    )
    parser.add_argument(
        "--tags", nargs="*", default=None, help="Extra card tags (default: kept from an existing card)."
    )
    parser.add_argument(
        "--no_card", action="store_true", help="Upload the folder's README.md as it is instead of regenerating it."
    )
    return parser


def _check_folder(folder: str) -> None:
    from ..core.card import DEFENSE_CONFIG_NAME

    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{folder} is not a folder; pass the output folder of a defense trainer (where `trainer.save_model(...)` "
            f"wrote the weights and {DEFENSE_CONFIG_NAME})."
        )
    if not os.path.isfile(os.path.join(folder, DEFENSE_CONFIG_NAME)):
        raise FileNotFoundError(
            f"{folder} has no {DEFENSE_CONFIG_NAME}: it was not saved by a trl_safety trainer. Save the model with "
            f"`trainer.save_model(...)` on a defense trainer (it writes {DEFENSE_CONFIG_NAME} beside the weights), "
            "or push a plain model with `huggingface-cli upload`."
        )
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{folder} holds no weights: expected one of {', '.join(WEIGHT_FILES)}.")
    # Checked here, before the repository is created, rather than when the card is written
    path = os.path.join(folder, DEFENSE_CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); it is not a trl_safety defense config.") from None
    missing = [key for key in ("defense", "stage") if not isinstance(info, dict) or key not in info]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}; it is not a trl_safety defense config.")


def push_folder(
    folder: str,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload defended model with trl-safety",
    revision: str | None = None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    write_card: bool = True,
):
    """Regenerate the card of `folder` and upload the folder to `repo_id`. Returns `upload_folder`'s `CommitInfo`."""
    from huggingface_hub import HfApi

    from ..core.card import write_folder_card

    _check_folder(folder)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if write_card:
        write_folder_card(folder, hub_model_id=repo_id, dataset_name=dataset_name, tags=tags)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        token=token,
        revision=revision,
        ignore_patterns=IGNORE_PATTERNS,
    )


def run(argv: list[str], prog: str | None = None, command: str | None = None) -> int:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from trl_safety.cli.recipe import parse_args_with_config

    args = parse_args_with_config(make_parser(prog), argv)
    try:
        _check_folder(args.folder)
    except (FileNotFoundError, ValueError) as exc:  # the folder is not a saved defended model
        raise UsageError(str(exc)) from None
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as exc:
        raise UsageError(f"argument --repo_id: {exc}") from None
    commit = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        revision=args.revision,
        dataset_name=args.dataset_name,
        tags=args.tags,
        write_card=not args.no_card,
    )
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{args.repo_id}"
    print(f"Pushed {args.folder} to {url}")
    return 0
