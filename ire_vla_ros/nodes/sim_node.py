"""sim_node: a Metaworld task behind the same ROS interfaces as the real robot.

The node owns a `MetaworldTaskEnv` and steps it at `rate_hz` on a timer, like a robot's control
loop. Motion commands arrive the way MoveIt Servo receives them; the node converts them to
Metaworld's 4-D action `[dx, dy, dz, gripper]`:

* TwistStamped on `twist_topic` (`/servo_node/delta_twist_cmds`): a velocity, held until it is
  `command_timeout_s` old (by its header stamp, Servo's `incoming_command_timeout`), then the arm
  stops. `action[:3] = linear * dt / translation_scale_m`, dt = 1 / rate_hz, clipped to [-1, 1].
  Angular velocity is ignored (Metaworld has no wrist rotation).
* PoseStamped on `pose_topic` (`/servo_node/pose_target_cmds`): move toward the target position
  (`pose_gain` of the remaining error per step, at most one action unit per axis) while the
  command is fresh. Orientation is ignored.
* std_msgs/Float64 on `gripper_topic` (`/gripper/command`): gripper effort in [-1 (open), 1 (close)],
  held until the next command (a gripper does not time out).
* std_srvs/SetBool `pause_service` (`/servo_node/pause_servo`), as Jazzy Servo serves it: true pauses
  (twists and pose targets move nothing until false), false resumes. The gripper is not Servo's and
  keeps acting. So the policy's stop path (zero twist + pause) is exercised over real DDS.

Commands must be in `frame_id` (default "world", the sim's only frame); others are rejected.

Interface
  pub  <image_topic>          sensor_msgs/Image rgb8 (sensor-data QoS)
  pub  <joint_states_topic>   sensor_msgs/JointState (env.joint_names), reliable
  pub  <ee_pose_topic>        geometry_msgs/PoseStamped (hand position, world frame), reliable
  pub  ~/success              std_msgs/Bool      per step
  pub  ~/reward               std_msgs/Float32   per step, Metaworld dense reward
  pub  ~/expert_action        sensor_msgs/JointState  the scripted expert's action for the current
                                                      observation (names = action names), same stamp
  pub  ~/status               std_msgs/String    JSON, latched: task, seed, episode, steps, success
  pub  <instruction_topic>    std_msgs/String    transient local, on every reset (publish_instruction)
  srv  ~/reset                std_srvs/Trigger   new episode with the next seed (seed, seed+1, ...)
  srv  <pause_service>        std_srvs/SetBool   Servo's pause (true) / resume (false)
All messages of one step carry the same header stamp.

Episodes back to back (`auto_episodes: true`, e.g. demos or the online RL loop in simulation, where a
person would reset the robot and start the next episode): the node calls `episode_start_service`
(the recorder's ~/start_episode, which resets this sim and reward_node) at once and then
`auto_episode_pause_s` after each path on `episode_saved_topic`; a refused or failed start is
retried every second. Setting `auto_episodes` false stops after the current episode.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import numpy as np
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float32, Float64, String
from std_srvs.srv import SetBool, Trigger

from ire_vla_ros.nodes.ros_common import (
    COMMAND_QOS,
    LATCHED_QOS,
    RELIABLE_QOS,
    SENSOR_QOS,
    NodeStartupError,
    P,
    bind_live_params,
    declare_params,
    run_node,
)


# ---------------------------------------------------------------------------------------------
# Plain logic (no ROS)
# ---------------------------------------------------------------------------------------------
def twist_to_action(linear, dt: float, translation_scale_m: float) -> np.ndarray:
    """Linear velocity (m/s) held for dt seconds -> Metaworld translation action units."""
    return np.clip(np.asarray(linear, np.float64) * dt / translation_scale_m, -1.0, 1.0).astype(np.float32)


def pose_to_action(target, current, translation_scale_m: float, gain: float = 0.3) -> np.ndarray:
    """Translation toward a target position: `gain` of the remaining error per step (a P controller;
    the hand lags the commanded motion, so a gain of 1 would overshoot), at most one unit per axis."""
    delta = np.asarray(target, np.float64) - np.asarray(current, np.float64)
    return np.clip(gain * delta / translation_scale_m, -1.0, 1.0).astype(np.float32)


@dataclass
class _Timed:
    value: np.ndarray
    stamp: float  # seconds, the command's header stamp


class CommandMixer:
    """Newest twist / pose target / gripper command -> one 4-D action per control step.

    A twist or pose command older than `timeout_s` (by its stamp) is stale and gives zero motion,
    as MoveIt Servo halts on stale commands. The newest of twist and pose wins.
    """

    def __init__(self, *, dt: float, translation_scale_m: float, timeout_s: float, gripper: float = -1.0,
                 pose_gain: float = 0.3):
        self.dt = float(dt)
        self.pose_gain = float(pose_gain)
        self.scale = float(translation_scale_m)
        self.timeout_s = float(timeout_s)
        self.twist: _Timed | None = None
        self.pose: _Timed | None = None
        self.gripper = float(gripper)
        self.stale_steps = 0
        self.paused = False
        self.paused_steps = 0

    def reset(self, gripper: float) -> None:
        self.twist = self.pose = None
        self.gripper = float(np.clip(gripper, -1.0, 1.0))

    def set_twist(self, linear, stamp: float) -> None:
        self.twist = _Timed(np.asarray(linear, np.float64), float(stamp))

    def set_pose(self, position, stamp: float) -> None:
        self.pose = _Timed(np.asarray(position, np.float64), float(stamp))

    def set_gripper(self, value: float) -> None:
        self.gripper = float(np.clip(value, -1.0, 1.0)) if np.isfinite(value) else self.gripper

    def _fresh(self, cmd: _Timed | None, now: float) -> bool:
        return cmd is not None and now - cmd.stamp < self.timeout_s

    def action(self, now: float, ee_position) -> np.ndarray:
        a = np.zeros(4, np.float32)
        a[3] = self.gripper
        if self.paused:  # like a paused Servo: commands arrive but move nothing
            self.paused_steps += 1
            return a
        cmds = [c for c in (self.twist, self.pose) if self._fresh(c, now)]
        if not cmds:
            if self.twist is not None or self.pose is not None:
                self.stale_steps += 1
            return a
        newest = max(cmds, key=lambda c: c.stamp)
        if newest is self.twist:
            a[:3] = twist_to_action(newest.value, self.dt, self.scale)
        else:
            a[:3] = pose_to_action(newest.value, ee_position, self.scale, self.pose_gain)
        return a


# ---------------------------------------------------------------------------------------------
# Node
# ---------------------------------------------------------------------------------------------
class SimNode(Node):
    PARAMS = {
        "task": P("button-press-topdown-v3", "Metaworld v3 task", read_only=True),
        "image_size": P(64, "Camera image height = width (pixels)", min=16, max=1024, read_only=True),
        "action_repeat": P(1, "Physics steps per env step; match the policy's training (env.action_repeat)",
                           min=1, max=20, read_only=True),
        "camera": P("corner", "Metaworld camera", read_only=True),
        "seed": P(0, "Seed of the first episode; each ~/reset uses the next one", min=0, read_only=True),
        "rate_hz": P(10.0, "Control / publish rate; one env step per period", min=0.5, max=200.0,
                     read_only=True),
        "command_timeout_s": P(0.25, "Twist/pose commands older than this give zero motion "
                               "(Servo's incoming_command_timeout); keep > the policy's period",
                               min=0.0),
        "translation_scale_m": P(0.0, "Metres per action unit (0: the env's action spec)", min=0.0,
                                 read_only=True),
        "pose_gain": P(0.3, "Pose targets: fraction of the remaining position error commanded per step",
                       min=0.01, max=1.0, read_only=True),
        "gripper_on_reset": P(-1.0, "Gripper command after a reset (-1 open, 1 closed)", min=-1.0, max=1.0),
        "frame_id": P("world", "Frame of published poses; commands must use it", read_only=True),
        "camera_frame_id": P("camera", "frame_id of published images", read_only=True),
        "publish_instruction": P(True, "Publish the task instruction on every reset"),
        "publish_expert": P(True, "Publish the scripted expert's action every step", read_only=True),
        "image_topic": P("/camera/image_raw", "Camera output", read_only=True),
        "joint_states_topic": P("/joint_states", "Joint state output", read_only=True),
        "ee_pose_topic": P("/ee_pose", "End-effector pose output", read_only=True),
        "instruction_topic": P("/policy_node/instruction", "Instruction output (transient local)",
                               read_only=True),
        "twist_topic": P("/servo_node/delta_twist_cmds", "Twist command input", read_only=True),
        "pose_topic": P("/servo_node/pose_target_cmds", "Pose target command input", read_only=True),
        "gripper_topic": P("/gripper/command", "Gripper command input", read_only=True),
        "pause_service": P("/servo_node/pause_servo", "std_srvs/SetBool served like Servo's pause "
                           "('' = none)", read_only=True),
        "auto_episodes": P(False, "Start episodes back to back: call episode_start_service now and after "
                           "each saved episode"),
        "auto_episode_pause_s": P(0.5, "Pause between a saved episode and the next start", min=0.0, max=60.0),
        "episode_start_service": P("/recorder_node/start_episode", "std_srvs/Trigger that starts (and "
                                   "records) an episode", read_only=True),
        "episode_saved_topic": P("/recorder_node/episode_saved", "std_msgs/String, one per saved episode",
                                 read_only=True),
    }

    def __init__(self, **kwargs):
        super().__init__("sim_node", **kwargs)
        self.p = declare_params(self, self.PARAMS)
        try:
            from ire_vla_ros.sim.metaworld_env import MetaworldTaskEnv

            self.env = MetaworldTaskEnv(self.p.task, image_size=self.p.image_size, camera=self.p.camera,
                                        seed=self.p.seed, max_episode_steps=2**31 - 1,
                                        action_repeat=self.p.action_repeat)
        except (ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise NodeStartupError(f"cannot create Metaworld task {self.p.task!r}: {exc}") from exc
        self.spec = self.env.action_spec
        scale = self.p.translation_scale_m or self.spec.translation_scale_m
        self.dt = 1.0 / self.p.rate_hz
        self.mixer = CommandMixer(dt=self.dt, translation_scale_m=scale, timeout_s=self.p.command_timeout_s,
                                  gripper=self.p.gripper_on_reset, pose_gain=self.p.pose_gain)
        self.next_seed = int(self.p.seed)
        self.episode = 0
        self.success = False
        self.last_reward = 0.0
        self.rejected_frames = 0
        self.ticks = 0  # env steps since start (a liveness counter for tests)
        self._tick_times: list[float] = []
        self._warned_stamp = False
        self._closing = False
        self._env_lock = threading.Lock()

        self.image_pub = self.create_publisher(Image, self.p.image_topic, SENSOR_QOS)
        # Reliable like a robot's joint_state_broadcaster (and fake_robot_node): policy_node subscribes
        # them reliable, and a best-effort publisher would never match it; best-effort readers
        # (the recorder) match either way.
        self.joint_pub = self.create_publisher(JointState, self.p.joint_states_topic, RELIABLE_QOS)
        self.ee_pub = self.create_publisher(PoseStamped, self.p.ee_pose_topic, RELIABLE_QOS)
        self.success_pub = self.create_publisher(Bool, "~/success", RELIABLE_QOS)
        self.reward_pub = self.create_publisher(Float32, "~/reward", RELIABLE_QOS)
        self.expert_pub = self.create_publisher(JointState, "~/expert_action", RELIABLE_QOS)
        self.status_pub = self.create_publisher(String, "~/status", LATCHED_QOS)
        self.instruction_pub = self.create_publisher(String, self.p.instruction_topic, LATCHED_QOS)
        # Commands only store the newest value (the mixer's fields are replaced whole), so they may
        # run while a tick renders: a reentrant group. With everything in the default exclusive
        # group, rclpy's MultiThreadedExecutor re-polls the blocked command callbacks while a tick
        # runs and starves it of the GIL: measured 3-7 ticks/s instead of 20 with a few subscribers.
        commands = ReentrantCallbackGroup()
        self.create_subscription(TwistStamped, self.p.twist_topic, self._on_twist, COMMAND_QOS,
                                 callback_group=commands)
        self.create_subscription(PoseStamped, self.p.pose_topic, self._on_pose, COMMAND_QOS,
                                 callback_group=commands)
        self.create_subscription(Float64, self.p.gripper_topic, self._on_gripper, COMMAND_QOS,
                                 callback_group=commands)
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=commands)  # under _env_lock
        self.pause_calls = 0
        if self.p.pause_service:
            self.create_service(SetBool, self.p.pause_service, self._on_pause, callback_group=commands)

        self._reset()
        self.timer = self.create_timer(self.dt, self._on_tick, callback_group=MutuallyExclusiveCallbackGroup())
        # back-to-back episodes (the operator's part in simulation)
        self.auto_starts = {"requested": 0, "started": 0, "refused": 0}
        self._auto_due: float | None = time.monotonic() if self.p.auto_episodes else None
        self._auto_future = None
        self._start_client = self.create_client(Trigger, self.p.episode_start_service)
        self.create_subscription(String, self.p.episode_saved_topic, self._on_episode_saved, RELIABLE_QOS,
                                 callback_group=commands)
        bind_live_params(self, {k: self.PARAMS[k] for k in ("auto_episodes", "auto_episode_pause_s")}, self.p,
                         apply=self._on_auto_param)
        self.get_logger().info(
            f"{self.p.task} ('{self.env.instruction}') at {self.p.rate_hz:g} Hz, {self.p.image_size}px "
            f"'{self.p.camera}' camera; 1 action unit = {scale * 1000:.1f} mm/step, command timeout "
            f"{self.p.command_timeout_s:g} s"
        )

    # helpers --------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _stamp_of(self, header) -> float | None:
        if header.frame_id and header.frame_id != self.p.frame_id:
            self.rejected_frames += 1
            self.get_logger().warning(
                f"command in frame '{header.frame_id}' ignored: the sim only accepts '{self.p.frame_id}'",
                throttle_duration_sec=2.0)
            return None
        t = header.stamp.sec + header.stamp.nanosec * 1e-9
        if t == 0.0:
            if not self._warned_stamp:
                self.get_logger().warning("command with a zero stamp: using its arrival time "
                                          "(MoveIt Servo would treat it as stale)")
                self._warned_stamp = True
            t = self._now()
        return t

    def _reset(self) -> int:
        seed = self.next_seed
        obs = self.env.reset(seed=seed)
        self.next_seed += 1
        self.episode += 1
        self.success = False
        self.last_reward = 0.0
        self.mixer.reset(self.p.gripper_on_reset)
        if self.get_parameter("publish_instruction").value:
            self.instruction_pub.publish(String(data=self.env.instruction))
        self._publish_observation(self.get_clock().now(), obs.image, publish_outcome=False)
        self._publish_status()
        return seed

    def _publish_observation(self, now, img: np.ndarray, *, publish_outcome: bool = True) -> None:
        stamp = now.to_msg()
        if publish_outcome:  # before the image: the reward reaches reward_node before the next action
            self.reward_pub.publish(Float32(data=float(self.last_reward)))
            self.success_pub.publish(Bool(data=bool(self.success)))
        js = JointState()
        js.header.stamp = stamp
        js.name = list(self.env.joint_names)
        js.position = [float(x) for x in self.env.joint_positions()]  # == obs.state
        self.joint_pub.publish(js)
        pose = PoseStamped()
        pose.header.stamp = stamp
        pose.header.frame_id = self.p.frame_id
        x, y, z = (float(v) for v in self.env.ee_position())
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = x, y, z
        pose.pose.orientation.w = 1.0
        self.ee_pub.publish(pose)
        if self.p.publish_expert and self.env.has_expert:
            ex = JointState()
            ex.header.stamp = stamp
            ex.name = list(self.spec.names)
            ex.position = [float(v) for v in self.env.expert_action()]
            self.expert_pub.publish(ex)
        msg = Image()
        msg.header.stamp = stamp
        msg.header.frame_id = self.p.camera_frame_id
        msg.height, msg.width = int(img.shape[0]), int(img.shape[1])
        msg.encoding = "rgb8"
        msg.is_bigendian = 0
        msg.step = msg.width * 3
        msg.data = img.tobytes()
        self.image_pub.publish(msg)

    def status(self) -> dict:
        ticks = self._tick_times
        rate = (len(ticks) - 1) / (ticks[-1] - ticks[0]) if len(ticks) > 1 and ticks[-1] > ticks[0] else 0.0
        return dict(task=self.p.task, instruction=self.env.instruction, episode=self.episode,
                    seed=self.env.seed, steps=self.env.steps, success=self.success,
                    reward=round(self.last_reward, 4), measured_rate_hz=round(rate, 2),
                    stale_steps=self.mixer.stale_steps, rejected_frames=self.rejected_frames,
                    paused=self.mixer.paused, paused_steps=self.mixer.paused_steps,
                    ticks=self.ticks, auto_episodes=dict(getattr(self, "auto_starts", {})))

    def _publish_status(self) -> None:
        self.status_pub.publish(String(data=json.dumps(self.status())))

    # callbacks --------------------------------------------------------------------------
    def _on_twist(self, msg: TwistStamped) -> None:
        t = self._stamp_of(msg.header)
        if t is not None:
            v = msg.twist.linear
            self.mixer.set_twist((v.x, v.y, v.z), t)

    def _on_pose(self, msg: PoseStamped) -> None:
        t = self._stamp_of(msg.header)
        if t is not None:
            q = msg.pose.position
            self.mixer.set_pose((q.x, q.y, q.z), t)

    def _on_gripper(self, msg: Float64) -> None:
        self.mixer.set_gripper(msg.data)

    def _on_pause(self, req, resp):
        self.mixer.paused = bool(req.data)
        self.pause_calls += 1
        resp.success = True
        resp.message = "Servoing disabled" if req.data else "Servoing enabled"  # Servo's own answers
        return resp

    def _on_tick(self) -> None:
        if self._closing:
            return
        now = self.get_clock().now()
        with self._env_lock:
            if self._closing:
                return
            action = self.mixer.action(now.nanoseconds * 1e-9, self.env.ee_position())
            obs, reward, _, _, info = self.env.step(action)
            self.last_reward = float(reward)
            self.success = bool(info["success"])
            try:
                self._publish_observation(now, obs.image)
            except Exception:
                if self.context.ok():
                    raise
                return  # shutting down (Ctrl-C / SIGTERM) while this tick was running
        self.ticks += 1
        self._tick_times.append(time.monotonic())
        if len(self._tick_times) > 50:
            del self._tick_times[0]
        if self.env.steps % max(1, int(self.p.rate_hz)) == 0 or self.success:
            self._publish_status()
        self._on_auto()  # checked once per tick: no extra timer competing with the tick

    def _on_auto_param(self, changed: dict) -> None:
        if changed.get("auto_episodes") and self._auto_due is None and self._auto_future is None:
            self._auto_due = time.monotonic()
        elif changed.get("auto_episodes") is False:
            self._auto_due = None

    def _on_episode_saved(self, _msg: String) -> None:
        if self.p.auto_episodes:
            self._auto_due = time.monotonic() + self.p.auto_episode_pause_s

    def _on_auto(self) -> None:
        if self._auto_due is None or self._auto_future is not None or time.monotonic() < self._auto_due:
            return
        if not self._start_client.service_is_ready():
            self._auto_due = time.monotonic() + 1.0
            return
        self._auto_due = None
        self.auto_starts["requested"] += 1
        self._auto_future = self._start_client.call_async(Trigger.Request())
        self._auto_future.add_done_callback(self._on_auto_started)

    def _on_auto_started(self, future) -> None:
        self._auto_future = None
        try:
            ok, message = future.result().success, future.result().message
        except Exception as exc:  # noqa: BLE001 - reported and retried
            ok, message = False, str(exc)
        if ok:
            self.auto_starts["started"] += 1
        else:
            self.auto_starts["refused"] += 1
            self.get_logger().warning(f"auto episode: {self.p.episode_start_service} refused ({message}); "
                                      "retrying in 1 s", throttle_duration_sec=5.0)
            if self.p.auto_episodes:
                self._auto_due = time.monotonic() + 1.0

    def _on_reset(self, _req, resp):
        with self._env_lock:
            seed = self._reset()
        resp.success = True
        resp.message = f"episode {self.episode}: {self.p.task} seed {seed}"
        self.get_logger().info(resp.message)
        return resp

    def destroy_node(self):
        self._closing = True
        self.timer.cancel()
        with self._env_lock:  # a tick still running on an executor thread finishes first
            self.env.close()
        return super().destroy_node()


def main(args=None):
    return run_node(
        SimNode, args, params=SimNode.PARAMS, num_threads=1,  # the tick is the work; commands only cache
        description="Metaworld task behind robot interfaces (camera, joint states, Servo-style commands).",
    )


if __name__ == "__main__":
    raise SystemExit(main())
