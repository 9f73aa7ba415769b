#!/usr/bin/env python3
"""Policy latency: the running policy_node (image stamp -> command publish) vs bare `policy.act`.

Starts policy_node as its own process (servo_twist backend, enabled through ~/enable), feeds it
camera images (default 640x480 rgb8 at 30 Hz, best effort), joint states and the EE pose from this
process, and reads the node's own latency / inference statistics from /diagnostics. The same
checkpoint is loaded here and `policy.act` is timed on the same input (the node's decoded and
resized image), with the same torch thread count. Both go side by side, with their ratio, to
bench/results/policy_latency.json.

Node latency = command publish time - image header stamp (node clock), so it includes the image's
age when the control tick picks it up (up to one camera period), the transport, decode + resize,
inference and publishing.

    python bench/bench_policy_latency.py [--checkpoint DIR] [--seconds 20] [--no-shm]
"""
from __future__ import annotations

import argparse
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
JOINTS = ["right_j0", "right_j1", "right_j2", "right_j3", "right_j4", "right_j5", "right_j6", "r_close", "l_close"]


def _percentiles(values):
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def _proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def bare_act(checkpoint: Path, image, joints, instruction: str, n: int, threads: int) -> dict:
    import numpy as np
    import torch

    from ire_vla_ros.robot.image_codec import decode_image, encode_rgb, resize_rgb
    from ire_vla_ros.vla.checkpoint import load_checkpoint

    if threads > 0:
        torch.set_num_threads(threads)
    policy = load_checkpoint(checkpoint, device="cpu")
    policy.eval()
    size = getattr(policy.backbone, "image_size", None)
    f = encode_rgb(image, "rgb8")
    state = np.asarray(joints, np.float32)[: len(policy.joint_names)]
    small = resize_rgb(image, size)
    for _ in range(5):
        policy.act(small, state, instruction, deterministic=True)
    act_ms, pre_ms = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        img = resize_rgb(decode_image(f["encoding"], f["height"], f["width"], f["step"], f["data"]), size)
        t1 = time.perf_counter()
        policy.act(img, state, instruction, deterministic=True)
        t2 = time.perf_counter()
        pre_ms.append((t1 - t0) * 1e3)
        act_ms.append((t2 - t1) * 1e3)
    return {"act_ms": _percentiles(act_ms), "decode_resize_ms": _percentiles(pre_ms),
            "model_input": size, "device": "cpu", "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="checkpoint dir or root (default: models/metaworld_tiny if present, else a fresh "
                         "tiny checkpoint in a temp dir)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window after the first command")
    ap.add_argument("--control-rate", type=float, default=10.0)
    ap.add_argument("--camera-rate", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--bare-iters", type=int, default=200)
    ap.add_argument("--no-shm", action="store_true", help="do not use config/fastdds_shm.xml")
    ap.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "83")))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "policy_latency.json")
    args = ap.parse_args(argv)

    # DDS confined to this machine, own domain; same profile for this process and the node.
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
    for var in ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE"):
        if args.no_shm:
            os.environ.pop(var, None)
        else:
            os.environ[var] = str(REPO / "config" / "fastdds_shm.xml")

    import numpy as np
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped, TwistStamped
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image, JointState
    from std_srvs.srv import SetBool

    from ire_vla_ros.nodes.ros_common import SENSOR_QOS
    from ire_vla_ros.robot.image_codec import encode_rgb

    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        default = REPO / "models" / "metaworld_tiny"
        if default.exists():
            ckpt = default
        else:
            from ire_vla_ros.vla.testing import make_tiny_checkpoint

            tmp = tempfile.TemporaryDirectory(prefix="bench_ckpt_")
            make_tiny_checkpoint(Path(tmp.name), joint_names=JOINTS)
            ckpt = Path(tmp.name)
    from ire_vla_ros.vla.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(ckpt)
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    instruction = "push the puck to the goal"

    # bare policy.act before the node runs (and again after it stops): same input, same threads
    bare_before = bare_act(ckpt, image, [0.0] * len(JOINTS), instruction, args.bare_iters, args.torch_threads)

    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    node_cmd = [sys.executable, "-m", "ire_vla_ros.nodes.policy_node", "--ros-args",
                "--params-file", str(REPO / "config" / "policy_node.yaml"),
                "-p", f"checkpoint:={ckpt}", "-p", f"control_rate_hz:={args.control_rate}",
                "-p", f"torch_num_threads:={args.torch_threads}", "-p", "device:=cpu",
                "-p", f"default_instruction:={instruction}", "-p", "servo_switch_service:=''",
                "-p", "diagnostics_period_s:=1.0"]
    proc = subprocess.Popen(node_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node_log: list[str] = []
    threading.Thread(target=lambda: node_log.extend(proc.stdout), daemon=True).start()

    rclpy.init()
    node = rclpy.create_node("bench_policy_latency")
    cam = node.create_publisher(Image, "/camera/image_raw", SENSOR_QOS)
    js_pub = node.create_publisher(JointState, "/joint_states", 10)
    ee_pub = node.create_publisher(PoseStamped, "/ee_pose", 10)
    fields = encode_rgb(image, "rgb8")
    img_msg = Image(**fields)
    img_msg.header.frame_id = "camera"
    lock = threading.Lock()
    diag: dict = {}
    twist_times: list[float] = []
    action_lat_ms: list[float] = []

    def on_diag(msg: DiagnosticArray):
        for st in msg.status:
            if st.name.endswith("policy_node: policy"):
                with lock:
                    diag.clear()
                    diag.update({kv.key: kv.value for kv in st.values})

    def on_action(msg: JointState):
        now = node.get_clock().now().nanoseconds
        with lock:
            action_lat_ms.append((now - (msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)) * 1e-6)

    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    node.create_subscription(TwistStamped, "/servo_node/delta_twist_cmds",
                             lambda m: twist_times.append(time.monotonic()), 10)
    node.create_subscription(JointState, "/policy_node/action", on_action, 10)

    def publish_camera():
        img_msg.header.stamp = node.get_clock().now().to_msg()
        cam.publish(img_msg)

    def publish_state():
        stamp = node.get_clock().now().to_msg()
        js = JointState(name=JOINTS, position=[0.0] * len(JOINTS))
        js.header.stamp = stamp
        js_pub.publish(js)
        ps = PoseStamped()
        ps.header.stamp, ps.header.frame_id = stamp, "base_link"
        ps.pose.position.z, ps.pose.orientation.w = 0.3, 1.0
        ee_pub.publish(ps)

    node.create_timer(1.0 / args.camera_rate, publish_camera)
    node.create_timer(0.02, publish_state)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    result: dict = {}
    try:
        cli = node.create_client(SetBool, "/policy_node/enable")
        if not cli.wait_for_service(timeout_sec=120.0):
            raise RuntimeError("policy_node did not come up:\n" + "".join(node_log[-20:]))
        fut = cli.call_async(SetBool.Request(data=True))
        t_end = time.monotonic() + 30
        while not fut.done() and time.monotonic() < t_end:
            time.sleep(0.05)
        t_end = time.monotonic() + 60
        while not twist_times and time.monotonic() < t_end:
            time.sleep(0.05)
        if not twist_times:
            raise RuntimeError("no command from policy_node:\n" + "".join(node_log[-20:]))
        # let the node's rolling window (200 samples) fill with steady-state ticks only
        with lock:
            action_lat_ms.clear()
        t0 = time.monotonic()
        n0 = len(twist_times)
        cpu0 = _proc_cpu_s(proc.pid)
        time.sleep(args.seconds)
        n1 = len(twist_times)
        node_cpu_pct = 100.0 * (_proc_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0)
        time.sleep(1.5)  # one more diagnostics message
        with lock:
            d = dict(diag)
            lat = list(action_lat_ms)
        cmd_hz = (n1 - n0) / (time.monotonic() - 1.5 - t0)
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()

    bare_after = bare_act(ckpt, image, [0.0] * len(JOINTS), instruction, args.bare_iters, args.torch_threads)
    bare = {
        "act_ms": {"mean": (bare_before["act_ms"]["mean"] + bare_after["act_ms"]["mean"]) / 2,
                   "p95": max(bare_before["act_ms"]["p95"], bare_after["act_ms"]["p95"])},
        "decode_resize_ms": {"mean": (bare_before["decode_resize_ms"]["mean"]
                                      + bare_after["decode_resize_ms"]["mean"]) / 2},
        "before_node": bare_before, "after_node": bare_after,
    }
    f = lambda k: float(d.get(k, "nan"))  # noqa: E731
    node_lat_mean, node_inf_mean = f("latency_ms_mean"), f("inference_ms_mean")
    result = {
        "checkpoint": str(ckpt),
        "camera": f"{args.width}x{args.height} rgb8 @ {args.camera_rate} Hz, best effort",
        "transport": "default" if args.no_shm else "config/fastdds_shm.xml",
        "control_rate_hz": args.control_rate, "seconds": args.seconds, "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "note_load": "2 shared CPU cores; other jobs running during the measurement inflate the node numbers "
                     "(the bare timing runs alone before/after); see loadavg_at_end",
        "node": {
            "latency_image_stamp_to_command_ms": {"mean": node_lat_mean, "p95": f("latency_ms_p95")},
            "inference_ms": {"mean": node_inf_mean, "p95": f("inference_ms_p95")},
            "image_stamp_to_node_receive_ms_mean": f("image_delay_ms_mean"),
            "image_age_at_tick_ms_mean": f("image_age_at_tick_ms_mean"),
            "commands_per_s": cmd_hz,
            "node_process_cpu_percent": node_cpu_pct,
            "image_stamp_to_action_receipt_ms (this process)": _percentiles(lat) if lat else None,
            "rejected_images": d.get("rejected_images"), "stale_skips": d.get("stale_skips"),
            "image_decoder": d.get("image_decoder"),
        },
        "bare_policy_act": bare,
        "ratio_node_latency_to_bare_act": node_lat_mean / bare["act_ms"]["mean"],
        "ratio_node_latency_to_bare_decode_resize_act":
            node_lat_mean / (bare["act_ms"]["mean"] + bare["decode_resize_ms"]["mean"]),
        "ratio_node_inference_to_bare_act": node_inf_mean / bare["act_ms"]["mean"],
        "note": "node latency includes the image's age at the control tick (uniform in [0, 1/camera_rate]), "
                "DDS transport, decode+resize, inference, publish",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
