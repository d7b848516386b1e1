"""Crash safety of writing: a writer killed with SIGKILL at any moment leaves the old or the new adapter.

A helper process (started once, fork-safe: it has run no threaded code) imports the library and
builds two adapters OLD and NEW of a few MB; on request it forks a writer that saves OLD and NEW
alternately over one output folder with ``save_adapter(..., overwrite=True)`` until it is
killed. The test kills each writer with SIGKILL after a random delay and checks that the output
folder loads and equals OLD or NEW exactly, and that every folder the writer left beside it is
refused by ``load_adapter``; a later ordinary save removes those leftovers. Both publishing
schemes are exercised: the atomic exchange (renameat2) and the two-rename fallback, whose gap a
reader closes by restoring the old folder (``fsutil.recover``); there the writers sleep 50 ms
inside the gap, so that some kills land in it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lora_unlearn.core import fsutil
from lora_unlearn.core.adapter_io import load_adapter, save_adapter
from lora_unlearn.errors import UserError
from tests.tiny import make_adapter

ROOT = Path(__file__).resolve().parent.parent
# 96 modules, A (16, 512) and B (512, 16) in float32: a 6 MB adapter (each tensor stays below
# torch's parallel grain size, so the forked writers never start a thread pool).
SPECS = {f"model.layers.{i}.mlp.down_proj": (512, 512, 16) for i in range(96)}
KILLS = 6

HELPER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from lora_unlearn.core import fsutil
    from lora_unlearn.core.adapter_io import save_adapter
    from tests.tiny import make_adapter
    specs = {f"model.layers.{i}.mlp.down_proj": (512, 512, 16) for i in range(96)}
    old, new = make_adapter(specs, seed=1), make_adapter(specs, seed=2)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed writers vanish at once (no zombies)
    print("ready", flush=True)
    for line in sys.stdin:
        out, exchange, marker = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                fsutil.USE_EXCHANGE = exchange == "1"
                if not fsutil.USE_EXCHANGE:  # widen the gap between the two renames so that kills land in it
                    import pathlib, time
                    rename = pathlib.Path.rename
                    def slow(self, target, rename=rename):
                        done = rename(self, target)
                        if ".old-" in str(target):
                            if marker != "-":  # a targeted kill: say so, and wait in the gap to be killed
                                open(marker, "w").close()
                                time.sleep(5)
                            time.sleep(0.05)
                        return done
                    pathlib.Path.rename = slow
                i = 0
                while True:
                    save_adapter(new if i % 2 == 0 else old, out, overwrite=True)
                    i += 1
            finally:
                os._exit(1)
        print(pid, flush=True)
""")


