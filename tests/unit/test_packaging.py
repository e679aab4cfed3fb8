"""What a user installs: the wheel built from a clean copy of this checkout holds the package
``trims_ray`` alone (no ``workloads``, no tests), its type marker, its license and its dashboard;
its version is the one ``trims_ray.__version__`` states; its core dependencies are exactly what
the package imports, and benchmark- and test-only libraries sit in extras.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation``, with the setuptools of
this environment) from the files git would commit, so stale build directories cannot leak in.
Nothing here starts Ray.
"""

from __future__ import annotations

import ast
import email.parser
import functools
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import trims_ray

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
from packaging.requirements import Requirement  # noqa: E402 - after the skip above

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "trims_ray"
DASHBOARD = PACKAGE / "dashboards" / "trims_ray.json"

# Core dependencies the package uses without importing them by name, and why.
USED_WITHOUT_IMPORT = {"s3fs": "fsspec loads it for s3:// store URIs"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from the files of this checkout that git tracks or would add."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("building from a clean copy needs git and a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    source = tmp_path_factory.mktemp("source")
    for relative in filter(None, listed):
        if (ROOT / relative).is_file():  # a file deleted in the work tree is still listed
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, source / relative)
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (path,) = out.glob("trims_ray-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_wheel_holds_trims_ray_alone(wheel):
    names = wheel.namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = f"trims_ray-{trims_ray.__version__}.dist-info"
    assert tops == {"trims_ray", dist_info}, f"top-level entries besides the package: {sorted(tops)}"
    assert not [n for n in names if n.startswith(("workloads/", "tests/"))]
    # Every module of the source tree is in it (nothing left behind by the package filter).
    modules = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(names), f"missing from the wheel: {sorted(modules - set(names))}"


def test_the_wheel_is_typed_and_licensed(wheel):
    names = set(wheel.namelist())
    assert "trims_ray/py.typed" in names
    dist_info = f"trims_ray-{trims_ray.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    license_text = wheel.read(f"{dist_info}/licenses/LICENSE").decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    metadata = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Typing :: Typed" in metadata.get_all("Classifier")


def test_the_wheel_ships_the_dashboard(wheel):
    if not DASHBOARD.exists():
        pytest.skip(f"{DASHBOARD.relative_to(ROOT)} is not in the package yet: nothing to ship")
    assert "trims_ray/dashboards/trims_ray.json" in wheel.namelist()
    assert wheel.read("trims_ray/dashboards/trims_ray.json") == DASHBOARD.read_bytes()


def test_the_version_is_written_once(wheel, pyproject):
    project = pyproject["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "trims_ray.__version__"}
    # The one place: a literal that setuptools reads without importing the package.
    source = (PACKAGE / "__init__.py").read_text()
    assert len(re.findall(r"^__version__ = \"[^\"]+\"$", source, re.MULTILINE)) == 1
    dist_info = f"trims_ray-{trims_ray.__version__}.dist-info"
    metadata = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    assert metadata["Version"] == trims_ray.__version__


def test_ray_is_a_range_that_keeps_a_clusters_ray(pyproject):
    (ray,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "ray"]
    import ray as installed

    assert installed.__version__ in ray.specifier, f"the Ray this suite runs with, {installed.__version__}, is outside {ray}"
    # More than one minor release, and not the next major one (APIs trims_ray uses may change).
    assert "2.99.0" in ray.specifier and "3.0.0" not in ray.specifier
    # ./run keeps development and CI on the release the suite was run with, inside the range.
    (pinned,) = re.findall(r'^RAY_PIN="ray==([0-9.]+)"$', (ROOT / "run").read_text(), re.MULTILINE)
    assert pinned == installed.__version__ and pinned in ray.specifier


def third_party_imports() -> dict[str, bool]:
    """Top-level modules outside the standard library that ``trims_ray/`` imports, each with
    whether some module imports it at module level (True) or only inside functions (False)."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "trims_ray":
                    found[top] = found.get(top, False) or not in_function
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        # Imports under `if TYPE_CHECKING:` never run: they need nothing installed.
        tree.body = [
            stmt for stmt in tree.body
            if not (isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test))
        ]
        visit(tree, False)
    return found


@functools.cache
def _distributions() -> dict[str, list[str]]:
    import importlib.metadata

    return importlib.metadata.packages_distributions()  # a scan of every installed one: once


def distribution_of(module: str) -> str:
    owners = _distributions().get(module)
    assert owners, f"trims_ray imports {module!r}, which no installed distribution provides"
    return normalized(owners[0])


def test_core_dependencies_are_what_the_package_imports(pyproject):
    core = {normalized(Requirement(r).name) for r in pyproject["project"]["dependencies"]}
    extras = {
        normalized(Requirement(r).name)
        for requirements in pyproject["project"]["optional-dependencies"].values()
        for r in requirements
    }
    imported = {distribution_of(module): at_top for module, at_top in third_party_imports().items()}
    # What runs on `import` of a module must be installed with the package.
    assert not {d for d, at_top in imported.items() if at_top} - core, "imported at module level, not a core dependency"
    # Whatever else it imports (lazily) is a core dependency or an extra's.
    assert not set(imported) - core - extras, "imported by trims_ray, but in no requirement"
    # And nothing is a core dependency that the package does not use: benchmark and test
    # libraries (pyarrow, safetensors, psutil, moto, Ray Serve) belong in extras.
    unused = core - set(imported) - {normalized(n) for n in USED_WITHOUT_IMPORT}
    assert not unused, f"core dependencies trims_ray/ never imports: {sorted(unused)}: move them to an extra"


def test_benchmark_and_test_libraries_are_in_extras(pyproject):
    optional = pyproject["project"]["optional-dependencies"]
    bench = {normalized(Requirement(r).name) for r in optional["bench"]}
    assert {"pyarrow", "safetensors", "psutil", "moto"} <= bench
    # The test extra brings the benchmarks' libraries (the suite runs workloads/) through the
    # bench extra rather than a second list that could drift from it.
    test = [Requirement(r) for r in optional["test"]]
    assert any(normalized(r.name) == "trims-ray" and "bench" in r.extras for r in test)
    # ./run installs the extras the tests and the demo need.
    run = (ROOT / "run").read_text()
    (install,) = re.findall(r'-e "\.\[([a-z,]+)\]"', run)
    assert {"test", "zoo"} <= set(install.split(","))


def test_benchmark_modules_import_only_what_the_extras_install(pyproject):
    """workloads/ runs from a checkout with ``pip install -e ".[bench,zoo]"``: every third-party
    module it imports must come from the core dependencies, the bench extra or the zoo extra."""
    optional = pyproject["project"]["optional-dependencies"]
    allowed = {
        normalized(Requirement(r).name)
        for r in [*pyproject["project"]["dependencies"], *optional["bench"], *optional["zoo"]]
    }
    missing: dict[str, list[str]] = {}
    for path in (ROOT / "workloads").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top in ("trims_ray", "workloads"):
                    continue
                dist = distribution_of(top)
                if dist not in allowed and not _installed_by(allowed, dist):
                    missing.setdefault(top, []).append(path.name)
    assert not missing, f"workloads/ imports modules no declared requirement installs: {missing}"


def _installed_by(allowed: set[str], dist: str) -> bool:
    """Whether ``dist`` is a requirement of one of the ``allowed`` distributions (installed with
    it: huggingface_hub comes with transformers)."""
    return any(dist in _requirements_of(parent) for parent in allowed)


@functools.cache
def _requirements_of(dist: str) -> frozenset[str]:
    import importlib.metadata

    try:
        return frozenset(normalized(Requirement(r).name) for r in importlib.metadata.requires(dist) or [])
    except importlib.metadata.PackageNotFoundError:
        return frozenset()
