"""DDP under Hydra: each rank reruns only its own job, and one job's process group never leaks into the next."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch

# Set in os.environ by Lightning's DDP launcher in the process that starts the other ranks.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def job_distributed_scope():
    """Keep one job's DDP state from leaking into the next job of a multirun in the same process: with
    LOCAL_RANK left in the environment the next trainer would wait for ranks it believes were started
    externally, and its process group would still point at the previous job's exited ranks."""
    saved = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def hydra_ddp_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning's ``strategy=ddp`` starts for rank ``local_rank`` under Hydra.

    Lightning's own version replays ``sys.argv``, which in a multirun holds the whole sweep (each rank
    would start a new sweep) and misses the job's directory. This replays only this job's overrides, as a
    single run (``hydra.mode=RUN``, even when an experiment sets MULTIRUN) in this job's output directory,
    without a second ``.hydra/`` there.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is not None:
        command = [sys.executable, "-m", __main__.__spec__.name]
    else:
        command = [sys.executable, os.path.join(get_original_cwd(), sys.argv[0])]
    command.append(f"--config-name={hc.job.config_name}")
    command += [f"--config-dir={s.path}" for s in hc.runtime.config_sources if s.provider == "command-line"]
    command += list(hc.overrides.task)
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
        f"hydra.job.chdir={hc.job.chdir}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]
    return command, get_original_cwd()


def use_hydra_ddp_command() -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    if not hasattr(subprocess_script, "_hydra_subprocess_cmd"):  # fail loudly if Lightning moves it
        raise RuntimeError("lightning's _hydra_subprocess_cmd moved; update step_lightning.lit.ddp.hydra_ddp_command")
    subprocess_script._hydra_subprocess_cmd = hydra_ddp_command
