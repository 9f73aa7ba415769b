"""`ire-vla episodes import-bag`: rosbag2 (MCAP and sqlite3) -> teleop episodes.

Bags are written with the rosbags WRITER (the library the importer reads with), never by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ire_vla_ros.cli import main as cli_main
from ire_vla_ros.episodes import inspect as ep_inspect
from ire_vla_ros.episodes.bag_import import (
    BagImportConfig,
    BagImportError,
    action_from_pose,
    action_from_twist,
    import_bag,
    quat_to_rpy,
)
from ire_vla_ros.episodes.mcap_export import BagWriter
from ire_vla_ros.episodes.store import read_episode, scan_episodes
from ire_vla_ros.robot.motion import pose_after_delta, rpy_to_quat, twist_from_delta
from ire_vla_ros.robot.safety import action_to_delta
from ire_vla_ros.vla.action_spec import EE_DELTA_7D, ActionSpec

NS = 1_000_000_000
RATE = 10.0
JOINTS = [f"j{i}" for i in range(6)]


def _frame(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    """A frame that identifies its index (and is smooth enough for JPEG)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (i * 9) % 256
    img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 2] = 128
    return img


def _actions(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.9, 0.9, size=(n, EE_DELTA_7D.dim)).astype(np.float32)
    a[:, -1] = np.where(np.arange(n) < n // 2, -1.0, 1.0)
    return a


def _joints_at(t_ns: int) -> np.ndarray:
    s = t_ns * 1e-9
    return np.array([np.sin(s + k) for k in range(len(JOINTS))])


def write_demo_bag(path: Path, actions: np.ndarray, *, storage: str = "mcap", t0: float = 100.0,
                   cam: str = "raw", encoding: str = "rgb8", joint_hz: float = 50.0, command: str = "twist",
                   success: bool | None = None, markers: list[int] | None = None, gaps_after: tuple = (),
                   cmd_substeps: int = 1, bad_frame: int | None = None, topics_skip: tuple = (),
                   success_after: dict | None = None, camera_clock_offset_s: float = 0.0) -> list[int]:
    """A teleop demo as a robot would record it: camera at the control rate, joints at 50 Hz,
    the commands policy_node would publish for `actions`. Returns the image stamps (ns)."""
    stamps = []
    t = int(t0 * NS)
    period = int(NS / RATE)
    for i in range(len(actions)):
        if i in gaps_after:
            t += 3 * NS
        stamps.append(t)
        t += period
    end = stamps[-1] + period
    msgs = []
    with BagWriter(path, storage) as w:
        tj = stamps[0] - NS // 10
        while tj < end:
            if "joints" not in topics_skip:
                msgs.append(("/joint_states", tj, w.joint_state(tj, JOINTS, _joints_at(tj))))
            tj += int(NS / joint_hz)
        pos, quat = np.array([0.4, 0.0, 0.3]), rpy_to_quat(0.1, -0.2, 0.3)
        for i, (ti, a) in enumerate(zip(stamps, actions)):
            img = _frame(i)
            if i == bad_frame:
                msgs.append(("/camera/image_raw", ti, w.raw_image(ti, img.shape[0], img.shape[1], "16UC1",
                                                                  img.shape[1] * 2, b"\0" * img.shape[0] * img.shape[1] * 2)))
            elif cam == "compressed":
                msgs.append(("/camera/image_raw", ti, w.compressed_image(ti, img)))
            else:  # a camera may stamp with its own clock (header) while the bag logs receive time
                msgs.append(("/camera/image_raw", ti, w.image(ti + int(camera_clock_offset_s * NS), img, encoding)))
            delta = action_to_delta(a, EE_DELTA_7D)
            tc = ti + 2_000_000  # the policy publishes a few ms after the frame it acted on
            if command == "twist":
                lin, ang = twist_from_delta(delta, RATE)
                for k in range(cmd_substeps):  # a faster teleop stream: same twist, `cmd_substeps` x
                    tk = tc + k * (period // cmd_substeps)
                    msgs.append(("/servo_node/delta_twist_cmds", tk, w.twist(tk, lin, ang)))
            else:
                msgs.append(("/ee_pose", tc - 1_000_000, w.pose(tc - 1_000_000, pos, quat)))
                pos, quat = pose_after_delta(pos, quat, delta)
                msgs.append(("/servo_node/pose_target_cmds", tc, w.pose(tc, pos, quat)))
            if "gripper" not in topics_skip:
                msgs.append(("/gripper/command", tc, w.float64(delta.gripper)))
        if success is not None:
            msgs.append(("/success", end, w.boolean(success)))
        for step, value in (success_after or {}).items():  # a label published right after step `step`
            msgs.append(("/success", stamps[step] + period // 2, w.boolean(value)))
        for m in markers or []:
            msgs.append(("/episode_marker", stamps[m] - 1, w.string(f"ep{m}")))
        for topic, tn, msg in sorted(msgs, key=lambda m: m[1]):
            w.write(topic, tn, msg)
    return stamps


def _cfg(**kw) -> BagImportConfig:
    base = dict(instruction="pick up the cube", task="pick", control_rate_hz=RATE)
    base.update(kw)
    return BagImportConfig(**base)


def _bag_file(bag_dir: Path) -> Path:
    return next(p for p in bag_dir.iterdir() if p.suffix in (".mcap", ".db3"))


# ------------------------------------------------------------------------------------------
# the inverse conversion
# ------------------------------------------------------------------------------------------
def test_twist_round_trip_is_exact_inverse():
    for a in _actions(50, seed=3):
        lin, ang = twist_from_delta(action_to_delta(a, EE_DELTA_7D), RATE)
        back = action_from_twist(lin, ang, RATE, EE_DELTA_7D, gripper=action_to_delta(a, EE_DELTA_7D).gripper)
        np.testing.assert_allclose(back, a, rtol=0, atol=1e-6)


def test_pose_round_trip_is_exact_inverse():
    pos, quat = np.array([0.3, -0.1, 0.5]), rpy_to_quat(0.4, 0.2, -1.0)
    for a in _actions(50, seed=4):
        d = action_to_delta(a, EE_DELTA_7D)
        p2, q2 = pose_after_delta(pos, quat, d)
        back = action_from_pose(pos, quat, p2, q2, EE_DELTA_7D, gripper=d.gripper)
        np.testing.assert_allclose(back, a, rtol=0, atol=1e-5)
    for rpy in ([0.1, -0.2, 0.3], [-1.0, 0.5, 2.5]):
        np.testing.assert_allclose(quat_to_rpy(rpy_to_quat(*rpy)), rpy, atol=1e-9)


# ------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_import_round_trip_both_storages(tmp_path, storage):
    actions = _actions(12)
    bag = tmp_path / f"demo_{storage}"
    stamps = write_demo_bag(bag, actions, storage=storage, success=True)
    out = tmp_path / "episodes"
    paths = []
    for target in (bag, _bag_file(bag)):  # the rosbag2 directory and the bare storage file
        res = import_bag(target, out, _cfg(success_topic="/success"))
        assert len(res.episodes) == 1
        paths.append(res.episodes[0])
    for p in paths:
        ep = read_episode(p)
        assert ep.source == "teleop" and ep.success and ep.instruction == "pick up the cube" and ep.task == "pick"
        assert ep.n_steps == len(actions)
        np.testing.assert_allclose(ep.actions, actions, rtol=0, atol=1e-5)
        for i, ts in enumerate(stamps):
            np.testing.assert_array_equal(ep.images["main"][i], _frame(i))
            # newest joint state at or before the frame: the 50 Hz stream has one at most 20 ms before
            tj = ep.timestamps[i]
            assert tj * NS >= ts
            assert np.abs(ep.joint_positions[i] - _joints_at(ts)).max() < 0.03
        assert ep.joint_names == JOINTS
        assert ep.rewards[-1] == 1.0 and ep.rewards[:-1].sum() == 0.0
        m = ep.metadata
        assert m["bag"] in (bag.name, _bag_file(bag).name)
        assert m["topics"]["camera"] == "/camera/image_raw" and m["topics"]["command"] == "/servo_node/delta_twist_cmds"
        assert m["time_range_ns"][0] == stamps[0] + 2_000_000 and m["time_range_ns"][1] == stamps[-1] + 2_000_000
    text, n_bad = ep_inspect.validate(out)
    assert n_bad == 0, text


def test_fast_teleop_stream_is_integrated_per_period(tmp_path):
    actions = _actions(8, seed=1)
    bag = tmp_path / "fast"
    write_demo_bag(bag, actions, cmd_substeps=5)  # 50 Hz commands, each the same velocity
    ep = read_episode(import_bag(bag, tmp_path / "out", _cfg()).episodes[0])
    np.testing.assert_allclose(ep.actions, actions, rtol=0, atol=1e-5)


def test_pose_commands_with_ee_pose_reference(tmp_path):
    actions = _actions(8, seed=2)
    bag = tmp_path / "pose"
    write_demo_bag(bag, actions, command="pose")
    cfg = _cfg(command_topic="/servo_node/pose_target_cmds", ee_pose_topic="/ee_pose")
    ep = read_episode(import_bag(bag, tmp_path / "out", cfg).episodes[0])
    np.testing.assert_allclose(ep.actions, actions, rtol=0, atol=1e-4)


def test_compressed_and_bgr_images(tmp_path):
    actions = _actions(6)
    write_demo_bag(tmp_path / "jpg", actions, cam="compressed")
    write_demo_bag(tmp_path / "bgr", actions, encoding="bgr8")
    ep = read_episode(import_bag(tmp_path / "jpg", tmp_path / "o1", _cfg()).episodes[0])
    for i in range(len(actions)):  # JPEG: within codec tolerance
        assert np.abs(ep.images["main"][i].astype(int) - _frame(i)).mean() < 4.0
    ep = read_episode(import_bag(tmp_path / "bgr", tmp_path / "o2", _cfg()).episodes[0])
    np.testing.assert_array_equal(ep.images["main"][3], _frame(3))


def test_marker_and_gap_segmentation_with_success_labels(tmp_path):
    actions = _actions(15)
    bag = tmp_path / "multi"
    write_demo_bag(bag, actions, markers=[5, 10], gaps_after=(5, 10), success=False, success_after={4: False})
    res = import_bag(bag, tmp_path / "m", _cfg(segment="marker", marker_topic="/episode_marker",
                                                success_topic="/success"))
    eps = [read_episode(p) for p in res.episodes]
    assert [e.n_steps for e in eps] == [5, 5, 5]
    np.testing.assert_allclose(np.concatenate([e.actions for e in eps]), actions, atol=1e-5)
    # the first and last episodes hold a success message (False); the middle one keeps the default
    assert [e.success for e in eps] == [False, True, False]
    assert [e.rewards.sum() for e in eps] == [0.0, 1.0, 0.0]
    res = import_bag(bag, tmp_path / "g", _cfg(segment="gap", gap_s=1.0))
    assert [read_episode(p).n_steps for p in res.episodes] == [5, 5, 5]


def test_joint_name_selection_and_missing_joint(tmp_path):
    actions = _actions(5)
    write_demo_bag(tmp_path / "b", actions)
    ep = read_episode(import_bag(tmp_path / "b", tmp_path / "o", _cfg(joint_names=["j3", "j1"])).episodes[0])
    assert ep.joint_names == ["j3", "j1"]
    t = int(round(ep.timestamps[0] * NS)) - 2_000_000
    assert np.abs(ep.joint_positions[0] - _joints_at(t)[[3, 1]]).max() < 0.03
    with pytest.raises(BagImportError, match="no episode"):
        import_bag(tmp_path / "b", tmp_path / "o2", _cfg(joint_names=["j0", "elbow"]))


def _run_cli(capsys, *argv) -> tuple[int, str]:
    rc = cli_main(["episodes", "import-bag", *map(str, argv)])
    return rc, capsys.readouterr().err.strip()


def _nothing_written(root: Path) -> bool:
    return not root.exists() or not any(root.rglob("*.h5*"))


def test_cli_missing_topic_one_line_exit_2(tmp_path, capsys):
    bag = tmp_path / "nogrip"
    write_demo_bag(bag, _actions(5), topics_skip=("gripper",))
    out = tmp_path / "out"
    rc, err = _run_cli(capsys, bag, "--out", out, "--instruction", "pick")
    assert rc == 2
    assert err.count("\n") == 0 and str(bag) in err and "/gripper/command" in err and "not in the bag" in err
    assert _nothing_written(out)
    # the same bag imports once the gripper is unmapped
    rc, _ = _run_cli(capsys, bag, "--out", out, "--instruction", "pick", "--gripper-topic", "")
    assert rc == 0 and len(scan_episodes(out)) == 1


def test_cli_unknown_encoding_aborts_the_whole_bag(tmp_path, capsys):
    bag = tmp_path / "badenc"
    # the bad frame is in the LAST of three episodes: the two earlier ones must not survive either
    write_demo_bag(bag, _actions(15), markers=[5, 10], bad_frame=12)
    out = tmp_path / "out"
    rc, err = _run_cli(capsys, bag, "--out", out, "--instruction", "pick", "--segment", "marker",
                       "--marker-topic", "/episode_marker")
    assert rc == 2
    assert err.count("\n") == 0 and str(bag) in err and "/camera/image_raw" in err and "16UC1" in err
    assert _nothing_written(out)


@pytest.mark.parametrize("storage,damage", [("mcap", "cut"), ("mcap", "clobber"), ("sqlite3", "clobber")])
def test_cli_truncated_or_corrupt_bag(tmp_path, capsys, storage, damage):
    bag = tmp_path / f"cut_{storage}"
    write_demo_bag(bag, _actions(30), storage=storage)
    f = _bag_file(bag)
    data = bytearray(f.read_bytes())
    if damage == "cut":
        f.write_bytes(data[: len(data) // 2])  # a recording cut off mid-file (no summary, half a chunk)
    elif storage == "mcap":  # 64 bytes overwritten inside the data section: summary intact, records not
        data[len(data) // 2: len(data) // 2 + 64] = b"\xab" * 64
        f.write_bytes(bytes(data))
    else:
        f.write_bytes(data[:100] + b"\xff" * (len(data) - 100))  # a clobbered database
    out = tmp_path / "out"
    good = tmp_path / "good"
    write_demo_bag(good, _actions(5))
    rc, err = _run_cli(capsys, bag, good, "--out", out, "--instruction", "pick")
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1 and str(bag) in lines[0] and ("corrupt" in lines[0] or "unreadable" in lines[0])
    res = scan_episodes(out)  # the good bag after it was still imported, and nothing else
    assert len(res) == 1 and not res.rejected and res.infos[0].metadata["bag"] == "good"


def test_cli_checkpoint_gives_action_spec_and_joint_order(tmp_path, capsys):
    """--checkpoint: the episodes get the checkpoint's action spec (4-D here: rotation dropped) and
    its joint order, so `train sft --init CKPT` can fine-tune on them."""
    from ire_vla_ros.paths import models_dir
    from ire_vla_ros.vla.action_spec import METAWORLD_4D

    ckpt = models_dir() / "metaworld_tiny"
    names = json.loads((ckpt / "config.json").read_text())["joint_names"]
    bag = tmp_path / "b"
    actions = _actions(6)
    with BagWriter(bag, "mcap") as w:  # a robot whose joint state carries the checkpoint's joints (reversed)
        for i, a in enumerate(actions):
            t = int(50 * NS) + i * NS // 10
            w.write("/joint_states", t - 1000, w.joint_state(t - 1000, names[::-1], np.arange(len(names))[::-1] + i))
            w.write("/camera/image_raw", t, w.image(t, _frame(i)))
            d = action_to_delta(a, EE_DELTA_7D)
            lin, ang = twist_from_delta(d, RATE)
            w.write("/gripper/command", t + 10, w.float64(d.gripper))
            w.write("/servo_node/delta_twist_cmds", t + 10, w.twist(t + 10, lin, ang))
    rc, err = _run_cli(capsys, bag, "--out", tmp_path / "o", "--instruction", "reach", "--checkpoint", ckpt)
    assert rc == 0, err
    ep = read_episode(scan_episodes(tmp_path / "o").episodes[0])
    spec = ActionSpec.from_dict(json.loads((ckpt / "config.json").read_text())["action_spec"])
    assert ep.action_spec == spec and spec.names == METAWORLD_4D.names and ep.joint_names == names
    np.testing.assert_array_equal(ep.joint_positions[2], np.arange(len(names)) + 2)
    # metres per step re-expressed in the checkpoint's units (its translation_scale_m), gripper kept
    expected = actions[:, [0, 1, 2, 6]].copy()
    expected[:, :3] *= EE_DELTA_7D.translation_scale_m / spec.translation_scale_m
    np.testing.assert_allclose(ep.actions, expected, atol=1e-5)


def test_camera_on_another_clock_needs_bag_stamps(tmp_path):
    actions = _actions(6)
    bag = tmp_path / "clock"
    write_demo_bag(bag, actions, camera_clock_offset_s=500.0)  # header stamps 500 s ahead
    with pytest.raises(BagImportError, match="--stamps bag"):
        import_bag(bag, tmp_path / "o", _cfg())
    ep = read_episode(import_bag(bag, tmp_path / "o", _cfg(stamps="bag")).episodes[0])
    np.testing.assert_allclose(ep.actions, actions, atol=1e-5)
    np.testing.assert_array_equal(ep.images["main"][5], _frame(5))
