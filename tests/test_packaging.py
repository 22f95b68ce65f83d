"""``pip install .`` gives a working toolkit: every third-party import is declared, package data ships, and the
installed copy runs from any folder."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PACKAGES = ["common", "cgd", "reir", "sreml", "irt", "fastretri"]
# import name -> distribution name, where they differ
DISTRIBUTION = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "faiss": "faiss-cpu",
    "multipart": "python-multipart",
    "python_multipart": "python-multipart",
}


def _requirement_name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep)[0]
    return req.strip().lower()


def _imports(path: Path):
    """(top-level module, imported inside a function or try block) for every import of a file."""
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try)):
            guarded.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) in guarded


def test_every_third_party_import_is_declared():
    required = {_requirement_name(r) for r in PYPROJECT["dependencies"]}
    optional = {_requirement_name(r) for reqs in PYPROJECT["optional-dependencies"].values() for r in reqs}
    local = set(PACKAGES) | {"data_utils", "tests", "benchmarks"}
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + [ROOT / "data_utils.py"]
    missing = []
    for path in files:
        for module, guarded in _imports(path):
            if module in local or module in sys.stdlib_module_names:
                continue
            dist = DISTRIBUTION.get(module, module).lower()
            # a top-level import needs a runtime dependency; one inside a function or try block may be an extra
            if dist not in required and (not guarded or dist not in optional):
                missing.append(f"{path.relative_to(ROOT)}: {module}")
    assert not missing, missing


def test_pip_install_runs_from_any_folder(tmp_path):
    pytest.importorskip("setuptools", reason="building without isolation needs setuptools in this environment")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, ROOT],
        check=True,
        capture_output=True,
    )
    assert (target / "fastretri" / "configs" / "demo.yml").is_file()
    assert (target / "data_utils.py").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for module in ["cgd.train", "reir.train", "sreml.train", "irt.train", "fastretri.train", "cgd.inference"]:
        out = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert "usage:" in out.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import common; print(common.__file__)"], cwd=elsewhere, env=env, capture_output=True
    )
    assert Path(where.stdout.decode().strip()).is_relative_to(target)
