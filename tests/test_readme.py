"""The README's commands work as written. Every command of its bash blocks and of its command table is run with
tiny settings appended, in-process through the same composition and error ladder as the CLI; those that need
GPUs, a cluster, a sweep or a dataset that is not here are composed (every job of a sweep) and checked. No
project file holds an absolute path of this machine."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from step_lightning.cli import run_command
from step_lightning.config.checks import check_config
from tests.data_builders import REALDATA, make_folder
from tests.helpers import CONF_DIR, REPO

README = REPO / "README.md"
CONFIG_NAMES = {"train": "train", "eval": "eval", "flops": "flops", "token_stats": "tokens", "benchmark": "benchmark",
                "profile_layers": "profile", "visualize": "visualize", "check_data": "check", "predict": "predict",
                "export": "export"}
MEASURE_TINY = ["debug=tiny", "resolution=64", "num_images=1", "repeats=1", "warmup=0"]
TINY = {  # appended to each command: seconds on a CPU instead of hours on a GPU
    "train": ["debug=tiny", "data.num_train=8", "data.num_val=2", "trainer.max_steps=2", "policy_train.max_steps=2",
              "callbacks.visualization=null"],
    "eval": ["data.num_val=2"],
    "flops": ["resolution=64"],
    "token_stats": ["resolution=256", "num_images=2"],
    "benchmark": MEASURE_TINY,
    "profile_layers": MEASURE_TINY,
    "visualize": MEASURE_TINY,
    "check_data": [],
    "predict": [],
    "export": [],
}
# Placeholders the README uses, and what they stand for here.
RUN_DIR, SWEEP_DIR = "outputs/<date>/<time>", "multirun/<date>/<time>"
OWN_DATASET = "/path/to/mydata"  # the "Your own dataset" examples: a folder dataset the tests write
# "Use a trained model": the quickstart run, the user's photos and the outputs, in folders the tests make.
QUICKSTART, PHOTOS = "outputs/quickstart", "photos"
OUTPUTS = ("output=predictions", "output=model.onnx", "output=my-model")
CLUSTER = {"<partition>": "gpu", "<account>": "project"}


def readme_commands() -> list[str]:
    """Commands of the ```bash blocks (continuations joined, comments dropped) and of the command table."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line:
                commands.append(" ".join(line.split()))
    commands += re.findall(r"^\| `((?:python|make) [^`]*)` \|", text, re.M)
    return list(dict.fromkeys(commands))


@dataclass
class Example:
    text: str
    program: str  # a step_lightning module, "make test" or "collect_sweep"
    args: list[str]
    multirun: bool = False


def parse(text: str, run_dir: Path | None = None, sweep_dir: Path | None = None, own: Path | None = None,
          model_dirs: dict | None = None) -> Example:
    line = text.replace("<same overrides>", "").replace("../shared/realdata", str(REALDATA))
    line = line.replace(OWN_DATASET, str(own or OWN_DATASET))
    if model_dirs:
        line = line.replace(QUICKSTART, str(model_dirs["quickstart"])).replace(f"={PHOTOS}", f"={model_dirs['photos']}")
        line = line.replace(f"'{PHOTOS}/", f"'{model_dirs['photos']}/")
        for output in OUTPUTS:
            line = line.replace(output, f"output={model_dirs['out'] / output.split('=')[1]}")
    line = line.replace(RUN_DIR, str(run_dir)).replace(SWEEP_DIR, str(sweep_dir))
    for placeholder, value in CLUSTER.items():
        line = line.replace(placeholder, value)
    assert "..." not in line and not re.search(r"<[a-z ]+>", line), f"README command with a placeholder: {text}"
    argv = shlex.split(line)
    if argv[:2] == ["make", "train"]:
        return Example(text, "train", [])
    if argv[:2] == ["make", "test"]:
        return Example(text, "make test", [])
    if argv[:3] == ["pip", "install", "."]:
        return Example(text, "pip install", [])
    if argv[:2] == ["python", "scripts/collect_sweep.py"]:
        return Example(text, "collect_sweep", argv[2:])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("step_lightning."), f"unknown command form: {text}"
    args = argv[3:]
    return Example(text, argv[2].removeprefix("step_lightning."), [a for a in args if a != "-m"], "-m" in args)


def expand(overrides: list[str]) -> list[list[str]]:
    """A sweep's jobs: the product of every override's values (``tau=6899,4999``, ``'prune_heads=[8],[8,16]'``)."""
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
              else [o.input_line] for o in OverridesParser.create().parse_overrides(overrides)]
    return [list(job) for job in itertools.product(*values)]


def compose_jobs(config_name: str, args: list[str], output_dir: Path) -> tuple[list, bool]:
    """Every job's config of a command, and whether it is a sweep (``-m``, or an experiment's sweeper params)."""
    configs, sweep = [], False
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in expand(args):
            paths = [] if config_name in ("check", "predict", "export") else [f"paths.output_dir={output_dir}"]
            hydra_cfg = compose(config_name, overrides=[*job, *paths], return_hydra_config=True).hydra
            params = hydra_cfg.sweeper.get("params") or {}
            sweep |= str(hydra_cfg.mode) == "RunMode.MULTIRUN"
            for extra in expand([f"{key}={value}" for key, value in params.items()]):
                configs.append(compose(config_name, overrides=[*job, *extra, *paths]))
    return configs, sweep


def needs_more_than_this_machine(cfg) -> str | None:
    if (cfg.get("trainer") or {}).get("accelerator") in ("gpu", "cuda"):
        return "GPUs"
    root = (cfg.get("data") or {}).get("root")
    if root and not Path(root).exists():
        return f"data at {root}"
    weights = (cfg.get("backbone") or {}).get("pretrained")
    if weights and weights != "none" and not Path(weights).exists():
        return f"weights {weights} from the hub"
    return None


def run(example: Example, output_dir: Path):
    """The command on its tiny config, through the shared error ladder (SystemExit fails the test)."""
    from step_lightning.benchmark import benchmark
    from step_lightning.check_data import check_from_config
    from step_lightning.eval import evaluate
    from step_lightning.export import export
    from step_lightning.flops import flops
    from step_lightning.predict import predict
    from step_lightning.profile_layers import profile
    from step_lightning.token_stats import token_stats
    from step_lightning.train import train_command
    from step_lightning.visualize import visualize

    args = [*example.args, *TINY[example.program]]
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
    args = [a for a in args if not a.startswith("hydra.run.dir=")]
    no_run_dir = example.program in ("check_data", "predict", "export")  # they write no run folder
    paths = [] if no_run_dir else [f"paths.output_dir={run_dir or output_dir}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAMES[example.program], overrides=[*args, *paths])
    commands = {"train": train_command, "eval": lambda c: evaluate(c, args), "flops": flops,
                "token_stats": token_stats, "benchmark": lambda c: benchmark(c, args), "profile_layers": profile,
                "visualize": visualize, "check_data": check_from_config, "predict": predict, "export": export}
    return run_command(commands[example.program], cfg)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> Path:
    """The README's first command (`make train`) with tiny settings: the run its other commands refer to."""
    output_dir = tmp_path_factory.mktemp("readme_run")
    run(parse(readme_commands()[0]), output_dir)
    return output_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    """The quickstart model of "Use a trained model" (trained here), two photos, and a folder for the outputs."""
    from tests.data_builders import write_image

    base = tmp_path_factory.mktemp("use_a_model")
    photos = base / "photos"
    write_image(photos / "street.jpg", (70, 90), seed=1)
    write_image(photos / "more" / "skier.jpg", (64, 48), seed=2)
    dirs = {"quickstart": base / "quickstart", "photos": photos, "out": base / "out"}
    run(parse(f"python -m step_lightning.train debug=tiny method=cts hydra.run.dir={QUICKSTART}", model_dirs=dirs),
        base)
    return dirs


@pytest.fixture(scope="module")
def sweep_dir(readme_run, tmp_path_factory) -> Path:
    """A multirun folder of two jobs, for collect_sweep."""
    sweep = tmp_path_factory.mktemp("sweep")
    for job in ("0", "1"):
        (sweep / job).mkdir()
        shutil.copy(readme_run / "summary.json", sweep / job / "summary.json")
    return sweep


def test_readme_commands_are_found():
    commands = readme_commands()
    assert commands[0] == "make train" and len(commands) >= 20
    modules = {parse(c, Path("run"), Path("sweep")).program for c in commands}
    assert {*CONFIG_NAMES, "collect_sweep", "make test", "pip install"} <= modules


@pytest.mark.slow
@pytest.mark.parametrize("text", readme_commands(), ids=lambda text: re.sub(r"[^\w=.,:/\[\]-]+", "_", text)[:100])
def test_readme_command(text, readme_run, sweep_dir, model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    example = parse(text, readme_run, sweep_dir, make_folder(tmp_path, values=(0, 1, 2, 3, 4)), model_dirs)
    if example.program == "pip install":  # tests/test_package_install.py builds and installs the wheel
        assert (REPO / "tests" / "test_package_install.py").is_file()
        return
    if example.program == "make test":  # this suite
        assert re.search(r"^test: .*\n\t\$\(PY\) -m pytest", (REPO / "Makefile").read_text(), re.M)
        return
    if example.program == "collect_sweep":
        spec = importlib.util.spec_from_file_location("collect_sweep", REPO / "scripts" / "collect_sweep.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main(example.args).is_file()
        return
    if example.program == "train" and not example.args:
        assert json.loads((readme_run / "summary.json").read_text())["mIoU"] >= 0  # the fixture ran it
        return
    if example.program == "check_data":
        if not REALDATA.exists() and "data=folder" not in example.args:
            pytest.skip(f"no real samples at {REALDATA}")
        assert run(example, tmp_path) == 0
        return
    configs, sweep = compose_jobs(CONFIG_NAMES[example.program], example.args, tmp_path)
    if example.multirun or sweep or any(map(needs_more_than_this_machine, configs)):  # composed and checked

        for cfg in configs:
            check_config(cfg)
        return
    run(example, tmp_path)


def test_project_files_hold_no_machine_paths():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = [f for f in files if (REPO / f).is_file() and f.endswith((".py", ".md", ".yaml", ".toml", ".cfg"))
                 and re.search(r"/(?:work|home|Users)/", (REPO / f).read_text(errors="ignore"))]
    assert not offenders, f"absolute machine paths in {offenders}; use ../shared/realdata/... or <root>"
