"""Atomic writes: whole files, with the permissions a plain open gives them."""

from __future__ import annotations

import os
import stat

import pytest

from step_lightning.core.files import atomic_write_text


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    previous = os.umask(0o027)
    try:
        new = atomic_write_text(tmp_path / "new.json", "{}")
        with open(tmp_path / "plain.json", "w") as file:
            file.write("{}")
        assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o640
        os.chmod(new, 0o604)  # an existing file keeps its own permissions when rewritten
        atomic_write_text(new, "[]")
        assert stat.S_IMODE(new.stat().st_mode) == 0o604 and new.read_text() == "[]"
    finally:
        os.umask(previous)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
