"""Packaging: every imported package is declared, the metadata is honest, and a feature used without its optional
extra ends in one line that names the extra."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from multigran.cli import main
from multigran.extras import EXTRAS, MissingExtraError, require

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared(*extras) -> set[str]:
    names = {requirement_name(r) for r in PROJECT["dependencies"]}
    for extra in extras:
        names |= {requirement_name(r) for r in PROJECT["optional-dependencies"][extra]}
    return names


def imported_modules(paths, module_level_only: bool):
    """Top-level names of every absolute import in the files (module level only, or everywhere)."""
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path.relative_to(REPO))
    return found


def distributions_of(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in importlib.metadata.packages_distributions().get(module, [])}


FIRST_PARTY = {"multigran", "conftest", "tests"}


def third_party(modules: dict) -> dict:
    local_test_modules = {p.stem for p in (REPO / "tests").glob("*.py")}
    return {m: where for m, where in modules.items()
            if m not in sys.stdlib_module_names and m not in FIRST_PARTY and m not in local_test_modules}


# Imported by the library but deliberately not declared: lmms-eval declares torchvision, which has no CPU wheel and
# would replace the CPU torch, so it is installed with --no-deps (README, .ci/run) and its imports are in `eval`.
INSTALLED_WITHOUT_DEPS = {"lmms_eval"}


def test_every_package_imported_anywhere_is_declared_in_core_dev_or_an_extra():
    """Lazily imported packages may live in an optional extra (GPU-only ones are not in `dev`); the tests may import
    only what `pip install -e .[dev]` installs."""
    every_extra = declared(*PROJECT["optional-dependencies"])
    library = third_party(imported_modules(sorted((REPO / "src").rglob("*.py")), module_level_only=False))
    undeclared = {m: str(w) for m, w in library.items() if m not in INSTALLED_WITHOUT_DEPS
                  and not distributions_of(m) & every_extra and m.lower().replace("_", "-") not in every_extra}
    assert not undeclared, f"imported but declared nowhere in pyproject.toml: {undeclared}"

    dev = declared("dev") | {name for r in PROJECT["optional-dependencies"]["dev"] if requirement_name(r) == "multigran"
                             for extra in re.search(r"\[(.*)\]", r).group(1).split(",") for name in declared(extra)}
    tests = third_party(imported_modules(sorted((REPO / "tests").rglob("*.py")), module_level_only=False))
    undeclared = {m: str(w) for m, w in tests.items()
                  if m not in INSTALLED_WITHOUT_DEPS and not distributions_of(m) & dev}
    assert not undeclared, f"the tests import packages that the dev extra does not install: {undeclared}"


def core_closure() -> set[str]:
    """The core dependencies and, transitively, what they require (without their own extras)."""
    seen, todo = set(), list(declared())
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [requirement_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_a_core_install_imports_and_every_command_parses():
    """With every package that only an extra brings made unimportable, `import multigran` and each command's --help
    still work: optional packages are imported lazily, where the feature is used."""
    core = core_closure()
    optional = set()
    for module, distributions in importlib.metadata.packages_distributions().items():
        names = {d.lower().replace("_", "-") for d in distributions}
        if names & declared(*PROJECT["optional-dependencies"]) and not names & core:
            optional.add(module)
    optional |= INSTALLED_WITHOUT_DEPS
    optional -= set(sys.stdlib_module_names) | {"multigran"}
    script = f"""
import sys
for name in {sorted(optional)!r}:
    sys.modules[name] = None  # `import name` raises ImportError; find_spec(name) says "not installed"
import multigran
from multigran.cli import COMMANDS, main
for name in COMMANDS:
    assert main([name, "--help"]) == 0, name
print("ok", len(COMMANDS))
"""
    import subprocess

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("ok"), done.stderr[-3000:]


def test_metadata_is_honest():
    assert PROJECT["requires-python"] == ">=3.11"  # transformers >= 5.24 needs Python >= 3.11
    transformers_pin = next(r for r in PROJECT["dependencies"] if requirement_name(r) == "transformers")
    assert ">=5.24" in transformers_pin
    assert PROJECT["license"] == "Apache-2.0"  # SPDX expression, not the deprecated table
    assert "Apache License" in (REPO / "LICENSE").read_text() and PROJECT["license-files"] == ["LICENSE"]
    assert (REPO / "src/multigran/py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["multigran"]
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in PROJECT["classifiers"])
    assert set(EXTRAS) <= set(PROJECT["optional-dependencies"]), "every extra the messages name must exist"


def test_version_flag_prints_the_installed_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"multigran {importlib.metadata.version('multigran')}"


def block(monkeypatch, *modules):
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def test_require_names_the_extra(monkeypatch):
    block(monkeypatch, "scipy")
    with pytest.raises(MissingExtraError, match=r"pip install 'multigran\[detect\]'"):
        require("scipy", "detect")
    assert require("json", "detect").dumps([]) == "[]"


def test_detect_without_its_extra_is_one_line(monkeypatch, tmp_path, capsys):
    block(monkeypatch, "scipy")
    code = main(["detect", "--images", str(tmp_path), "--tags", "cat", "--model", str(tmp_path),
                 "--out", str(tmp_path / "boxes.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("multigran: error:") and "pip install 'multigran[detect]'" in err
    assert not (tmp_path / "boxes.json").exists()


def test_lora_without_its_extra_is_one_line(monkeypatch, tmp_path, capsys):
    block(monkeypatch, "peft")
    code = main(["merge-lora", str(tmp_path / "adapter"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "pip install 'multigran[lora]'" in err
