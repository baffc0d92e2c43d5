"""Optional extras: selecting a logger or launcher whose package is not installed is one line naming the extra."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from step_lightning.config.checks import check_config
from step_lightning.config.extras import check_launcher_extras
from step_lightning.core import ConfigError
from tests.helpers import REPO


@pytest.mark.parametrize("logger, module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_logger_without_its_extra(compose_cfg, monkeypatch, logger, module):
    cfg = compose_cfg([f"logger={logger}"])
    check_config(cfg)  # installed here (make test installs the dev extra, which includes it)
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert str(error.value) == (f"logger={logger} needs the optional package {module}, which is not installed: "
                                f"pip install 'step-lightning[{logger}]'")


def test_launcher_without_its_extra(monkeypatch):
    check_launcher_extras(["-m", "hydra/launcher=slurm", "data=ade20k"])
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    check_launcher_extras(["hydra/launcher=basic", "logger=csv"])
    with pytest.raises(ConfigError, match=r"hydra/launcher=slurm needs .* pip install 'step-lightning\[slurm\]'"):
        check_launcher_extras(["-m", "hydra/launcher=slurm"])


def test_train_command_reports_a_missing_launcher_in_one_line(tmp_path):
    code = ("import sys; sys.modules['hydra_plugins.hydra_submitit_launcher'] = None; "
            "sys.argv = ['step-train', '-m', 'hydra/launcher=slurm']; "
            "from step_lightning.train import main; main()")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm needs the optional package hydra_submitit_launcher, which is not installed: "
        "pip install 'step-lightning[slurm]'"]
