"""``pip install`` of a built wheel (not editable) gives a working package: configs inside it, console scripts
that train and predict from any folder. Offline: the wheel is installed without dependencies into its own
folder, which is put first on the path of this environment (whose packages provide the dependencies)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib

from tests.data_builders import write_image
from tests.helpers import REPO


def run(args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_wheel_installs_configs_and_console_scripts_that_train_and_predict(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    shutil.copytree(REPO / "step_lightning", source / "step_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source],
        tmp_path)
    (wheel,) = (tmp_path / "dist").glob("step_lightning-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    configs = {str(p.relative_to(REPO)) for p in (REPO / "step_lightning" / "conf").rglob("*.yaml")}
    assert configs and configs <= set(names)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{name} = {target}" in declared for name, target in scripts.items())
    assert {"step-train", "step-predict", "step-export", "step-eval"} <= set(scripts)

    site = tmp_path / "site"
    run([*pip, "install", "--no-index", "--no-deps", "-q", "--target", site, wheel], tmp_path)
    work = tmp_path / "elsewhere"  # no source tree here or above
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    where = run([sys.executable, "-c", "import step_lightning; print(step_lightning.__file__)"], work, env)
    assert where.stdout.strip() == str(site / "step_lightning" / "__init__.py")

    run([site / "bin" / "step-train", "debug=tiny", "method=segvit", "data.num_train=8", "data.num_val=2",
         "hydra.run.dir=run"], work, env)
    checkpoint = work / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file() and (work / "run" / ".hydra" / "config.yaml").is_file()
    images = work / "photos"
    images.mkdir()
    (images / "notes.txt").write_text("not an image: not picked up")
    write_image(images / "a.png", (50, 70))
    predicted = run([site / "bin" / "step-predict", f"ckpt_path={checkpoint}", "input=photos", "output=pred"],
                    work, env)
    assert predicted.stdout.strip().splitlines()[-1] == "predict: 1 images written to pred, 0 skipped"
    assert sorted(p.name for p in (work / "pred").iterdir()) == ["a.png", "a_overlay.png"]


def test_make_install_takes_the_configured_index_by_default_and_cpu_builds_on_request(tmp_path):
    """CI's `make test` installs torch as the configured index serves it; TORCH=cpu asks for the +cpu builds."""
    def install_commands(*args):
        out = run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}", *args], REPO).stdout
        return [line for line in out.splitlines() if "pip install" in line and "torch" in line]

    (default,) = install_commands()
    assert default.endswith("pip install --quiet torch==2.14.1 torchvision==0.29.1")
    (cpu,) = install_commands("TORCH=cpu")
    assert cpu.endswith("pip install --quiet --extra-index-url https://download.pytorch.org/whl/cpu "
                        "torch==2.14.1+cpu torchvision==0.29.1+cpu")


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalised(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requirements}


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(files) -> tuple[set[str], set[str]]:
    """Top-level names of the modules ``files`` import: at import time (module level), and inside functions only."""
    eager, lazy = set(), set()
    for file in files:
        tree = ast.parse(file.read_text())
        in_functions = {id(node) for function in ast.walk(tree)
                        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) for node in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            (lazy if id(node) in in_functions else eager).update(n.split(".")[0] for n in names)
    local = {"step_lightning", "__future__", "__main__", *sys.stdlib_module_names}
    return eager - local, lazy - eager - local


def test_what_the_package_and_scripts_import_is_declared():
    """A module imported when the package is imported is a dependency; one imported inside a function (an optional
    feature, or a script's) is a dependency or an extra's; nothing arrives undeclared through another package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = requirement_names(project["dependencies"])
    extras = requirement_names([r for name, reqs in project["optional-dependencies"].items() if name != "dev"
                                for r in reqs if not r.startswith("step-lightning")])
    distributions = importlib.metadata.packages_distributions()

    def declared_in(modules: set[str], allowed: set[str]) -> dict[str, list[str]]:
        return {m: distributions.get(m, ["(not installed)"]) for m in sorted(modules)
                if not {normalised(d) for d in distributions.get(m, [])} & allowed}

    eager, lazy = imported_modules((REPO / "step_lightning").rglob("*.py"))
    script_eager, script_lazy = imported_modules((REPO / "scripts").glob("*.py"))
    assert {"torch", "tqdm", "huggingface_hub", "safetensors"} <= eager
    assert declared_in(eager, core) == {}
    assert declared_in(lazy | script_eager | script_lazy, core | extras) == {}
    assert "scipy" not in core and "scipy" in script_lazy  # only the COCO-Stuff converter reads .mat files
