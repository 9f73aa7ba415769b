#!/usr/bin/env python3
"""Recorder at robot rates: dropped steps, write throughput against raw h5py, memory, load.

Runs what a robot runs, one process per node: `fake_robot_node` (camera 640x480 rgb8 at 30 Hz
best effort, /joint_states at 500 Hz, /ee_pose at 100 Hz) and `recorder_node`
(config/recorder_node.yaml, its episode writer in a child process of its own). This process plays
the policy: it subscribes to the camera and publishes one `~/action` per frame it acts on
(`--action-hz`, default 30 = every frame), stamped with that frame's stamp, as policy_node does.
`--minutes` of recording are split into `--episodes` episodes (~/start_episode, ~/stop_episode).
Each saved episode is read back (steps = actions sent?) and deleted to bound the disk.

Reported (bench/results/recorder.json):
* steps dropped = actions sent - steps written, per episode and in total (target 0), with the
  recorder's own counters (queue drops, skipped steps, pairing mismatches, exact image matches);
* write throughput, side by side in this run on the same frames (the fake robot's, same chunking,
  lzf, checksums), alternating A/B `--ab-rounds` times, medians:
  A = raw h5py: a loop of dataset.resize + write per frame into one file,
  B = the recorder's writing path: EpisodeRecorder -> ProcessEpisodeWriter (child process,
      free-space checks, validation), fed as fast as it takes them;
  ratio B/A (target >= 0.8); also the live run's write capacity (steps / the child's write time);
* peak RSS (VmHWM) of the recorder process and of its writer child; CPU seconds of each;
* os.getloadavg() at start and end (2 shared cores: other jobs inflate everything).

    python bench/bench_recorder.py                              # 10 minutes, 10 episodes
    python bench/bench_recorder.py --minutes 0.5 --episodes 2 --ab-frames 60   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import machine, write_result  # noqa: E402

SHM_PROFILE = REPO / "config" / "fastdds_shm.xml"
PROFILE_VARS = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")


def _proc_stat(pid: int) -> dict:
    """Peak RSS (MB) and CPU seconds of a live process."""
    out = {"peak_rss_mb": None, "rss_mb": None, "cpu_s": None}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    return out


# ---------------------------------------------------------------------------------------------
# A/B write throughput (no ROS)
# ---------------------------------------------------------------------------------------------
def _frames(n_distinct: int = 30):
    from ire_vla_ros.nodes.fake_robot_node import render_frame

    return [render_frame(i, 480, 640, 3) for i in range(n_distinct)]


def raw_h5py_fps(frames, n: int, root: Path) -> float:
    import h5py
    import numpy as np

    path = root / "raw.h5"
    t0 = time.perf_counter()
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        shape = frames[0].shape
        d = f.create_dataset("images", shape=(0,) + shape, maxshape=(None,) + shape, chunks=(1,) + shape,
                             dtype=np.uint8, compression="lzf", fletcher32=True)
        for i in range(n):
            d.resize(i + 1, axis=0)
            d[i] = frames[i % len(frames)]
    dt = time.perf_counter() - t0
    path.unlink()
    return n / dt


def recorder_path_fps(frames, n: int, root: Path, proc) -> float:
    import numpy as np

    from ire_vla_ros.episodes.recorder import EpisodeRecorder, Step
    from ire_vla_ros.vla.action_spec import METAWORLD_4D

    results = []
    rec = EpisodeRecorder(lambda meta: proc.open(root, meta, compression="lzf"), max_queue=n + 1,
                          on_result=lambda k, v: results.append((k, v)))
    meta = dict(instruction="bench", task="bench", source="policy", action_spec=METAWORLD_4D,
                joint_names=[f"j{i}" for i in range(9)], camera_names=("main",))
    q = np.zeros(9, np.float32)
    t0 = time.perf_counter()
    rec.begin(meta)
    for i in range(n):
        rec.add_step(Step(image=frames[i % len(frames)], joint_positions=q, action=np.zeros(4, np.float32),
                          timestamp=float(i), log_prob=-1.0, value=0.0))
    rec.end(True)
    rec.flush(600.0)
    dt = time.perf_counter() - t0
    rec.close()
    kind, path = results[-1]
    if kind != "saved":
        raise RuntimeError(f"recorder path failed: {results}")
    Path(path).unlink()
    return n / dt


def ab_throughput(n: int, rounds: int, root: Path) -> dict:
    from ire_vla_ros.episodes.safe_writer import WriterProcess

    frames = _frames()
    a, b = [], []
    with WriterProcess(min_free_mb=100.0) as proc:
        recorder_path_fps(frames, min(n, 10), root, proc)  # warm-up (child imports)
        for _ in range(rounds):
            a.append(raw_h5py_fps(frames, n, root))
            b.append(recorder_path_fps(frames, n, root, proc))
    ma, mb = statistics.median(a), statistics.median(b)
    return {"frames_per_round": n, "rounds": rounds, "raw_h5py_fps": a, "recorder_path_fps": b,
            "raw_h5py_fps_median": ma, "recorder_path_fps_median": mb, "ratio_recorder_to_raw": mb / ma,
            "raw_mb_per_s_median": ma * frames[0].nbytes / 1e6}


# ---------------------------------------------------------------------------------------------
# live run
# ---------------------------------------------------------------------------------------------
class Policy:
    """Acts on camera frames: one action per frame at most `hz` times a second, stamped like the
    policy node stamps its actions (with the image's stamp)."""

    def __init__(self, node, hz: float):
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String

        from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS

        self.node, self.period = node, 1.0 / hz
        self.active = False
        self.sent = 0
        self.frames = 0
        self._last = 0.0
        self._status = {}
        self._saved = []
        self._lock = threading.Lock()
        self.pub = node.create_publisher(JointState, "/policy_node/action", RELIABLE_QOS)
        self.JointState = JointState
        node.create_subscription(Image, "/camera/image_raw", self._on_image, SENSOR_QOS)
        node.create_subscription(String, "/recorder_node/status", self._on_status, LATCHED_QOS)
        node.create_subscription(String, "/recorder_node/episode_saved", lambda m: self._saved.append(m.data),
                                 RELIABLE_QOS)

    def _on_image(self, msg) -> None:
        from ire_vla_ros.robot.action_msg import pack_action

        self.frames += 1
        now = time.monotonic()
        if not self.active or now - self._last < 0.9 * self.period:
            return
        self._last = now
        names, values = pack_action(("dx", "dy", "dz", "gripper"), [0.1, 0.0, -0.1, 1.0], -1.5, 0.2)
        self.pub.publish(self.JointState(header=msg.header, name=names, position=values))
        self.sent += 1

    def _on_status(self, msg) -> None:
        with self._lock:
            self._status = json.loads(msg.data)

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def saved(self) -> list:
        return list(self._saved)


def _call(node, srv_type, name, timeout=30.0):
    cli = node.create_client(srv_type, name)
    if not cli.wait_for_service(timeout_sec=timeout):
        raise RuntimeError(f"{name} not available")
    fut = cli.call_async(srv_type.Request())
    deadline = time.monotonic() + timeout
    while not fut.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    node.destroy_client(cli)
    if not fut.done():
        raise RuntimeError(f"{name} did not answer")
    return fut.result()


def live_run(args, root: Path) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger

    from ire_vla_ros.episodes.store import read_episode

    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    for var in PROFILE_VARS:
        env[var] = str(SHM_PROFILE)
        os.environ[var] = str(SHM_PROFILE)
    fake_cmd = [sys.executable, "-m", "ire_vla_ros.nodes.fake_robot_node", "--ros-args",
                "-p", f"camera_hz:={args.camera_hz}", "-p", f"joint_hz:={args.joint_hz}", "-p", "ee_pose_hz:=100.0"]
    rec_cmd = [sys.executable, "-m", "ire_vla_ros.nodes.recorder_node", "--ros-args",
               "--params-file", str(REPO / "config" / "recorder_node.yaml"),
               "-p", f"episodes_dir:={root}", "-p", "start_services:=['']", "-p", "instruction:=bench",
               "-p", "episode_end_topic:=''", "-p", "reward_topic:=''", "-p", f"min_free_mb:={args.min_free_mb}"]
    procs, logs = {}, {}
    rclpy.init()
    node = rclpy.create_node("bench_recorder")
    policy = Policy(node, args.action_hz)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    episodes = []
    try:
        for name, cmd in (("fake_robot", fake_cmd), ("recorder", rec_cmd)):
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            logs[name] = []
            threading.Thread(target=lambda p=p, buf=logs[name]: buf.extend(p.stdout), daemon=True).start()
            procs[name] = p
        deadline = time.monotonic() + 60
        while (policy.frames < 30 or not policy.status()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if policy.frames < 30 or not policy.status():
            raise RuntimeError("no camera frames or recorder status:\n" + "".join(logs["recorder"][-20:]))
        writer_pid = int(policy.status().get("writer_pid", 0))
        episode_s = args.minutes * 60.0 / args.episodes
        load_during = []
        for k in range(args.episodes):
            n_saved = len(policy.saved())
            resp = _call(node, Trigger, "/recorder_node/start_episode")
            if not resp.success:
                raise RuntimeError(f"start refused: {resp.message}")
            while policy.status().get("state") != "recording":
                time.sleep(0.01)
            sent0, frames0 = policy.sent, policy.frames
            policy.active = True
            t_end = time.monotonic() + episode_s
            while time.monotonic() < t_end:
                time.sleep(min(1.0, max(0.0, t_end - time.monotonic())))
            policy.active = False
            time.sleep(0.3)  # the last action in flight
            load_during.append(os.getloadavg()[0])
            sent = policy.sent - sent0
            _call(node, Trigger, "/recorder_node/stop_episode")
            deadline = time.monotonic() + 120
            while len(policy.saved()) <= n_saved and time.monotonic() < deadline:
                time.sleep(0.05)
            st = policy.status()
            path = policy.saved()[-1] if len(policy.saved()) > n_saved else None
            steps = read_episode(path, load_images=False).n_steps if path else 0
            size_mb = Path(path).stat().st_size / 1e6 if path else 0.0
            episodes.append({"seconds": episode_s, "actions_sent": sent, "camera_frames_here": policy.frames - frames0,
                             "steps_written": steps, "dropped": sent - steps, "file_mb": size_mb,
                             "recorder_episode_steps": st.get("episode_steps"),
                             "exact_image_steps": st.get("exact_image_steps"),
                             "pairing_mismatches": st.get("pairing_mismatches"),
                             "max_queue_depth": st.get("max_queue_depth")})
            print(json.dumps(episodes[-1]), flush=True)
            if path and not args.keep:
                Path(path).unlink()
        rec_stat, child_stat = _proc_stat(procs["recorder"].pid), _proc_stat(writer_pid) if writer_pid else {}
        final = policy.status()
    finally:
        for p in reversed(list(procs.values())):
            p.send_signal(signal.SIGINT)
        for p in reversed(list(procs.values())):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown()
    written = sum(e["steps_written"] for e in episodes)
    return {
        "episodes": episodes, "minutes": args.minutes, "actions_sent": sum(e["actions_sent"] for e in episodes),
        "steps_written": written, "steps_dropped": sum(e["dropped"] for e in episodes),
        "recorder_counters": {k: final.get(k) for k in ("steps_dropped", "step_errors", "skipped_no_obs",
                                                        "skipped_stale", "pairing_mismatches_total",
                                                        "episodes_failed", "writer_restarts", "max_queue_depth",
                                                        "writer_thread_s", "file_write_s")},
        "live_write_capacity_fps": written / final["file_write_s"] if final.get("file_write_s") else None,
        "recorder_process": rec_stat, "writer_child_process": child_stat,
        "loadavg_during_episodes": load_during,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="recording time in total")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--action-hz", type=float, default=30.0, help="actions per second (30: every frame)")
    ap.add_argument("--camera-hz", type=float, default=30.0)
    ap.add_argument("--joint-hz", type=float, default=500.0)
    ap.add_argument("--ab-frames", type=int, default=300, help="frames per A/B throughput round")
    ap.add_argument("--ab-rounds", type=int, default=3)
    ap.add_argument("--min-free-mb", type=float, default=500.0)
    ap.add_argument("--dir", type=Path, default=None, help="episode directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the recorded episodes")
    ap.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "84")))
    ap.add_argument("--out", default="recorder", help="result name under bench/results/")
    args = ap.parse_args(argv)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    tmp = None
    root = args.dir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="bench_recorder_")
        root = Path(tmp)
    root.mkdir(parents=True, exist_ok=True)
    started = os.getloadavg()
    try:
        live = live_run(args, root / "episodes")
        ab = ab_throughput(args.ab_frames, args.ab_rounds, root)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if live.get("live_write_capacity_fps"):
        live["live_write_capacity_ratio_to_raw_h5py"] = live["live_write_capacity_fps"] / ab["raw_h5py_fps_median"]
    write_result(args.out, {
        "what": "recorder_node + fake_robot_node as separate processes, 640x480 rgb8 @ 30 Hz, joints @ 500 Hz; "
                "see bench/bench_recorder.py",
        "targets": {"steps_dropped": 0, "ratio_recorder_to_raw": ">= 0.8"},
        "live": live, "write_throughput_ab": ab,
        "loadavg_at_start": started, "loadavg_at_end": os.getloadavg(), "machine": machine(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    })
    return 0 if live["steps_dropped"] == 0 and ab["ratio_recorder_to_raw"] >= 0.8 else 1


if __name__ == "__main__":
    raise SystemExit(main())
