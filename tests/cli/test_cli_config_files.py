"""`--config FILE` on the commands other than align/sft (those: `test_recipes_cli.py`): `bench`, `prune`, `merge`.

Each file's keys are the option names; the test stops each command where its work would start and reads the
configuration it built.
"""

from __future__ import annotations

import pytest
import yaml

from trl_safety.cli.main import main


class Stop(Exception):
    def __init__(self, value):
        self.value = value


def test_bench_reads_a_config_file_and_flags_override_it(tmp_path, monkeypatch):
    import trl_safety.bench

    def stop(config):
        raise Stop(config)

    monkeypatch.setattr(trl_safety.bench, "run_bench", stop)
    values = {"defenses": ["vaccine", "lisa"], "sweep": [0.0, 0.1], "seed": 1, "finetune_steps": 7}
    values.update(output_dir=str(tmp_path / "out"), judge="keyword", no_progress=True)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(Stop) as stop_info:
        main(["bench", "--config", str(tmp_path / "bench.yaml"), "--finetune_steps", "9"])
    config = stop_info.value.value
    assert config.defenses == ["vaccine", "lisa"] and config.sweep == [0.0, 0.1] and config.seed == 1
    assert config.output_dir == str(tmp_path / "out") and config.judge == "keyword"
    assert config.finetune_steps == 9  # the flag wins over the file's 7
    assert config.progress is False


def test_bench_old_spellings_still_parse(tmp_path, monkeypatch):
    """`--output-dir` / `--model` / `--no-progress` are in documented commands: hidden aliases of the new names."""
    import trl_safety.bench

    monkeypatch.setattr(trl_safety.bench, "run_bench", lambda config: (_ for _ in ()).throw(Stop(config)))
    with pytest.raises(Stop) as stop_info:
        main(["bench", "--output-dir", str(tmp_path / "o"), "--no-progress", "--steps", "5", "--judge", "keyword"])
    config = stop_info.value.value
    assert (config.output_dir, config.progress, config.finetune_steps) == (str(tmp_path / "o"), False, 5)
    assert "--output-dir" not in capture_help(["bench", "--help"])


def capture_help(argv) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return out.getvalue()


def test_merge_reads_a_config_file(tmp_path, monkeypatch):
    import trl_safety.cli.merge as cli_merge

    monkeypatch.setattr(cli_merge, "merge_adapter", lambda args: (_ for _ in ()).throw(Stop(args)))
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        '{"base_model_name_or_path": "%s"}' % (tmp_path / "base")
    )
    values = {"model_name_or_path": str(tmp_path / "adapter"), "output_dir": str(tmp_path / "m"), "dtype": "float32"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(Stop) as stop_info:
        main(["merge", "--config", str(tmp_path / "merge.yaml")])
    args = stop_info.value.value
    assert (args.model_name_or_path, args.output_dir, args.dtype) == tuple(values.values())


def test_push_reads_a_config_file(tmp_path, monkeypatch):
    """The positional folder and the required --repo_id may come from the file too."""
    import trl_safety.cli.push as cli_push

    def stop(folder):
        raise Stop(folder)

    monkeypatch.setattr(cli_push, "_check_folder", stop)
    (tmp_path / "push.yaml").write_text(yaml.safe_dump({"folder": "run", "repo_id": "me/x", "private": True}))
    with pytest.raises(Stop) as stop_info:
        main(["push", "--config", str(tmp_path / "push.yaml")])
    assert stop_info.value.value == "run"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"folder": "run", "repo_idd": "me/x"}))
    assert main(["push", "--config", str(tmp_path / "typo.yaml")]) == 2