@pytest.fixture(scope="module")
def helper():
    proc = subprocess.Popen([sys.executable, "-c", HELPER, str(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until the killed process no longer exists (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)
    raise AssertionError(f"writer {pid} did not die")


def which(adapter, old, new) -> str:
    """'old' or 'new' if every factor equals that adapter's exactly, else fail."""
    for label, want in (("old", old), ("new", new)):
        if adapter.modules.keys() == want.modules.keys() and all(
                torch.equal(adapter.modules[n].A, m.A) and torch.equal(adapter.modules[n].B, m.B)
                for n, m in want.modules.items()):
            return label
    raise AssertionError("the output is neither the old nor the new adapter")


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_sigkill_mid_write_leaves_old_or_new(helper, tmp_path, tmp_path_factory, exchange):
    if exchange and fsutil._renameat2 is None:
        pytest.skip("no renameat2 on this system")
    old, new = make_adapter(SPECS, seed=1), make_adapter(SPECS, seed=2)
    out = tmp_path / "out"
    save_adapter(old, out)
    rng = random.Random(0 if exchange else 1)
    marker = tmp_path_factory.mktemp("gap-marker") / "in-gap"  # outside tmp_path: it holds only out and leftovers
    seen, gaps, targeted = set(), 0, 0
    for i in range(KILLS):
        aim = not exchange and i % 2 == 1  # two renames: every other kill lands in the gap on purpose
        marker.unlink(missing_ok=True)
        helper.stdin.write(f"{out} {int(exchange)} {marker if aim else '-'}\n")
        helper.stdin.flush()
        pid = int(helper.stdout.readline())
        if aim:
            deadline = time.monotonic() + 30
            while not marker.exists():
                assert time.monotonic() < deadline, "the writer never reached the gap"
                time.sleep(0.002)
            targeted += 1
        else:
            time.sleep(rng.uniform(0.05, 0.8))
        os.kill(pid, signal.SIGKILL)
        gone(pid)
        if exchange:
            assert out.is_dir(), "the output vanished although the exchange has no gap"
        in_gap = not out.exists()
        if aim:  # killed between the two renames: the old folder is aside, the new one not yet in place
            assert in_gap, "a kill inside the gap left the output in place: the gap was not where it was aimed"
        gaps += in_gap
        seen.add(which(load_adapter(out), old, new))  # restores the old folder if killed in the gap
        assert out.is_dir()  # the reader put it back
        for entry in tmp_path.iterdir():
            if entry.name != "out":
                assert fsutil.is_leftover_name(entry.name), entry.name
                with pytest.raises(UserError, match="temporary folder"):
                    load_adapter(entry)
    assert seen, "no kill was checked"
    if exchange:
        assert gaps == 0, "the atomic exchange has no gap, yet the output was missing after a kill"
    else:  # the fallback's gap is real and was hit (at least by every aimed kill) and always undone
        assert targeted == KILLS // 2 and gaps >= targeted, (gaps, targeted)
    save_adapter(new, out, overwrite=True)  # an ordinary write deletes the killed writers' leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert which(load_adapter(out), old, new) == "new"
    print(f"{'exchange' if exchange else 'two renames'}: outputs seen {sorted(seen)}, gaps hit {gaps}")


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_a_kill_between_the_two_renames_is_undone(tmp_path):
    """The fallback's gap, built by hand: out missing, the complete old folder renamed aside and
    the complete new one not yet renamed in, both by a writer that is gone. A reader restores
    the old folder; the next write removes the rest."""
    old, new = make_adapter({"m.q": (6, 5, 2)}, seed=1), make_adapter({"m.q": (6, 5, 2)}, seed=2)
    pid = dead_pid()
    save_adapter(old, tmp_path / "out")
    (tmp_path / "out").rename(tmp_path / f".out.old-{pid}-aaaa1111")
    save_adapter(new, tmp_path / f".out.tmp-{pid}-bbbb2222")  # a complete folder under a temporary name
    assert which(load_adapter(tmp_path / "out"), old, new) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{pid}-bbbb2222", "out"]
    save_adapter(new, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_live_writers_temporary_folders_are_left_alone(tmp_path):
    """A temporary folder whose writer is still running (here: this process) is never removed."""
    live = tmp_path / f".out.tmp-{os.getpid()}-cccc3333"
    live.mkdir()
    save_adapter(make_adapter({"m.q": (6, 5, 2)}), tmp_path / "out")
    assert live.is_dir()


def test_publish_moves_a_finished_folder_into_place(tmp_path):
    """fsutil.publish (for folders built outside atomic_dir, e.g. a resumable run's work folder)
    replaces the output with the same guarantee and leaves nothing under the source's name."""
    old, new = make_adapter({"m.q": (6, 5, 2)}, seed=1), make_adapter({"m.q": (6, 5, 2)}, seed=2)
    save_adapter(old, tmp_path / "out")
    save_adapter(new, tmp_path / "out.partial")
    with pytest.raises(UserError, match="already exists"):
        fsutil.publish(tmp_path / "out.partial", tmp_path / "out")
    fsutil.publish(tmp_path / "out.partial", tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert which(load_adapter(tmp_path / "out"), old, new) == "new"
