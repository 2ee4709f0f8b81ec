"""Run many `trl-safety` command lines as separate processes, paying the torch/transformers import only once.

    python cli_case_runner.py CASES.json RESULTS.json

CASES.json is `[{"id": ..., "argv": [...]}, ...]`. The runner imports every subcommand module (what a real start of
`trl-safety` imports), then forks one child per case: the child points its file descriptors 1 and 2 at files, runs
`trl_safety.cli.main.main(argv)` and exits with its return code, printing an uncaught exception's traceback as the
interpreter would. So each case has a real exit status and real stderr, as `trl-safety <argv>` would, without the
3-10 s start-up of a fresh interpreter per case. RESULTS.json maps each id to `{"rc", "stdout", "stderr"}`.
Anything the imports print goes to the runner's own stderr, which the caller checks separately. Needs `os.fork`.
"""

import json
import os
import sys
import tempfile
import time
import traceback


def _warm_up() -> None:
    import trl_safety.bench  # noqa: F401
    import trl_safety.cli.bench  # noqa: F401
    import trl_safety.cli.defenses  # noqa: F401
    import trl_safety.cli.eval  # noqa: F401
    import trl_safety.cli.merge  # noqa: F401
    import trl_safety.cli.prune  # noqa: F401
    import trl_safety.cli.push  # noqa: F401
    import trl_safety.cli.train  # noqa: F401
    import trl_safety.data  # noqa: F401
    import trl_safety.eval  # noqa: F401
    from trl_safety.registry import list_defenses

    list_defenses()


def _child(argv: list[str], out_path: str, err_path: str) -> None:
    code = 1
    try:
        os.dup2(os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        from trl_safety.cli.main import main

        sys.argv = ["trl-safety", *argv]
        try:
            code = main(argv)
        except SystemExit as exc:  # as the interpreter treats it
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(cases_path: str, results_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    _warm_up()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for case in cases:
            out_path = os.path.join(folder, "out")
            err_path = os.path.join(folder, "err")
            sys.stdout.flush()
            sys.stderr.flush()
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                _child(case["argv"], out_path, err_path)
            _, status = os.waitpid(pid, 0)
            with open(out_path) as f_out, open(err_path) as f_err:
                results[case["id"]] = {
                    "rc": os.waitstatus_to_exitcode(status),
                    "stdout": f_out.read(),
                    "stderr": f_err.read(),
                    "seconds": round(time.perf_counter() - start, 3),
                }
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
