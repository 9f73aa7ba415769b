"""A full disk ends an episode, a collection or a checkpoint with a clear error: never a crash,
never a damaged finished episode or `latest` checkpoint.

Each test mounts a small tmpfs (root is needed; skipped with the reason where mount is refused).
Measured before this change: `ire-vla collect` into a 4 MB tmpfs died with SIGSEGV inside h5py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ire_vla_ros.diskspace import MB, DiskSpaceError, free_bytes, require_free_space
from ire_vla_ros.episodes.safe_writer import EpisodeWriteError, WriterProcess
from ire_vla_ros.episodes.store import read_episode, scan_episodes
from ire_vla_ros.vla.action_spec import METAWORLD_4D

META = dict(instruction="reach", task="reach", source="policy", action_spec=METAWORLD_4D, joint_names=["a", "b"])
FRAME = (120, 160, 3)  # 57.6 kB of incompressible noise per step


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_mb) -> a directory on a fresh tmpfs of that size (unmounted after the test)."""
    mounted = []

    def mount(size_mb: float) -> Path:
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k", "tmpfs", str(d)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(directory: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about `leave_bytes` free."""
    filler = directory / "filler.bin"
    size = max(0, free_bytes(directory) - leave_bytes)
    with open(filler, "wb") as f:
        f.write(b"\0" * size)
    return filler


def _episode(proc, root, steps, rng, **meta):
    w = proc.open(root, {**META, **meta})
    for i in range(steps):
        w.append(images={"main": rng.integers(0, 255, FRAME, dtype=np.uint8)}, joint_positions=[0.0, i],
                 action=[0, 0, 0, 1], reward=0.0, timestamp=float(i))
    return w.finalize(True)


def test_require_free_space(small_disk):
    d = small_disk(4)
    assert require_free_space(d, 1.0, 1 * MB) > 2 * MB
    with pytest.raises(DiskSpaceError, match="disk full"):
        require_free_space(d, 3.5, 1 * MB)
    with pytest.raises(DiskSpaceError) as err:
        require_free_space(d / "not" / "yet", 0.0, 8 * MB)  # a directory still to be made: its filesystem
    assert err.value.errno == 28


def test_writer_aborts_episode_before_the_disk_fills_and_keeps_going(small_disk):
    d = small_disk(4)
    rng = np.random.default_rng(0)
    with WriterProcess(min_free_mb=0.5) as proc:
        pid = proc.pid
        first = _episode(proc, d, 20, rng)  # 1.2 MB
        with pytest.raises(EpisodeWriteError, match="disk full") as err:
            _episode(proc, d, 60, rng)      # 3.5 MB: does not fit
        assert "aborted after" in str(err.value)
        assert not list(d.glob("*.partial"))
        assert read_episode(first).n_steps == 20  # the finished episode is intact
        third = _episode(proc, d, 10, rng)        # room for a short one: recording goes on
        assert read_episode(third).n_steps == 10 and proc.pid != pid  # in a fresh child
        with pytest.raises(EpisodeWriteError, match="disk full"):  # below min_free_mb: refused up front
            _fill(d, int(0.3 * MB))
            proc.open(d, META)
    assert len(scan_episodes(d).episodes) == 2


def test_enospc_behind_the_writers_back_kills_only_the_child(small_disk):
    """Another process fills the disk while an episode is open: h5py hits ENOSPC (which would
    segfault the process that owns the file). The child reports it and exits; the caller lives,
    the episode is reported aborted, the next episode gets a fresh child."""
    d = small_disk(4)
    rng = np.random.default_rng(1)
    with WriterProcess(min_free_mb=0.0) as proc:
        first = _episode(proc, d, 5, rng)
        w = proc.open(d, META)
        for i in range(3):
            w.append(images={"main": rng.integers(0, 255, FRAME, dtype=np.uint8)}, joint_positions=[0.0, i],
                     action=[0, 0, 0, 1], reward=0.0, timestamp=float(i))
        filler = _fill(d, 0)
        with pytest.raises(EpisodeWriteError) as err:
            for i in range(3, 80):
                w.append(images={"main": rng.integers(0, 255, FRAME, dtype=np.uint8)}, joint_positions=[0.0, i],
                         action=[0, 0, 0, 1], reward=0.0, timestamp=float(i))
            w.finalize(True)
        assert "No space left" in str(err.value) or "disk full" in str(err.value), err.value
        assert not w.partial_path.exists()
        filler.unlink()
        second = _episode(proc, d, 5, rng)  # a new child if the old one exited
        assert read_episode(first).n_steps == 5 and read_episode(second).n_steps == 5


