"""Training entry point.

    python -m step_lightning.train [overrides]     e.g. backbone=vit_l data=ade20k method=step tau=6899

Fits, validates the best checkpoint, writes ``summary.json`` in the run directory and prints its path.
Mistakes the user must fix end the CLI with one ``error: ...`` line and exit status 1; SIGTERM saves
``checkpoints/last.ckpt`` and exits with 143.
"""

from __future__ import annotations

import netrc
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from step_lightning.callbacks.durability import LAST, NonFiniteLossError
from step_lightning.config import check_config, register_resolvers
from step_lightning.core import ConfigError
from step_lightning.core.files import write_json
from step_lightning.flops import mean_gflops
from step_lightning.lit.module import SegmentationModule
from step_lightning.models.factory import build_model, tokenizer_kind


def instantiate_group(group: DictConfig | None, exclude: tuple[str, ...] = (), name_suffix: str = "") -> list:
    """Instantiate every ``_target_`` entry of a callbacks/logger group (``name_suffix`` separates the
    loggers of a second training in the same run, e.g. the policy's)."""
    items = []
    for key, c in (group or {}).items():
        if c is None or "_target_" not in c or key in exclude:
            continue
        extra = {"name": f"{c.name}_{name_suffix}"} if name_suffix and "name" in c else {}
        items.append(hydra.utils.instantiate(c, **extra))
    return items


def build_module(cfg: DictConfig, datamodule) -> SegmentationModule:
    model = build_model(cfg, datamodule.num_classes, datamodule.ignore_index)
    return SegmentationModule(
        model,
        num_classes=datamodule.num_classes,
        ignore_index=datamodule.ignore_index,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        head_lr_mult=cfg.optim.head_lr_mult,
        betas=tuple(cfg.optim.betas),
        warmup_steps=cfg.optim.warmup_steps,
        schedule=cfg.optim.schedule,
        poly_power=cfg.optim.poly_power,
        eval_mode=cfg.eval.mode,
        eval_crop=cfg.eval.crop,
        eval_stride=cfg.eval.stride,
        loss=OmegaConf.to_container(cfg.loss),
        init_from=cfg.get("init_from"),
    )


