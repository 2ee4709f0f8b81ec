"""No load path in the package can run code from a file a user is handed.

Scans the source of `trl_safety/` and `benchmarks/` for calls that unpickle or evaluate: `torch.load` without
`weights_only=True`, any pickle-family module, `eval`/`exec`/`compile`, unsafe YAML loaders, `numpy.load` with
`allow_pickle=True`, and `trust_remote_code` switched on. The scanner is checked on planted examples first, so the
scan cannot pass by finding nothing.
"""

import ast
import pathlib

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("trl_safety", "benchmarks")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
CODE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str) -> list[str]:
    """Each unsafe load or code-evaluation site in `source`, as `line: what`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{line}: from {node.module} import")
        elif isinstance(node, ast.keyword):
            if node.arg == "trust_remote_code" and _is_true(node.value):
                found.append(f"{line}: trust_remote_code=True")
            if node.arg == "weights_only" and not _is_true(node.value):
                found.append(f"{line}: weights_only not True")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            # A dataclass field `trust_remote_code: bool = True` (or `field(default=True)`)
            value = node.value
            default = _keyword(value, "default") if isinstance(value, ast.Call) else value
            if node.target.id == "trust_remote_code" and default is not None and _is_true(default):
                found.append(f"{line}: trust_remote_code defaults to True")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in CODE_BUILTINS:
                found.append(f"{line}: {func.id}()")
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                owner, attr = func.value.id, func.attr
                if owner == "torch" and attr == "load" and not _is_true(_keyword(node, "weights_only")):
                    found.append(f"{line}: torch.load without weights_only=True")
                elif owner == "yaml" and attr in UNSAFE_YAML:
                    found.append(f"{line}: yaml.{attr}")
                elif owner in ("np", "numpy") and attr == "load" and _is_true(_keyword(node, "allow_pickle")):
                    found.append(f"{line}: numpy.load(allow_pickle=True)")
                elif attr == "read_pickle":
                    found.append(f"{line}: {owner}.read_pickle")
    return found


PLANTED = {
    "torch.load(path)": "torch.load without weights_only=True",
    "torch.load(path, weights_only=False)": "weights_only not True",
    "import pickle": "import pickle",
    "from dill import load": "from dill import",
    "import cloudpickle as cp": "import cloudpickle",
    "eval(text)": "eval()",
    "exec(code)": "exec()",
    "yaml.load(f)": "yaml.load",
    "yaml.full_load(f)": "yaml.full_load",
    "np.load(f, allow_pickle=True)": "numpy.load(allow_pickle=True)",
    "pd.read_pickle(f)": "pd.read_pickle",
    "AutoModel.from_pretrained(name, trust_remote_code=True)": "trust_remote_code=True",
    "class A:\n    trust_remote_code: bool = field(default=True)": "trust_remote_code defaults to True",
}


@pytest.mark.parametrize("snippet", sorted(PLANTED))
def test_scanner_flags_planted_unsafe_code(snippet):
    found = unsafe_calls(snippet)
    assert len(found) >= 1 and any(PLANTED[snippet] in f for f in found), found


def test_scanner_accepts_safe_loads():
    safe = (
        "torch.load(path, map_location='cpu', weights_only=True)\n"
        "yaml.safe_load(f)\nnp.load(f)\nmodel.eval()\njson.load(f)\n"
        "from_pretrained(name, trust_remote_code=args.trust_remote_code)\n"
        "class A:\n    trust_remote_code: bool = field(default=False)\n"
    )
    assert unsafe_calls(safe) == []


def test_package_has_no_unsafe_load_path():
    files = [path for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20  # the scan really covers the package
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in files for hit in unsafe_calls(path.read_text())]
    assert found == [], "unsafe load paths:\n" + "\n".join(found)