def test_writer_child_killed_mid_episode_is_reported_and_replaced(tmp_path):
    """A child that dies for any reason (here SIGSEGV, as h5py did on ENOSPC) fails the episode with
    the reason, its partial file is removed, and the next episode gets a fresh child."""
    import signal as sig

    rng = np.random.default_rng(3)
    with WriterProcess() as proc:
        first = _episode(proc, tmp_path, 3, rng)
        w = proc.open(tmp_path, META)
        w.append(images={"main": rng.integers(0, 255, FRAME, dtype=np.uint8)}, joint_positions=[0.0, 0.0],
                 action=[0, 0, 0, 1], reward=0.0, timestamp=0.0)
        os.kill(proc.pid, sig.SIGSEGV)
        with pytest.raises(EpisodeWriteError, match="SIGSEGV"):
            for i in range(1, 200):  # the death shows at the next exchange
                w.append(images={"main": rng.integers(0, 255, FRAME, dtype=np.uint8)}, joint_positions=[0.0, i],
                         action=[0, 0, 0, 1], reward=0.0, timestamp=float(i))
                time.sleep(0.01)
            w.finalize(True)
        assert not w.partial_path.exists() and proc.restarts == 1
        second = _episode(proc, tmp_path, 3, rng)
    assert [read_episode(p).n_steps for p in (first, second)] == [3, 3]


