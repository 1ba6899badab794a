"""A full disk or a read-only output while a logit store is written: one clear line, exit 2, and the store resumes.

Real file systems, no mocks: a small tmpfs is mounted (root with CAP_SYS_ADMIN; otherwise these tests
skip with the reason, or fail under PDL_REQUIRE_SERVERS=1 as in `.ci/run`), sized from a reference
store generated outside it so that only about half of the shards fit. `pdl logits generate` runs as
a real subprocess into it and runs out of space on its background writer thread; the tmpfs is then
remounted read-only, then grown, and the same command resumes to a store byte-identical to the
reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pd_lightning.cli import main
from pd_lightning.config import load_config
from pd_lightning.data.prepare import prepare
from pd_lightning.errors import DataError
from pd_lightning.logits.generate import generate_store
from pd_lightning.logits.store import load_manifest
from pd_lightning.train import train_teacher

from conftest import TINY_DATA
from servers import skip_or_fail

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SHARD_SEQUENCES = 64  # ~10 shards over the small dataset below


class Tmpfs:
    """A mounted tmpfs at `path`; `remount("ro")`, `remount("rw,size=2048k")`."""

    def __init__(self, path: Path):
        self.path = path

    def remount(self, options: str) -> None:
        _mount("-o", f"remount,{options}", str(self.path))


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator:
    """A factory: `tmpfs(size_bytes)` mounts a tmpfs of that size (pages) under tmp_path; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size: int) -> Tmpfs:
        if not sys.platform.startswith("linux") or shutil.which("mount") is None:
            skip_or_fail("mounting a tmpfs needs Linux and mount(8)")
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        kib = -(-size // PAGE) * PAGE // 1024
        try:
            _mount("-t", "tmpfs", "-o", f"size={kib}k,mode=0755", "tmpfs", str(path))
        except (subprocess.CalledProcessError, OSError) as e:
            why = getattr(e, "stderr", None) or e
            skip_or_fail(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN; uid {os.geteuid()}): "
                         f"{str(why).strip()}")
        mounted.append(path)
        return Tmpfs(path)

    yield mount
    for path in reversed(mounted):
        done = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if done.returncode != 0:  # still busy (a child that outlived a failed assertion): detach it
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def disk_data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~600 sequences of 32 tokens, tokenized with the tiny teacher's tokenizer (a store of ~10 shards)."""
    out = tmp_path_factory.mktemp("disk") / "data"
    cfg = load_config("tiny", ["data.train_tokens=20000", "data.heldout_tokens=2000", "data.seq_len=32",
                               f"data.tokenizer={tiny_data / 'tokenizer'}", f"data.out={out}"])
    return prepare(cfg.data)


def gen_args(data: Path, teacher: Path, store: Path) -> list[str]:
    return ["tiny", *TINY_DATA, f"data.out={data}", f"teacher.out={teacher}", f"logits.store={store}",
            "data.seq_len=32", "logits.batch_size=8", f"logits.sequences_per_shard={SHARD_SEQUENCES}"]


