#!/usr/bin/env python3
"""Policy node at robot rates: commands/s, image-stamp -> command latency vs bare work, reload gap.

Runs what a robot runs, one process per node: `fake_robot_node` (camera 640x480 rgb8 at 30 Hz best
effort, /joint_states at 500 Hz, /ee_pose at 100 Hz) and `policy_node` (config/policy_node.yaml,
servo_twist backend, enabled through ~/enable). This process listens where Servo and the recorder
would and reads the node's own statistics from /diagnostics. Per configuration (control trigger
frame/timer x camera raw/jpeg x camera process with/without config/fastdds_shm.xml):

* commands/s (twists received here) and the ratio to control_rate_hz (target >= 0.95);
* image-stamp -> command publish p50 / p95 (the node's own figure, its last <= 200 commands) and the
  ratio of p50 to the bare work p50 (target <= 1.5); bare = decode (+ jpeg decode) + resize +
  policy.act + publish of a TwistStamped, timed in this process on the same frame and checkpoint,
  same torch thread count, one call per control period while the fake robot publishes, just
  before the policy node starts (the node also works once per period: the same work measured
  ~1.5x slower at 10 Hz than in a tight loop). The tight-loop figure, quiet, is kept for reference;
* the longest gap between commands while `~/reload` loads the checkpoint again `--reloads` times,
  in control periods (target <= 2);
* node CPU and os.getloadavg() (2 shared cores: other jobs inflate the node figures).

The policy node always loads the SHM profile (the launch files ship it); `noshm` configurations leave
it out of the camera process only, as a stock camera driver would; `noshm_reliable` also publishes
the camera RELIABLE (a stock driver's default QoS), which the node's subscription then matches.

    python bench/bench_policy_latency.py                       # all configurations, 20 s each
    python bench/bench_policy_latency.py --seconds 8 --configs frame:raw:shm --reloads 2   # smoke
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHM_PROFILE = REPO / "config" / "fastdds_shm.xml"
PROFILE_VARS = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")
DEFAULT_CONFIGS = ("frame:raw:shm,timer:raw:shm,frame:raw:noshm,frame:raw:noshm_reliable,frame:jpeg:noshm,"
                   "timer:jpeg:noshm")


def _pct(values) -> dict | None:
    import numpy as np

    if not len(values):
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def _proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _env(shm: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    for var in PROFILE_VARS:
        env.pop(var, None)
        if shm:
            env[var] = str(SHM_PROFILE)
    return env


def bare_work(checkpoint: Path, compressed: str, n: int, threads: int, node, period_s: float = 0.0) -> dict:
    """decode (+ jpeg decode) + resize + act + publish, on the fake robot's first frame.

    period_s > 0: one call per period, as the node makes them (measured: the same work takes
    ~1.5x longer at 10 Hz than back to back, caches and clocks cool between calls); 0: back to back."""
    import numpy as np
    import torch
    from geometry_msgs.msg import TwistStamped

    from ire_vla_ros.nodes.fake_robot_node import compress_frame, render_frame
    from ire_vla_ros.robot.image_codec import decode_compressed, decode_image, resize_rgb
    from ire_vla_ros.vla.checkpoint import load_checkpoint

    if threads > 0:
        torch.set_num_threads(threads)
    policy = load_checkpoint(checkpoint, device="cpu").eval()
    size = getattr(policy.backbone, "image_size", None)
    img = render_frame(0, 480, 640, 3)
    data = compress_frame(img, compressed) if compressed != "none" else np.ascontiguousarray(img).tobytes()
    state = np.zeros(len(policy.joint_names), np.float32)
    pub = node.create_publisher(TwistStamped, "/bench_bare_twist", 1)

    def once():
        if compressed != "none":
            rgb = decode_compressed(compressed, data)
        else:
            rgb = decode_image("rgb8", 480, 640, 640 * 3, data)
        res = policy.act(resize_rgb(rgb, size), state, "push the puck to the goal", deterministic=True)
        msg = TwistStamped()
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.twist.linear.x = float(res.action[0])
        pub.publish(msg)

    for _ in range(5):
        once()
    ms = []
    due = time.perf_counter()
    for _ in range(n):
        if period_s > 0:
            due += period_s
            time.sleep(max(0.0, due - time.perf_counter()))
        t0 = time.perf_counter()
        once()
        ms.append((time.perf_counter() - t0) * 1e3)
    node.destroy_publisher(pub)
    return _pct(ms)


def run_config(args, ckpt: Path, trigger: str, compressed: str, transport: str, node, listen) -> dict:
    from std_srvs.srv import SetBool, Trigger

    shm, reliable = transport == "shm", transport.endswith("_reliable")

    fake_cmd = [sys.executable, "-m", "ire_vla_ros.nodes.fake_robot_node", "--ros-args",
                "-p", f"camera_hz:={args.camera_rate}", "-p", f"joint_hz:={args.joint_rate}",
                "-p", "ee_pose_hz:=100.0", "-p", f"compressed:={compressed}",
                "-p", f"reliable_camera:={'true' if reliable else 'false'}"]
    policy_cmd = [sys.executable, "-m", "ire_vla_ros.nodes.policy_node", "--ros-args",
                  "--params-file", str(REPO / "config" / "policy_node.yaml"),
                  "-p", f"checkpoint:={ckpt}", "-p", f"control_rate_hz:={args.control_rate}",
                  "-p", f"control_trigger:={trigger}", "-p", f"torch_num_threads:={args.torch_threads}",
                  "-p", "device:=cpu", "-p", "default_instruction:=push the puck to the goal",
                  "-p", "servo_switch_service:=''", "-p", "servo_pause_service:=''",
                  "-p", f"image_transport:={'raw' if compressed == 'none' else 'compressed'}"]
    procs, logs = [], {}

    def start(name, cmd, env):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        logs[name] = []
        threading.Thread(target=lambda p=p, buf=logs[name]: buf.extend(p.stdout), daemon=True).start()
        procs.append(p)
        return p

    start("fake_robot", fake_cmd, _env(shm))
    try:
        # the bare work side by side: same machine, fake robot publishing, one call per control period
        time.sleep(2.0)
        bare = bare_work(ckpt, compressed, args.bare_cadence_iters, args.torch_threads, node, 1.0 / args.control_rate)
        policy_proc = start("policy_node", policy_cmd, _env(True))
        cli = node.create_client(SetBool, "/policy_node/enable")
        if not cli.wait_for_service(timeout_sec=120.0):
            raise RuntimeError("policy_node did not come up:\n" + "".join(logs["policy_node"][-20:]))
        fut = cli.call_async(SetBool.Request(data=True))
        deadline = time.monotonic() + 30
        while not fut.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while not listen.twists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not listen.twists():
            raise RuntimeError("no command from policy_node:\n" + "".join(logs["policy_node"][-20:]))
        time.sleep(2.0)  # settle
        listen.reset()
        t0, cpu0 = time.monotonic(), _proc_cpu_s(policy_proc.pid)
        frames0 = (int(listen.diag().get("frames", "0")), time.monotonic())
        time.sleep(args.seconds)
        t1 = time.monotonic()
        cpu_pct = 100.0 * (_proc_cpu_s(policy_proc.pid) - cpu0) / (t1 - t0)
        twists = [t for t in listen.twists() if t0 <= t <= t1]
        action_lat = listen.action_latency_ms()
        time.sleep(1.5)  # one more /diagnostics
        diag = listen.diag()
        frames_per_s = (int(diag.get("frames", "0")) - frames0[0]) / (time.monotonic() - frames0[1])

        # reloads: gaps between commands while the checkpoint loads again
        reload_gaps = []
        if args.reloads:
            rcli = node.create_client(Trigger, "/policy_node/reload")
            rcli.wait_for_service(timeout_sec=30.0)
            for _ in range(args.reloads):
                ok0 = int(listen.diag().get("reloads_ok", "0"))
                listen.reset()
                ts = time.monotonic()
                f = rcli.call_async(Trigger.Request())
                while not f.done() and time.monotonic() - ts < 30:
                    time.sleep(0.01)
                answer_ms = (time.monotonic() - ts) * 1e3
                while int(listen.diag().get("reloads_ok", "0")) <= ok0 and time.monotonic() - ts < 120:
                    time.sleep(0.05)
                time.sleep(1.5)  # the swap happens at the next step; keep counting past it
                tw = listen.twists()
                gaps = [b - a for a, b in zip(tw, tw[1:])]
                reload_gaps.append({"answer_ms": answer_ms, "max_gap_ms": 1e3 * max(gaps) if gaps else None,
                                    "commands": len(tw)})
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGINT)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    f = lambda k: float(diag.get(k, "nan"))  # noqa: E731
    p50 = f("latency_ms_p50")
    rate = (len(twists) - 1) / (twists[-1] - twists[0]) if len(twists) > 1 else 0.0
    gaps = [b - a for a, b in zip(twists, twists[1:])]
    period_ms = 1e3 / args.control_rate
    worst_reload = max((g["max_gap_ms"] or 0.0) for g in reload_gaps) if reload_gaps else None
    return {
        "control_trigger": trigger, "camera": f"{args.width}x{args.height} rgb8 @ {args.camera_rate} Hz "
        f"{'raw' if compressed == 'none' else compressed}, {'reliable' if reliable else 'best effort'}",
        "camera_process_shm_profile": shm, "camera_codec": compressed,
        "commands_per_s": rate, "ratio_commands_to_control_rate": rate / args.control_rate,
        "command_interval_ms": _pct([1e3 * g for g in gaps]),
        "latency_image_stamp_to_command_ms": {"p50": f("latency_ms_p50"), "p95": f("latency_ms_p95"),
                                              "mean": f("latency_ms_mean")},
        "image_stamp_to_action_receipt_here_ms": _pct(action_lat),
        "inference_ms_mean": f("inference_ms_mean"), "decode_ms_mean": f("decode_ms_mean"),
        "image_stamp_to_node_receive_ms_mean": f("image_delay_ms_mean"),
        "image_age_at_step_ms_mean": f("image_age_at_tick_ms_mean"),
        "frames_received_per_s": frames_per_s, "stale_skips": diag.get("stale_skips"),
        "image_reliability": diag.get("image_reliability"), "node_cpu_percent": cpu_pct,
        "reloads": reload_gaps,
        "reload_longest_gap_in_control_periods": worst_reload / period_ms if worst_reload else None,
        "bare_at_control_rate_fake_robot_running_ms": bare,
        "ratio_latency_p50_to_bare_p50": p50 / bare["p50"],
        "loadavg_at_end": os.getloadavg(),
    }


class Listener:
    def __init__(self, node):
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from sensor_msgs.msg import JointState

        self.node, self._lock = node, threading.Lock()
        self._twists, self._lat, self._diag = [], [], {}
        node.create_subscription(TwistStamped, "/servo_node/delta_twist_cmds", self._on_twist, 10)
        node.create_subscription(JointState, "/policy_node/action", self._on_action, 10)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)

    def _on_twist(self, msg):
        if any((msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z)):  # zero twists are stops
            with self._lock:
                self._twists.append(time.monotonic())

    def _on_action(self, msg):
        now = self.node.get_clock().now().nanoseconds
        with self._lock:
            self._lat.append((now - (msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)) * 1e-6)

    def _on_diag(self, msg):
        for st in msg.status:
            if st.name.endswith("policy_node: policy"):
                with self._lock:
                    self._diag = {kv.key: kv.value for kv in st.values}

    def reset(self):
        with self._lock:
            self._twists, self._lat = [], []

    def twists(self):
        with self._lock:
            return list(self._twists)

    def action_latency_ms(self):
        with self._lock:
            return list(self._lat)

    def diag(self):
        with self._lock:
            return dict(self._diag)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="checkpoint dir or root (default: models/metaworld_tiny, else a fresh tiny checkpoint)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help="comma list of trigger:camera:transport, trigger frame|timer, camera raw|jpeg|png, "
                         "transport of the camera process shm | noshm (best effort, no SHM profile) | "
                         f"noshm_reliable (a stock driver's reliable QoS, no SHM profile). Default {DEFAULT_CONFIGS}")
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window per configuration")
    ap.add_argument("--reloads", type=int, default=3, help="~/reload calls per configuration (gap measurement)")
    ap.add_argument("--control-rate", type=float, default=10.0)
    ap.add_argument("--camera-rate", type=float, default=30.0)
    ap.add_argument("--joint-rate", type=float, default=500.0)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--bare-iters", type=int, default=200, help="back-to-back bare calls (quiet, reference)")
    ap.add_argument("--bare-cadence-iters", type=int, default=100,
                    help="bare calls at the control rate per configuration (the ratio's denominator)")
    ap.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "83")))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "policy_latency.json")
    args = ap.parse_args(argv)
    args.width, args.height = 640, 480
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack, if a run hangs

    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
    for var in PROFILE_VARS:  # this process (the "Servo / recorder side") uses the profile like the node
        os.environ[var] = str(SHM_PROFILE)

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = REPO / "models" / "metaworld_tiny"
        if not ckpt.exists():
            from ire_vla_ros.vla.testing import make_tiny_checkpoint

            tmp = tempfile.TemporaryDirectory(prefix="bench_ckpt_")
            make_tiny_checkpoint(Path(tmp.name))
            ckpt = Path(tmp.name)

    rclpy.init()
    node = rclpy.create_node("bench_policy_latency")
    listen = Listener(node)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    results, bare_b2b = [], {}
    load_start = os.getloadavg()
    try:
        for spec in args.configs.split(","):
            trigger, camera, transport = spec.strip().split(":")
            compressed = "none" if camera == "raw" else camera
            if compressed not in bare_b2b:
                bare_b2b[compressed] = {"before": bare_work(ckpt, compressed, args.bare_iters, args.torch_threads,
                                                            node)}
            r = run_config(args, ckpt, trigger, compressed, transport, node, listen)
            results.append(r)
            print(json.dumps({k: r[k] for k in ("control_trigger", "camera", "camera_process_shm_profile",
                                                 "commands_per_s", "latency_image_stamp_to_command_ms",
                                                 "ratio_latency_p50_to_bare_p50",
                                                 "reload_longest_gap_in_control_periods")}), flush=True)
        for compressed in bare_b2b:
            bare_b2b[compressed]["after"] = bare_work(ckpt, compressed, args.bare_iters, args.torch_threads, node)
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown()
    for r in results:  # for reference: the same ratio against the back-to-back figure (a warm loop)
        b = bare_b2b[r["camera_codec"]]
        r["ratio_latency_p50_to_bare_back_to_back_p50"] = (r["latency_image_stamp_to_command_ms"]["p50"]
                                                          / ((b["before"]["p50"] + b["after"]["p50"]) / 2))
    out = {
        "what": "policy_node + fake_robot_node as separate processes; see bench/bench_policy_latency.py",
        "checkpoint": str(ckpt), "control_rate_hz": args.control_rate, "camera_hz": args.camera_rate,
        "joint_states_hz": args.joint_rate, "seconds_per_config": args.seconds, "cpu_count": os.cpu_count(),
        "torch_threads": args.torch_threads, "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg(),
        "targets": {"ratio_commands_to_control_rate": ">= 0.95", "ratio_latency_p50_to_bare_p50": "<= 1.5",
                    "reload_longest_gap_in_control_periods": "<= 2"},
        "bare": "per configuration, bare_at_control_rate_fake_robot_running_ms: decode + resize + act + publish "
                "in this process, one call per control period while the fake robot publishes, just before the "
                "policy node starts (the ratio's denominator); bare_back_to_back_quiet_ms: the same work in a "
                "tight loop with nothing else running, before and after all configurations",
        "bare_back_to_back_quiet_ms": bare_b2b,
        "configs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2))
    os.replace(tmp_out, args.out)
    print(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