def test_collect_into_a_full_disk_exits_cleanly_with_finished_episodes_kept(small_disk):
    d = small_disk(4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.cli", "collect", "--out", str(d),
                          "--tasks", "button-press-topdown-v3", "--episodes", "14", "--no-progress",
                          "--min-free-mb", "0.5"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])  # not -11 (SIGSEGV)
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("ire-vla collect:")]
    assert len(error) == 1 and "disk full" in error[0] and "finished ones kept" in error[0], out.stderr
    scan = scan_episodes(d)
    assert len(scan.episodes) >= 1 and not scan.rejected and not scan.incomplete

    # with the default margin (50 MB) nothing starts on a 4 MB disk: refused up front, one line
    out = subprocess.run([sys.executable, "-m", "ire_vla_ros.cli", "collect", "--out", str(d / "more"),
                          "--tasks", "button-press-topdown-v3", "--episodes", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 2 and "nothing collected" in out.stderr and "Traceback" not in out.stderr


def test_checkpoint_on_a_full_disk_keeps_latest(small_disk, monkeypatch):
    from ire_vla_ros.vla import checkpoint as ck
    from ire_vla_ros.vla.testing import make_tiny_policy

    d = small_disk(12)
    policy = make_tiny_policy()
    first = ck.save_checkpoint(policy, d, stage="a", iteration=0, min_free_mb=0)
    assert (d / ck.LATEST).read_text().strip() == first.name

    _fill(d, 2 * MB)  # less than one checkpoint
    with pytest.raises(ck.CheckpointError, match="disk full"):  # refused before writing
        ck.save_checkpoint(policy, d, stage="b", iteration=1, min_free_mb=0)
    # ENOSPC while writing (the estimate fooled): the temporary directory goes, latest stays
    monkeypatch.setattr(ck, "_state_bytes", lambda p: 0)
    with pytest.raises(ck.CheckpointError, match="No space left|unchanged"):
        ck.save_checkpoint(policy, d, stage="c", iteration=2, min_free_mb=0)
    assert not [p for p in d.iterdir() if p.name.startswith(".tmp-")]
    assert (d / ck.LATEST).read_text().strip() == first.name
    ck.load_checkpoint(d)  # still verifies and loads


# ---------------------------------------------------------------------------------------------
# recorder_node
# ---------------------------------------------------------------------------------------------
def test_recorder_node_disk_full_aborts_episode_node_stays_up(ros, small_disk):
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from ire_vla_ros.nodes.recorder_node import RecorderNode
    from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS
    from ire_vla_ros.robot.action_msg import pack_action
    from ire_vla_ros.robot.image_codec import encode_rgb
    from ros_harness import wait_for

    d = small_disk(4)
    node = ros.add(RecorderNode, episodes_dir=str(d), instruction="reach", start_services=[""], min_free_mb=0.5,
                   status_period_s=0.2)
    p = ros.probe
    image_pub = p.create_publisher(Image, "/camera/image_raw", SENSOR_QOS)
    joint_pub = p.create_publisher(JointState, "/joint_states", SENSOR_QOS)
    action_pub = p.create_publisher(JointState, "/policy_node/action", RELIABLE_QOS)
    saved = ros.collect(String, "/recorder_node/episode_saved")
    status = ros.collect(String, "/recorder_node/status", LATCHED_QOS)
    diags = ros.collect(DiagnosticArray, "/diagnostics", 10)
    wait_for(lambda: image_pub.get_subscription_count() and action_pub.get_subscription_count()
             and joint_pub.get_subscription_count(), 10, "recorder subscriptions")
    rng = np.random.default_rng(2)

    def step():
        stamp = p.get_clock().now().to_msg()
        img = Image(**encode_rgb(rng.integers(0, 255, FRAME, dtype=np.uint8)))
        img.header.stamp = stamp
        image_pub.publish(img)
        joint_pub.publish(JointState(header=img.header, name=["j1"], position=[0.0]))
        t_ns = stamp.sec * 10**9 + stamp.nanosec
        wait_for(lambda: node.session.images.lookup(t_ns)[2], 10, "the image")
        names, values = pack_action(METAWORLD_4D.names, [0, 0, 0, 1])
        before = node.session.counters["episode_steps"]
        action_pub.publish(JointState(header=img.header, name=names, position=values))
        wait_for(lambda: node.session.counters["episode_steps"] > before or node.session.state != "recording",
                 10, "the step")

    def start():
        resp = ros.call(Trigger, "/recorder_node/start_episode")
        assert resp.success, resp.message
        wait_for(lambda: node.session.state == "recording", 10, "recording")

    start()
    for _ in range(10):
        step()
    assert ros.call(Trigger, "/recorder_node/stop_episode").success
    wait_for(lambda: saved, 20, "first episode saved")

    start()  # this one does not fit: aborted by the writer, the node goes back to idle
    for _ in range(80):
        if node.session.state != "recording":
            break
        step()
    wait_for(lambda: node.session.state == "idle" and status and json.loads(status[-1].data)["episodes_failed"] == 1,
             20, "the episode aborted")
    st = json.loads(status[-1].data)
    assert "disk full" in st["last_error"] and st["episodes_saved"] == 1
    wait_for(lambda: any(s.level == DiagnosticStatus.ERROR and "disk full" in s.message
                         for a in diags for s in a.status), 10, "an ERROR diagnostic about the full disk")
    assert read_episode(saved[0].data).n_steps == 10 and not list(d.glob("*.partial"))

    _fill(d, int(0.2 * MB))  # below min_free_mb: the next start is refused with the reason
    resp = ros.call(Trigger, "/recorder_node/start_episode")
    assert not resp.success and "disk full" in resp.message
    assert node._writer_proc.alive  # still ready for when space is freed


# ---------------------------------------------------------------------------------------------
# the frame ring (shared memory between the writer's parent and child sides)
# ---------------------------------------------------------------------------------------------
def _ring_mappings(pid="self") -> list[int]:
    """Sizes of the writer's frame-ring mappings in a process (an anonymous memfd: no /dev/shm name)."""
    sizes = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "memfd:ire_vla_writer_ring" in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            sizes.append(end - start)
    return sizes


def test_frame_ring_carries_every_step_exactly_and_grows_for_larger_frames(tmp_path):
    """Steps pass through a few shared slots many times over (two cameras of different sizes in
    one slot); every image reads back bit-exact; a later episode with larger frames gets a larger
    ring, and the old one is unmapped."""
    from ire_vla_ros.episodes.safe_writer import _RING_SLOTS

    rng = np.random.default_rng(7)
    meta = {**META, "camera_names": ("main", "wrist")}
    with WriterProcess() as proc:
        written = {}
        for shape_main, steps in (((48, 64, 3), 4 * _RING_SLOTS + 3), ((96, 128, 3), 2 * _RING_SLOTS + 1)):
            frames = [(rng.integers(0, 255, shape_main, dtype=np.uint8), rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
                      for _ in range(steps)]
            w = proc.open(tmp_path, meta)
            for i, (main, wrist) in enumerate(frames):
                w.append(images={"main": main, "wrist": wrist}, joint_positions=[0.0, i], action=[0, 0, 0, 1],
                         reward=0.0, timestamp=float(i))
            # positive control: the images went through the ring, mapped once in each process
            slot_bytes = frames[0][0].nbytes + frames[0][1].nbytes
            for pid in ("self", proc.pid):
                (size,) = _ring_mappings(pid)
                assert size >= _RING_SLOTS * slot_bytes
            written[w.finalize(True)] = frames
        for path, frames in written.items():
            ep = read_episode(path)
            assert ep.n_steps == len(frames)
            np.testing.assert_array_equal(ep.images["main"], np.stack([m for m, _ in frames]))
            np.testing.assert_array_equal(ep.images["wrist"], np.stack([r for _, r in frames]))
            np.testing.assert_array_equal(ep.joint_positions[:, 1], np.arange(len(frames)))
    assert _ring_mappings() == []
    assert not [n for n in os.listdir("/dev/shm") if "ire_vla" in n]


def test_frame_ring_full_and_child_killed_raises_and_releases_the_ring(tmp_path):
    """With the child stopped the ring fills and append waits; the child's death ends the wait with
    the reason (no hang), the ring is unmapped in the parent, and the next episode works on a
    fresh child with one fresh ring."""
    import signal as sig
    import threading

    from ire_vla_ros.episodes.safe_writer import _RING_SLOTS

    rng = np.random.default_rng(11)
    killed = threading.Event()

    def frame():
        return {"main": rng.integers(0, 255, FRAME, dtype=np.uint8)}

    with WriterProcess(reply_timeout_s=60.0) as proc:  # a wait blind to the death would end here
        w = proc.open(tmp_path, META)
        pid = proc.pid
        os.kill(pid, sig.SIGSTOP)
        for i in range(_RING_SLOTS):  # fills the ring: the stopped child consumes nothing
            w.append(images=frame(), joint_positions=[0.0, i], action=[0, 0, 0, 1], reward=0.0, timestamp=float(i))
        assert len(_ring_mappings()) == 1

        def kill_later():
            time.sleep(1.0)
            killed.set()
            os.kill(pid, sig.SIGKILL)

        threading.Thread(target=kill_later, daemon=True).start()
        with pytest.raises(EpisodeWriteError, match="SIGKILL"):
            w.append(images=frame(), joint_positions=[0.0, 9], action=[0, 0, 0, 1], reward=0.0, timestamp=9.0)
        assert killed.is_set()  # the append waited for a slot until the child died
        assert not w.partial_path.exists()
        assert _ring_mappings() == []  # released with the dead child
        path = _episode(proc, tmp_path, _RING_SLOTS + 2, rng)
        assert proc.pid != pid and len(_ring_mappings()) == 1 and len(_ring_mappings(proc.pid)) == 1
    assert read_episode(path).n_steps == _RING_SLOTS + 2
    assert _ring_mappings() == []