def pdl(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (one intra-op thread, as the in-process reference)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback, exactly one `pdl: error:` line on stderr: return it."""
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("pdl: error: "), out
    return errors[0]


def disk_kib(disk: Tmpfs) -> int:
    """The tmpfs's size limit in KiB."""
    st = os.statvfs(disk.path)
    return st.f_blocks * st.f_frsize // 1024


def pages(path: Path) -> int:
    """Bytes a file takes on a tmpfs (whole pages)."""
    return -(-path.stat().st_size // PAGE) * PAGE


def whole_shards(store: Path) -> dict[str, tuple[int, int]]:
    """Shard .bin name -> (inode, mtime_ns) of every shard with its sidecar."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(store.glob("shard-*.bin"))
            if f.with_suffix(".json").is_file()}


def test_full_disk_gives_one_line_and_the_same_command_resumes_to_an_identical_store(
        tiny_teacher, disk_data, tmp_path, tmpfs):
    ref = tmp_path / "ref"
    args = gen_args(disk_data, tiny_teacher, ref)
    generate_store(load_config(args[0], args[1:]))
    shards = [e["file"] for e in load_manifest(ref)["shards"]]
    assert len(shards) >= 6, len(shards)

    # Room for the first half of the shards with their sidecars, the stats file (and its rewrite's
    # temp file) and half of the next shard: that shard's write runs out of space.
    half = len(shards) // 2
    fits = sum(pages(ref / f) + pages(ref / f.replace(".bin", ".json")) for f in shards[:half])
    disk = tmpfs(fits + 3 * PAGE + pages(ref / shards[half]) // 2)
    store = disk.path / "store"
    cmd = ["logits", "generate", *gen_args(disk_data, tiny_teacher, store)]

    # 1. Full disk: one line naming the store and the reason, exit 2; finished shards stay, nothing torn.
    error = one_error_line(pdl(*cmd))
    assert f"logits.store={str(store)!r}" in error and "no space left on device" in error, error
    assert "run the same command again" in error and "resumes from the last whole shard" in error, error
    finished = whole_shards(store)
    print(f"full disk ({disk_kib(disk)} KiB): {len(finished)} of {len(shards)} shards finished; {error}")
    assert 0 < len(finished) < len(shards), (finished, len(shards))
    assert sorted(f.name for f in store.glob("shard-*.bin")) == sorted(finished)  # no .bin without its sidecar
    assert not list(store.glob("shard-*.tmp")) and not (store / "manifest.json").exists()
    for name in finished:  # what is there is whole: byte-identical to the reference
        assert (store / name).read_bytes() == (ref / name).read_bytes(), name
    assert main(["logits", "verify", str(store)]) == 2  # not a finished store yet (no manifest)

    # 2. Read-only: one line naming it; nothing changes.
    disk.remount("ro")
    error = one_error_line(pdl(*cmd))
    assert f"logits.store={str(store)!r}" in error and "read-only file system" in error, error
    assert whole_shards(store) == finished
    print(f"read-only: {error}")

    # 3. Space again: the same command resumes (finished shards untouched) and finishes.
    disk.remount(f"rw,size={4 * (fits * 2 + len(shards) * 2 * PAGE) // 1024}k")
    done = pdl(*cmd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(finished)} shards already done" in done.stderr, done.stderr  # a status line: logged to stderr
    print(f"grown to {disk_kib(disk)} KiB: resumed, {len(shards) - len(finished)} shards written")
    after = whole_shards(store)
    assert {name: after[name] for name in finished} == finished  # same inode, same mtime: not redone
    assert main(["logits", "verify", "--deep", str(store)]) == 0
    names = sorted(p.name for p in ref.iterdir() if p.name.startswith(("shard-", "manifest")))
    assert names == sorted(p.name for p in store.iterdir() if p.name.startswith(("shard-", "manifest")))
    for name in names:
        assert (store / name).read_bytes() == (ref / name).read_bytes(), name


def test_read_only_output_is_one_line_for_a_new_offline_or_online_store(tiny_data, tiny_teacher, disk_data,
                                                                         tmp_path, tmpfs, capsys):
    disk = tmpfs(64 * 1024)
    disk.remount("ro")
    store = disk.path / "store"
    capsys.readouterr()
    assert main(["logits", "generate", *gen_args(disk_data, tiny_teacher, store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"logits.store={str(store)!r}" in err and "read-only file system" in err, err
    assert not store.exists()

    # The online store a teacher writes while it trains: the same one line (the rerun starts the teacher over).
    cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"teacher.out={tmp_path / 'teacher'}",
                               "teacher.preset=tiny-1m", "teacher.max_steps=4", "teacher.batch_size=8",
                               "logits.mode=online_store", f"logits.store={store}", "logits.sequences_per_shard=8"])
    with pytest.raises(DataError, match=r"read-only file system while .*the teacher trains again") as info:
        train_teacher(cfg)
    assert "\n" not in str(info.value) and f"logits.store={str(store)!r}" in str(info.value)


def test_online_store_on_a_full_disk_stops_the_teacher_with_one_line(tiny_data, tmp_path, tmpfs):
    """Out of space on the online writer's background thread, inside Lightning's fit: still one DataError line."""
    disk = tmpfs(16 * 1024)  # the sequence map fits; a shard of 16 x 63 positions does not
    store = disk.path / "online"
    cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"teacher.out={tmp_path / 'teacher'}",
                               "teacher.preset=tiny-1m", "teacher.max_steps=8", "teacher.batch_size=8",
                               "logits.mode=online_store", "logits.online_start_frac=0.5", f"logits.store={store}",
                               "logits.sequences_per_shard=16"])
    with pytest.raises(DataError, match=r"no space left on device while writing shard-000000\.bin") as info:
        train_teacher(cfg)
    assert "\n" not in str(info.value) and f"logits.store={str(store)!r}" in str(info.value)
    assert not list(store.glob("shard-*.bin")) and not list(store.glob("*.tmp"))
    assert not (tmp_path / "teacher").exists()  # the teacher is saved only once it finished
