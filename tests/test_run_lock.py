"""One live run per run folder: a second run into a held folder stops with one line before any work (also
before Hydra writes there), a killed run's lock is taken over, DDP's other ranks share rank 0's folder, and
filesystems without flock fall back to the owner's pid and host."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from step_lightning import cli
from step_lightning.core import ConfigError
from step_lightning.core import lock as lock_mod
from step_lightning.core.lock import LOCK_NAME, RunFolderLock
from tests.helpers import REPO, TINY_RUN, compose_config, run_module

HOLDER = "import sys, time; from step_lightning.core.lock import RunFolderLock; " \
         "RunFolderLock(sys.argv[1], 'holder').acquire(); print('held', flush=True); time.sleep(300)"


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock of ``tmp_path / "run"`` until killed; yields it."""
    folder = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_held_folder_is_refused_with_the_owner_named(tmp_path, holder):
    with pytest.raises(ConfigError) as info:
        RunFolderLock(tmp_path / "run").acquire()
    message = str(info.value)
    assert f"in use by a live run, pid {holder.pid} on {socket.gethostname()} (holder)" in message
    assert "hydra.run.dir" in message and "\n" not in message


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)  # nothing of it runs again: the lock file stays, its flock goes
    holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).is_file()
    with RunFolderLock(tmp_path / "run", "second") as lock:
        assert lock.took_over["pid"] == holder.pid
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released: the folder is free again


def test_a_killed_runs_forked_worker_holding_the_lock_for_a_moment_is_waited_for(tmp_path):
    """Data-loader workers are forked, so they share the lock; they leave within seconds of their parent."""
    worker = "import os, sys, time; from step_lightning.core.lock import RunFolderLock; " \
             "RunFolderLock(sys.argv[1], 'holder').acquire(); " \
             "os.fork() == 0 and (time.sleep(2), os._exit(0)); print('held', flush=True); time.sleep(300)"
    owner = subprocess.Popen([sys.executable, "-c", worker, str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    assert owner.stdout.readline().strip() == "held"
    owner.kill()
    owner.wait()
    with RunFolderLock(tmp_path / "run") as lock:
        assert lock.took_over["pid"] == owner.pid


def test_a_second_run_stops_before_any_work_and_the_first_one_is_untouched(tmp_path, caplog, holder):
    cfg = compose_config(TINY_RUN, output_dir=tmp_path / "run")
    ran = []
    with pytest.raises(SystemExit) as info:
        cli.run_command(lambda c: ran.append(1), cfg)
    assert info.value.code == 1 and not ran
    line = caplog.records[-1].getMessage()
    assert line.startswith(f"error: {tmp_path / 'run'} is in use by a live run, pid {holder.pid}")
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid


def test_ranks_above_zero_share_the_folder_of_rank_zero(tmp_path, monkeypatch, holder):
    monkeypatch.setattr(cli.rank_zero_only, "rank", 1)
    cfg = compose_config(TINY_RUN, output_dir=tmp_path / "run")
    assert cli.run_command(lambda c: "ran", cfg) == "ran"
    cli.check_command_line([f"hydra.run.dir={tmp_path / 'run'}"])
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid


def test_commands_release_the_folder_and_sequential_runs_reuse_it(tmp_path):
    cfg = compose_config(TINY_RUN, output_dir=tmp_path / "run")
    for _ in range(2):
        assert cli.run_command(lambda c: (tmp_path / "run" / LOCK_NAME).is_file(), cfg) is True
    assert not (tmp_path / "run" / LOCK_NAME).exists()


@pytest.mark.parametrize("restarts", [1, 0], ids=["requeued", "another-run-of-the-job"])
def test_a_requeued_slurm_job_takes_over_from_its_earlier_incarnation(tmp_path, monkeypatch, restarts):
    """After preemption SLURM ends the job, then starts it again (maybe on another node, whose lock a network
    filesystem may still hold): a higher SLURM_RESTART_COUNT takes over; the same count is another run."""
    folder = tmp_path / "run"
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
        if restarts:
            with RunFolderLock(folder) as lock:
                assert lock.took_over["pid"] == holder.pid
                assert json.loads((folder / LOCK_NAME).read_text())["slurm_restarts"] == 1
        else:
            with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
                RunFolderLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_without_flock_the_pid_and_host_decide(tmp_path, monkeypatch):
    def no_flock(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    for owner, held in [({"pid": os.getppid(), "host": here}, True), ({"pid": dead.pid, "host": here}, False),
                        ({"pid": 1, "host": "another-host"}, True)]:
        (folder / LOCK_NAME).write_text(json.dumps(owner))
        if held:
            with pytest.raises(ConfigError, match=f"pid {owner['pid']} on {owner['host']}"):
                RunFolderLock(folder).acquire()
        else:
            RunFolderLock(folder).acquire().release()


@pytest.mark.slow
def test_cli_second_run_is_one_line_and_hydra_writes_nothing_there(tmp_path, holder):
    folder = tmp_path / "run"
    result = run_module("step_lightning.train", TINY_RUN, folder)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {folder} is in use by a live run, pid {holder.pid}")
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # no .hydra/, no train.log of the second run