def sample_batch(datamodule, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A few validation images (and labels, for an oracle policy) center-cropped to crop x crop, the
    model's input size, for the per-image GFLOPs count (token counts, hence FLOPs, vary per image)."""
    images, labels = [], []
    for i in range(min(count, len(datamodule.val_set))):
        sample = datamodule.val_set[i]
        image, label = sample["image"], sample["label"]
        if label.shape != image.shape[1:]:
            label = F.interpolate(label[None, None].float(), size=image.shape[1:], mode="nearest")[0, 0].long()
        images.append(image)
        labels.append(label)
    crop = min(datamodule.crop_size, *(img.shape[1] for img in images), *(img.shape[2] for img in images))
    crop -= crop % 16
    return (torch.stack([img[:, :crop, :crop] for img in images]), torch.stack([lab[:crop, :crop] for lab in labels]))


def train_policy(cfg: DictConfig, datamodule, output_dir: Path) -> dict:
    """Train the dCTS policy network on the datamodule's labels; returns its checkpoint and metrics."""
    from step_lightning.lit.policy_module import PolicyModule

    pcfg = cfg.policy_train
    module = PolicyModule(
        pretrained=pcfg.pretrained,
        mean=list(cfg.backbone.mean),
        std=list(cfg.backbone.std),
        ignore_index=datamodule.ignore_index,
        lr=pcfg.lr,
        weight_decay=pcfg.weight_decay,
        warmup_steps=pcfg.warmup_steps,
    )
    checkpoint = ModelCheckpoint(dirpath=output_dir / "policy", filename="policy-step{step:06d}",
                                 auto_insert_metric_name=False, monitor="val/loss", mode="min")
    # The group's last_checkpoint callback writes policy/last.ckpt: it follows the best-checkpoint folder.
    loggers = instantiate_group(cfg.get("logger"), name_suffix="policy")
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=pcfg.max_steps,
        val_check_interval=pcfg.val_check_interval,
        callbacks=[checkpoint, *instantiate_group(cfg.get("callbacks"), exclude=("model_checkpoint",))],
        logger=loggers or False,
    )
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        finish_wandb(loggers)  # the segmenter's training is a separate W&B run
    best = checkpoint.best_model_path or checkpoint.last_model_path
    metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
    print("policy: " + " ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(metrics.items())))
    return {"checkpoint": best, "metrics": metrics, "steps": trainer.global_step}


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


def train(cfg: DictConfig) -> dict:
    """Fit and evaluate; returns the final validation metrics (also written to summary.json).

    ``task=policy`` trains only the dCTS policy. With a supertoken method and ``policy=train``, the policy
    is trained first in this run (``<run>/policy/``) and then drives the segmenter's tokenizer.
    """
    with job_distributed_scope():
        return train_job(cfg)


def train_job(cfg: DictConfig) -> dict:
    start = time.time()
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resume = resume_path(cfg, output_dir) if cfg.task != "policy" else None
    datamodule = hydra.utils.instantiate(cfg.data)
    if cfg.task == "policy":
        policy = train_policy(cfg, datamodule, output_dir)
        summary = {"task": "policy", **policy, "wall_time_s": time.time() - start,
                   "config": OmegaConf.to_container(cfg, resolve=True)}
        return finish(summary, output_dir, f"policy checkpoint: {policy['checkpoint']}")
    policy_summary = None
    if cfg.policy == "train" and tokenizer_kind(cfg) != "patch":
        if resume:  # the policy is inside the checkpoint; its file only gives the network's shape
            from step_lightning.eval import trained_policy

            cfg.policy = str(trained_policy(resume))
        else:
            policy_summary = train_policy(cfg, datamodule, output_dir)
            cfg.policy = policy_summary["checkpoint"]
    module = build_module(cfg, datamodule)
    loggers = instantiate_group(cfg.get("logger"))
    try:
        return fit_and_summarise(cfg, datamodule, module, loggers, resume, policy_summary, output_dir, start)
    finally:
        finish_wandb(loggers)


def resume_path(cfg: DictConfig, output_dir: Path) -> Path | None:
    """``ckpt_path`` if given, else (``auto_resume``) this run directory's own last.ckpt, which a requeued
    SLURM job or a rerun into the same ``hydra.run.dir`` finds."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; give a run's checkpoints/{LAST}.")
        return path
    own = output_dir / "checkpoints" / LAST
    if cfg.get("auto_resume") and own.is_file():
        print(f"resuming from {own} (auto_resume)")
        return own
    return None


def fit_and_summarise(cfg, datamodule, module, loggers, resume, policy_summary, output_dir, start) -> dict:
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers or False
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    checkpoint = best.best_model_path if best else ""
    trainer.validate(module, datamodule=datamodule, ckpt_path=checkpoint or None, verbose=False)
    val = module.last_val
    summary = {
        "method": cfg.get("method"),
        "mIoU": val["mIoU"],
        "aAcc": val["aAcc"],
        "per_class_IoU": dict(zip(datamodule.class_names, val["IoU"].tolist(), strict=True)),
        "gflops": mean_gflops(module.model, *sample_batch(datamodule)),
        "tokens_per_image": val["token_stats"]["total"]["mean"],
        "token_stats": val["token_stats"],
        "exit_stats": val["exit_stats"],
        "wall_time_s": time.time() - start,
        "checkpoint": checkpoint,
        "steps": trainer.global_step,
        "policy": policy_summary,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    line = f"mIoU={summary['mIoU']:.2f} aAcc={summary['aAcc']:.2f} gflops={summary['gflops']:.2f} " + \
        f"tokens_per_image={summary['tokens_per_image']:.1f} reduction={summary['token_stats']['reduction']:.2f}x"
    if summary["exit_stats"]:
        line += f" halted_fraction={summary['exit_stats']['halted_fraction']:.3f}"
    log_final(loggers, summary, trainer.global_step)
    return finish(summary, output_dir, line)


def final_metrics(summary: dict) -> dict[str, float]:
    """The flat ``final/...`` metrics of a summary: dataset-level scores, per-class IoU, cost, tokens, exits."""
    metrics = {"final/mIoU": summary["mIoU"], "final/aAcc": summary["aAcc"], "final/gflops": summary["gflops"],
               "final/tokens_per_image": summary["tokens_per_image"],
               "final/token_reduction": summary["token_stats"]["reduction"]}
    metrics |= {f"final/IoU/{name}": iou for name, iou in summary["per_class_IoU"].items() if iou == iou}
    if summary["exit_stats"]:
        metrics["final/halted_fraction"] = summary["exit_stats"]["halted_fraction"]
    return {k: float(v) for k, v in metrics.items()}


@rank_zero_only
def log_final(loggers: list[Logger], summary: dict, step: int) -> None:
    metrics = final_metrics(summary)
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):  # the run's summary is what the W&B runs table shows
            logger.experiment.summary.update(metrics)
        logger.save()


def finish_wandb(loggers: list[Logger]) -> None:
    """End this job's W&B run, so that the next job of a multirun (same process) starts its own."""
    if any(isinstance(logger, WandbLogger) for logger in loggers) and rank_zero_only.rank == 0:
        import wandb

        run = wandb.run
        offline = run is not None and run.settings.mode == "offline"
        directory = run.settings.sync_dir if run is not None else None
        wandb.finish()
        if offline:
            print(f"wandb: offline run saved; upload it with `wandb sync {directory}`")


def finish(summary: dict, output_dir: Path, headline: str) -> dict:
    """Write summary.json atomically (rank 0 only) and print its path last, for scripts to parse."""
    if rank_zero_only.rank == 0:
        path = write_json(output_dir / "summary.json", summary)
        print(headline)
        print(f"summary: {path}")
    return summary


def out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the RuntimeErrors of other backends/older torch, the CPU allocator's."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )


def oom_advice(cfg: DictConfig, error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"out of memory ({first[:200]}). Lower data.batch_size (now {cfg.data.get('batch_size')}, the global "
        f"batch; trainer=ddp splits it over GPUs), crop_size (now {cfg.crop_size}), use "
        f"trainer.precision=bf16-mixed (now {cfg.trainer.get('precision')}) or a smaller backbone "
        f"(now {cfg.backbone.name})."
    )


def wandb_key_available() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` stores it), without touching wandb."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline_unless_logged_in(cfg: DictConfig) -> None:
    """No API key and no WANDB_MODE: run W&B offline instead of failing on a machine without network."""
    if "wandb" not in (cfg.get("logger") or {}) or os.environ.get("WANDB_MODE") or wandb_key_available():
        return
    print("wandb: no API key found; logging offline (set WANDB_API_KEY or run `wandb login` to log online)")
    os.environ["WANDB_MODE"] = "offline"  # before wandb reads its settings; inherited by DDP ranks


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
        raise RuntimeError("lightning's _hydra_subprocess_cmd moved; update step_lightning.train.hydra_ddp_command")
    subprocess_script._hydra_subprocess_cmd = hydra_ddp_command


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """CLI: the objective for Hydra sweepers (final val mIoU); user errors as one ``error:`` line."""
    use_hydra_ddp_command()
    wandb_offline_unless_logged_in(cfg)
    try:
        return float(train(cfg).get("mIoU", float("nan")))  # task=policy has no mIoU
    except (ConfigError, NonFiniteLossError) as e:
        raise SystemExit(f"error: {e}") from None
    except SIGTERMException:
        print(f"error: stopped by SIGTERM; resume with ckpt_path={Path(cfg.paths.output_dir) / 'checkpoints' / LAST}",
              file=sys.stderr)
        raise SystemExit(143) from None
    except (RuntimeError, MemoryError) as e:
        if out_of_memory(e):
            raise SystemExit(f"error: {oom_advice(cfg, e)}") from None
        raise


if __name__ == "__main__":
    register_resolvers()
    main()
