"""Failure behaviour: configuration mistakes before any data/model, NaN loss, out of memory, atomic checkpoints,
and the one error ladder of every command: measurement commands' mistakes, corrupt or mismatched checkpoints,
data errors inside loader workers and a full disk are one line; leftover temporary files are removed."""

from __future__ import annotations

import errno

import pytest
import torch

from step_lightning import train as train_mod
from step_lightning.cli import one_line_error, run_command
from step_lightning.config.checks import check_config
from step_lightning.core import ConfigError
from step_lightning.lit.callbacks.durability import AtomicCheckpointIO, NonFiniteLossError
from tests.data_builders import make_ade
from tests.helpers import REPO, TINY_RUN, compose_config, run_module, run_train

MISTAKES = [
    (["tau=69"], "tau=69 is not exactly four digits"),
    (["tau=6.8"], "tau=6.8 must be four digits"),
    (["method=dtop", "prune_heads=[16,8]"], "must be strictly increasing"),
    (["method=dtop", "prune_heads=[2]"], "must lie within 1..1"),
    (["crop_size=70"], "crop_size=70 must be a positive multiple of 16"),
    (["trainer=ddp_sim", "data.batch_size=3"], "data.batch_size=3 (global) is not divisible by the 2 devices"),
    (["trainer.devices=[0,1,2]", "data.batch_size=4"], "not divisible by the 3 devices"),
    (["eval.mode=slide", "eval.stride=100"], "eval.stride=100 must be within 1..eval.crop (64)"),
    # Numbers out of range: the settings' table (config.checks.RANGES, CHOICES), one line each.
    (["data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be an integer >= 0"),
    (["optim.lr=-1"], "optim.lr=-1 must be a number > 0"),
    (["optim.lr=abc"], "optim.lr=abc must be a number > 0"),
    (["optim.betas=[0.9,1.5]"], "optim.betas.1=1.5 must be a number in [0, 1)"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be an integer >= 1"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be an integer >= 1"),
    (["prune_threshold=2"], "prune_threshold=2 must be a number in (0, 1]"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 4294967295]"),
    (["backbone.drop_path_rate=1.5"], "backbone.drop_path_rate=1.5 must be a number in [0, 1)"),
    (["loss.dice_weight=-1"], "loss.dice_weight=-1 must be a number >= 0"),
    (["trainer.precision=17"], "trainer.precision=17 must be one of '64-true'"),
    (["optim.schedule=step"], "optim.schedule=step must be 'poly' or 'cosine'"),
    # An untrained policy network is for speed measurements, never trained with.
    (["method=step", "policy=random"], "policy=random (an untrained policy network) is for speed measurements"),
]


@pytest.mark.parametrize(("overrides", "message"), MISTAKES, ids=[m[1][:40] for m in MISTAKES])
def test_config_mistakes_stop_before_data_or_model(tmp_path, monkeypatch, overrides, message):
    cfg = compose_config([*TINY_RUN, *overrides], output_dir=tmp_path)

    def no_instantiate(*_, **__):
        raise AssertionError("data or model was built before the configuration was checked")

    monkeypatch.setattr(train_mod.hydra.utils, "instantiate", no_instantiate)
    monkeypatch.setattr(train_mod.SegmentationModule, "from_config", no_instantiate)
    with pytest.raises(ConfigError) as info:
        train_mod.train(cfg)
    assert message in str(info.value)


def test_recipe_stride_larger_than_the_crop_stops_before_data_or_model(tmp_path, monkeypatch):
    """ADE20K ViT-L's recipe slides 640 px windows by 608 px; with crop_size=128 the windows would leave pixels
    unscored, which the first validation found hours in."""
    cfg = compose_config(["debug=tiny", "method=segvit", "data=ade20k", "backbone=vit_l", "crop_size=128"],
                         output_dir=tmp_path)
    monkeypatch.setattr(train_mod.hydra.utils, "instantiate", pytest.fail)
    with pytest.raises(ConfigError, match=r"eval.stride=608 must be within 1..eval.crop \(128\): a larger stride"):
        train_mod.train(cfg)


def test_missing_resume_checkpoint_is_a_config_error(tmp_path, monkeypatch):
    cfg = compose_config([*TINY_RUN, f"ckpt_path={tmp_path}/nope.ckpt"], output_dir=tmp_path)
    monkeypatch.setattr(train_mod.hydra.utils, "instantiate", pytest.fail)
    with pytest.raises(ConfigError, match="ckpt_path=.*nope.ckpt does not exist"):
        train_mod.train(cfg)


def test_valid_tiny_config_passes_checks(tmp_path):
    check_config(compose_config([*TINY_RUN, "method=step", "tau=4999", "prune_heads=[1]"], output_dir=tmp_path))


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_names_the_settings_to_lower(tmp_path, monkeypatch, caplog, error):
    cfg = compose_config(TINY_RUN, output_dir=tmp_path)

    def oom(_cfg):
        raise error

    monkeypatch.setattr(train_mod, "train", oom)
    with pytest.raises(SystemExit) as info:
        train_mod.main(cfg)  # a DictConfig argument bypasses Hydra's command-line parsing
    assert info.value.code == 1
    text = caplog.records[-1].getMessage()
    assert text.startswith("error: out of memory") and "\n" not in text
    for setting in ("data.batch_size (now 4", "crop_size (now 64)", "trainer.precision=bf16-mixed", "backbone"):
        assert setting in text


def test_other_runtime_errors_propagate(tmp_path, monkeypatch):
    cfg = compose_config(TINY_RUN, output_dir=tmp_path)
    monkeypatch.setattr(train_mod, "train", lambda _cfg: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train_mod.main(cfg)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from step_lightning.lit.module import SegmentationModule

    original = SegmentationModule.training_step

    def nan_from_step_3(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 3 else loss

    monkeypatch.setattr(SegmentationModule, "training_step", nan_from_step_3)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 4") as info:
        run_train([*TINY_RUN, "trainer.max_steps=6"], tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is {last}" in str(info.value)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # every 2 steps (val_check_interval); nothing written after the NaN
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "summary.json").exists()


def test_checkpoint_io_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt  # the process being stopped in the middle of the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=False) == {"global_step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_trainer_config_uses_atomic_checkpoint_io(tmp_path):
    import hydra

    cfg = compose_config(TINY_RUN, output_dir=tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.slow
def test_cli_prints_one_error_line_without_traceback(tmp_path):
    result = run_module("step_lightning.train", [*TINY_RUN, "tau=12345"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: tau=12345 is not exactly four digits")
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_cli_unknown_group_option_is_reported_cleanly(tmp_path):
    result = run_module("step_lightning.train", ["backbone=vit_x"], tmp_path)
    assert result.returncode == 1
    assert "Could not find 'backbone/vit_x'" in result.stderr
    assert "vit_b" in result.stderr  # the available options are listed
    assert "Traceback" not in result.stderr + result.stdout
    assert str(REPO) not in result.stdout


def error_line(caplog, command, cfg) -> str:
    """Run ``command`` through the shared ladder; the one ``error: ...`` line it ends with."""
    with pytest.raises(SystemExit) as info:
        run_command(command, cfg)
    assert info.value.code == 1
    message = caplog.records[-1].getMessage()
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def garbage_checkpoint(tmp_path) -> str:
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
    return str(path)


def measure_mistakes(tmp_path):
    from step_lightning.benchmark import benchmark
    from step_lightning.flops import flops
    from step_lightning.profile_layers import profile
    from step_lightning.token_stats import token_stats
    from step_lightning.visualize import visualize

    tiny = ["debug=tiny", "resolution=64", "num_images=1", "data.num_val=2"]
    return [
        (flops, "flops", [f"ckpt_path={garbage_checkpoint(tmp_path)}"], "is not a readable checkpoint"),
        (token_stats, "tokens", [*tiny, "data.num_classes=2"], "data.num_classes=2: the synthetic scenes need >= 3"),
        (benchmark, "benchmark", [*tiny, "methods=[nope]"], "method entry 'nope'"),
        (profile, "profile", [*tiny, "crop=diagonal"], "crop=diagonal must be 'center' or 'tiles'"),
        (visualize, "visualize", ["crop_size=70", "resolution=70"], "crop_size=70 must be a positive multiple of 16"),
        (visualize, "visualize", [*tiny, "method=dcts", "policy=/nowhere/policy.ckpt"], "policy=/nowhere/policy.ckpt"),
    ]


@pytest.mark.parametrize("case", range(6), ids=["flops", "token_stats", "benchmark", "profile_layers", "visualize",
                                                  "visualize-policy"])
def test_measurement_command_mistakes_are_one_line(tmp_path, caplog, case):
    command, config, overrides, expected = measure_mistakes(tmp_path)[case]
    cfg = compose_config(overrides, config, tmp_path / "out")
    message = error_line(caplog, lambda c: command(c, overrides) if config == "benchmark" else command(c), cfg)
    assert expected in message
    assert "oracle" not in message  # a fix that changes the method is never suggested


@pytest.mark.parametrize("config", ["train", "eval"])
def test_corrupt_checkpoint_is_one_line(tmp_path, caplog, config):
    from step_lightning.eval import evaluate

    path = garbage_checkpoint(tmp_path)
    cfg = compose_config([*TINY_RUN, f"ckpt_path={path}"], config, tmp_path / "out")
    command = train_mod.train_command if config == "train" else lambda c: evaluate(c, [f"ckpt_path={path}"])
    message = error_line(caplog, command, cfg)
    assert f"ckpt_path={path} is not a readable checkpoint" in message and "weights_only" not in message


@pytest.mark.slow
def test_checkpoint_of_another_backbone_is_one_line(tiny_run, tmp_path):
    last = tiny_run["output_dir"] / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as info:
        run_train([*TINY_RUN, "backbone=vit_s", f"ckpt_path={last}"], tmp_path)
    message = str(info.value)
    assert "does not fit this model" in message and "\n" not in message and len(message) < 500


def test_data_worker_errors_keep_the_original_message(tmp_path):
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            raise ConfigError(f"{tmp_path}/img{index}.jpg: cannot read this image; delete it with its label.")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=2)
    with pytest.raises(ConfigError) as info:
        next(iter(loader))
    assert "DataLoader worker" in str(info.value) and "Traceback" in str(info.value)
    line = one_line_error(info.value, compose_config(TINY_RUN, output_dir=tmp_path))
    assert line == f"{tmp_path}/img0.jpg: cannot read this image; delete it with its label."


@pytest.mark.slow
def test_corrupt_image_under_loader_workers_is_one_line(tmp_path, caplog):
    root = make_ade(tmp_path / "data", {"training": 4, "validation": 2})
    broken = root / "images" / "training" / "ADE_train_00000001.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    overrides = ["debug=tiny", "method=segvit", "data=ade20k", f"data.root={root}", "data.num_workers=2",
                 "data.batch_size=2"]
    cfg = compose_config(overrides, output_dir=tmp_path / "run")
    message = error_line(caplog, train_mod.train_command, cfg)
    assert message.startswith(f"error: {broken}: cannot read this image") and "DataLoader" not in message


@pytest.mark.slow
def test_disk_full_is_one_line_and_leaves_the_last_checkpoint_whole(tmp_path, caplog, monkeypatch):
    """The disk fills up under the second checkpoint file written (the best checkpoint after the first
    validation; last.ckpt of step 2 came first): torch.save sees failing writes, as on a full disk."""
    from step_lightning.core import files

    real_fdopen = files.os.fdopen
    binary_files = []

    class FillsUp:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real_fdopen(fd, mode, *args, **kwargs)
        if "b" not in mode:
            return file
        binary_files.append(fd)
        return FillsUp(file) if len(binary_files) > 1 else file

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    cfg = compose_config([*TINY_RUN, "callbacks.visualization=null"], output_dir=tmp_path)
    message = error_line(caplog, train_mod.train_command, cfg)
    assert message.startswith(f"error: no space left on device while writing {tmp_path / 'checkpoints'}/step")
    assert "hydra.run.dir" in message
    monkeypatch.setattr(files.os, "fdopen", real_fdopen)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_leftover_temporary_files_are_removed_at_the_start(tmp_path):
    stale = [tmp_path / "checkpoints" / ".last.ckpt.k3j_x9a2.tmp", tmp_path / ".summary.json.abcdefgh.tmp"]
    kept = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / ".hydra" / "config.yaml", tmp_path / ".notes.tmp"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert run_command(lambda c: "ran", compose_config(TINY_RUN, output_dir=tmp_path)) == "ran"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


@pytest.mark.slow
def test_measurement_cli_error_is_one_line(tmp_path):
    result = run_module("step_lightning.benchmark", ["debug=tiny", "resolution=64", "methods=[nope]"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: method entry 'nope'")
    assert "Traceback" not in result.stderr + result.stdout


def test_every_numeric_setting_of_the_configs_has_a_range():
    """A new numeric setting gets its range in config.checks.RANGES, or a rule of its own named here.
    Interpolated values (``${crop_size}``) are the settings they copy."""
    from omegaconf import OmegaConf

    from step_lightning.config.checks import RANGES

    # Their own rules: crop sides and the resolution (positive multiples of 16), tau (four digits), layer
    # numbers (within the depth), the slide stride (within the window), the devices (divide the batch),
    # the synthetic scenes' class count (>= 3).
    own_rules = ("crop_size", "resolution", "tau", "eval.stride", "prune_heads", "backbone.taps",
                 "backbone.dtop_heads", "backbone.single_head", "trainer.devices", "data.num_classes")
    missing = set()
    for name in ("train", "benchmark", "profile", "tokens", "visualize", "flops"):
        for data in ("synthetic", "ade20k", "cityscapes", "cocostuff10k", "folder"):
            for backbone in ("vit_b", "vit_l"):
                cfg = compose_config([f"data={data}", f"backbone={backbone}"], name, REPO / "outputs" / "unused")
                for key, value in walk(OmegaConf.to_container(cfg, resolve=False)):
                    numeric = isinstance(value, int | float) and not isinstance(value, bool)
                    if numeric and key not in RANGES and not any(key.partition(".")[0] == o.partition(".")[0]
                                                                 and key.startswith(o) for o in own_rules):
                        missing.add(key)
    assert not missing, sorted(missing)


def walk(container, prefix=""):
    if isinstance(container, dict):
        for key, value in container.items():
            yield from walk(value, f"{prefix}{key}.")
    elif isinstance(container, list):
        for index, value in enumerate(container):
            yield from walk(value, f"{prefix}{index}.")
    else:
        yield prefix.rstrip("."), container


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_output_folder_problems_are_one_line_before_hydra(tmp_path, monkeypatch, where):
    from step_lightning.cli import check_command_line

    blocker = tmp_path / "results"
    blocker.write_text("a file where the run folder's parent should be")
    folder = blocker / "run" if where == "file" else tmp_path / "run"
    if where == "unwritable":  # tests run as root, whom permission bits do not stop: the check's answer is faked
        monkeypatch.setattr("step_lightning.cli.os.access", lambda path, mode: str(path) != str(tmp_path))
    with pytest.raises(ConfigError) as info:
        check_command_line([f"hydra.run.dir={folder}"])
    message = str(info.value)
    expected = f"{blocker} is a file, not a folder" if where == "file" else f"cannot write in {tmp_path}"
    assert message.startswith(f"hydra.run.dir={folder}: {expected}") and "\n" not in message
    with pytest.raises(ConfigError, match="hydra.sweep.dir"):
        check_command_line(["-m", f"hydra.sweep.dir={folder}"])


@pytest.mark.slow
def test_cli_output_folder_under_a_file_is_one_line(tmp_path):
    (tmp_path / "results").write_text("x")
    result = run_module("step_lightning.eval", ["ckpt_path=x.ckpt"], tmp_path / "results" / "run")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: hydra.run.dir={tmp_path}/results/run: {tmp_path}/results is a file, not a folder; "
        "give a folder for the outputs.")
    assert "Traceback" not in result.stderr + result.stdout


def test_init_from_another_backbone_stops_before_the_first_step(tmp_path, monkeypatch):
    from tests.helpers import write_segmenter_checkpoint

    other = write_segmenter_checkpoint(["method=segvit", "backbone=vit_s"], tmp_path / "vit_s" / "last.ckpt")
    monkeypatch.setattr(train_mod.SegmentationModule, "from_config", pytest.fail)  # no model, no step
    with pytest.raises(ConfigError) as info:
        train_mod.train(compose_config([*TINY_RUN, f"init_from={other}"], output_dir=tmp_path / "run"))
    message = str(info.value)
    assert message.startswith(f"init_from={other} fills 1/170 of this model's tensors, fewer than init_from_min_"
                              "fraction=0.5 (e.g. encoder.pos_embed: file (1, 16, 384), model (1, 16, 192))")
    assert "init_from_min_fraction=0 to start from its matching tensors on purpose" in message


def test_init_from_partial_on_purpose(tmp_path):
    from step_lightning.config.checks import check_init_from
    from tests.helpers import write_segmenter_checkpoint

    other = write_segmenter_checkpoint(["method=segvit", "backbone=vit_s"], tmp_path / "vit_s" / "last.ckpt")
    check_init_from(compose_config([*TINY_RUN, f"init_from={other}", "init_from_min_fraction=0"], output_dir=tmp_path),
                    num_classes=8, ignore_index=255)
    same = write_segmenter_checkpoint(["method=segvit"], tmp_path / "vit_t" / "last.ckpt")
    check_init_from(compose_config([*TINY_RUN, f"init_from={same}", "init_from_min_fraction=1"], output_dir=tmp_path),
                    num_classes=8, ignore_index=255)


def test_disk_full_inside_torch_save_is_recognised():
    """torch's zip writer reports a failed write as RuntimeError(inline_container) raised while handling the
    OSError: the error ladder follows the chain."""
    import io

    from step_lightning.core.files import disk_full

    class Full(io.RawIOBase):  # room for the first bytes only
        written = 0

        def writable(self):
            return True

        def write(self, data):
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

    with pytest.raises(RuntimeError, match="inline_container") as info:
        torch.save({"w": torch.zeros(1000)}, Full())
    assert disk_full(info.value).errno == errno.ENOSPC
    assert disk_full(RuntimeError("shape mismatch")) is None


def test_missing_data_root_stops_before_the_policy_phase(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "train_policy", pytest.fail)
    monkeypatch.setattr(train_mod.SegmentationModule, "from_config", pytest.fail)
    cfg = compose_config(["debug=tiny", "method=step", "policy=train", "data=ade20k", f"data.root={tmp_path}/nope",
                          "backbone.pretrained=none"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=f"data.root={tmp_path}/nope does not exist"):
        train_mod.train(cfg)


def test_a_library_refusing_a_setting_of_its_group_is_one_line(tmp_path):
    """Beyond the settings' table: what a config group's target (here Lightning's Trainer) refuses, through
    Hydra's instantiation, is one line naming the group."""
    import hydra

    cfg = compose_config([*TINY_RUN, "trainer.gradient_clip_algorithm=foo"], output_dir=tmp_path)
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(cfg.trainer)
    line = one_line_error(info.value, cfg)
    assert line == ("trainer: `gradient_clip_algorithm` foo is invalid. Allowed algorithms: ['value', 'norm']. "
                    "(fix the trainer.* setting).")
