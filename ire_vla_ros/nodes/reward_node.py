"""reward_node: per-step reward and the end of each episode (success / failure).

Backends (`backend` parameter):

* `sim`     - success and dense reward come from the simulator (`sim_success_topic`,
              `sim_reward_topic`, published by sim_node);
* `human`   - an operator ends the episode with `~/mark_success` (std_srvs/SetBool, data=success);
* `timeout` - only the limits below end an episode, always as a failure.

Every backend also ends the episode as a failure after `max_episode_steps` steps or
`max_episode_duration_s` seconds (0 disables a limit). A *step* is one message on `action_topic`
(the policy's or the teleoperator's action). Backend sim publishes `~/reward` once per
simulator step (when the simulator's reward arrives, i.e. before the policy's next action);
the others once per action.

Interface
  sub  <action_topic>        sensor_msgs/JointState   one message = one step
  sub  <sim_success_topic>   std_msgs/Bool            (backend sim)
  sub  <sim_reward_topic>    std_msgs/Float32         (backend sim, dense reward)
  pub  ~/reward              std_msgs/Float32         per step; sparse (1 on success, else 0) or dense
  pub  ~/episode_end         std_msgs/Bool            once per episode, data = success
  pub  ~/episode_active      std_msgs/Bool            latched; true between start and end
  srv  ~/start_episode       std_srvs/Trigger         reset the counters, start a new episode
  srv  ~/mark_success        std_srvs/SetBool         end the episode with that label (any backend)

The final reward of an episode is published *before* `~/episode_end`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from rclpy.node import Node
from std_msgs.msg import Bool, Float32
from std_srvs.srv import SetBool, Trigger
from sensor_msgs.msg import JointState

from ire_vla_ros.nodes.ros_common import LATCHED_QOS, RELIABLE_QOS, P, bind_live_params, declare_params, run_node

BACKENDS = ("sim", "human", "timeout")


# ---------------------------------------------------------------------------------------------
# Plain logic (no ROS)
# ---------------------------------------------------------------------------------------------
@dataclass
class EpisodeEnd:
    success: bool
    reason: str
    final_reward: float


class EpisodeJudge:
    """Decides per-step rewards and when an episode ends. Times are seconds (any monotonic clock).

    reward_mode "sparse": 0 per step, `success_reward` on the step that succeeds (the paper's
    binary reward). "dense": the newest simulator reward (backend sim only; others give 0).
    """

    def __init__(self, backend: str, *, max_steps: int = 0, max_duration_s: float = 0.0,
                 reward_mode: str = "sparse", success_reward: float = 1.0, min_steps: int = 1):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if reward_mode not in ("sparse", "dense"):
            raise ValueError(f"reward_mode must be 'sparse' or 'dense', got {reward_mode!r}")
        self.backend = backend
        self.max_steps = int(max_steps)
        self.max_duration_s = float(max_duration_s)
        self.reward_mode = reward_mode
        self.success_reward = float(success_reward)
        self.min_steps = max(0, int(min_steps))
        self.active = False
        self.steps = 0
        self.started_at = 0.0
        self.sim_reward = 0.0
        self.episodes = 0
        self.last_end: EpisodeEnd | None = None

    def start(self, now: float) -> None:
        self.active = True
        self.steps = 0
        self.started_at = now
        self.sim_reward = 0.0
        self.episodes += 1

    def _end(self, success: bool, reason: str) -> EpisodeEnd:
        self.active = False
        if self.reward_mode == "dense" and self.backend == "sim":
            final = self.sim_reward
        else:
            final = self.success_reward if success else 0.0
        self.last_end = EpisodeEnd(success=success, reason=reason, final_reward=float(final))
        return self.last_end

    def _step_reward(self) -> float:
        if self.reward_mode == "dense" and self.backend == "sim":
            return float(self.sim_reward)
        return 0.0

    def on_step(self, now: float) -> tuple[float | None, EpisodeEnd | None]:
        """An action arrived. Returns (reward to publish or None, episode end or None).

        Backend sim publishes its rewards per simulator step (`on_sim_reward`), the others one
        (zero) reward per action."""
        if not self.active:
            return None, None
        self.steps += 1
        if self.max_steps > 0 and self.steps >= self.max_steps:
            return None, self._end(False, f"step limit {self.max_steps} reached")
        timeout = self.check_timeout(now)
        if timeout is not None:
            return None, timeout
        return (None if self.backend == "sim" else 0.0), None

    def on_sim_reward(self, reward: float) -> float | None:
        """A simulator step's reward arrived; returns the reward to publish (None: no episode)."""
        self.sim_reward = float(reward)
        return self._step_reward() if self.active else None

    def on_sim_success(self, success: bool) -> EpisodeEnd | None:
        # Success messages before the episode's first steps can still be in flight from the
        # previous episode (before the simulator reset): ignored.
        if self.backend != "sim" or not self.active or not success or self.steps < self.min_steps:
            return None
        return self._end(True, "simulator reports success")

    def mark(self, success: bool) -> EpisodeEnd | None:
        if not self.active:
            return None
        return self._end(bool(success), "marked by operator")

    def check_timeout(self, now: float) -> EpisodeEnd | None:
        if self.active and self.max_duration_s > 0 and now - self.started_at >= self.max_duration_s:
            return self._end(False, f"duration limit {self.max_duration_s:.1f} s reached")
        return None


# ---------------------------------------------------------------------------------------------
# Node
# ---------------------------------------------------------------------------------------------
class RewardNode(Node):
    PARAMS = {
        "backend": P("sim", "Where success comes from: sim | human | timeout", read_only=True,
                     constraints="one of sim, human, timeout"),
        "reward_mode": P("sparse", "sparse: 1 on success else 0 (paper); dense: simulator reward",
                         constraints="sparse | dense",
                         validate=lambda v: None if v in ("sparse", "dense") else "must be sparse or dense"),
        "success_reward": P(1.0, "Reward of the successful step (sparse mode)"),
        "max_episode_steps": P(150, "End the episode as a failure after this many steps (0: no limit)", min=0),
        "max_episode_duration_s": P(0.0, "End the episode as a failure after this many seconds (0: no limit)",
                                    min=0.0),
        "min_steps_before_success": P(1, "Ignore simulator success before this many steps of the episode",
                                      min=0),
        "auto_start": P(False, "Start an episode at start-up (else wait for ~/start_episode)", read_only=True),
        "action_topic": P("/policy_node/action", "Actions (one message = one step); can be changed while "
                          "no episode is active"),
        "sim_success_topic": P("/sim_node/success", "Simulator success flag (backend sim)", read_only=True),
        "sim_reward_topic": P("/sim_node/reward", "Simulator dense reward (backend sim)", read_only=True),
        "check_period_s": P(0.1, "How often the duration limit is checked", min=0.01, max=10.0,
                            read_only=True),
    }

    def __init__(self, **kwargs):
        super().__init__("reward_node", **kwargs)
        self.p = declare_params(self, self.PARAMS)
        self.judge = EpisodeJudge(
            self.p.backend, max_steps=self.p.max_episode_steps, max_duration_s=self.p.max_episode_duration_s,
            reward_mode=self.p.reward_mode, success_reward=self.p.success_reward,
            min_steps=self.p.min_steps_before_success,
        )
        self.reward_pub = self.create_publisher(Float32, "~/reward", RELIABLE_QOS)
        self.end_pub = self.create_publisher(Bool, "~/episode_end", RELIABLE_QOS)
        self.active_pub = self.create_publisher(Bool, "~/episode_active", LATCHED_QOS)
        self._action_sub = self.create_subscription(JointState, self.p.action_topic, self._on_action, RELIABLE_QOS)
        if self.p.backend == "sim":
            self.create_subscription(Bool, self.p.sim_success_topic, self._on_sim_success, RELIABLE_QOS)
            self.create_subscription(Float32, self.p.sim_reward_topic, self._on_sim_reward, RELIABLE_QOS)
        self.create_service(Trigger, "~/start_episode", self._on_start)
        self.create_service(SetBool, "~/mark_success", self._on_mark)
        self.create_timer(self.p.check_period_s, self._on_check)
        bind_live_params(self, self.PARAMS, self.p, check=self._check_params, apply=self._apply_params)
        self._publish_active()
        if self.p.auto_start:
            self._start()
        self.get_logger().info(
            f"backend={self.p.backend} reward={self.p.reward_mode} steps<={self.p.max_episode_steps or 'inf'} "
            f"duration<={self.p.max_episode_duration_s or 'inf'} s, actions from {self.p.action_topic}"
        )

    def _check_params(self, values: dict) -> str | None:
        if values["action_topic"] != self.p.action_topic and self.judge.active:
            return "an episode is active: end it before switching action_topic"
        return None

    def _apply_params(self, changed: dict) -> None:
        """Limits and rewards apply from the next step on."""
        judge = self.judge
        for name, attr, cast in (("max_episode_steps", "max_steps", int), ("max_episode_duration_s",
                                 "max_duration_s", float), ("success_reward", "success_reward", float),
                                 ("min_steps_before_success", "min_steps", int), ("reward_mode", "reward_mode", str)):
            if name in changed:
                setattr(judge, attr, cast(changed[name]))
        topic = changed.get("action_topic")
        if topic and topic != self._action_sub.topic_name:
            self.destroy_subscription(self._action_sub)
            self._action_sub = self.create_subscription(JointState, topic, self._on_action, RELIABLE_QOS)
        self.get_logger().info(f"parameters set: {changed}")

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _start(self) -> None:
        self.judge.start(self._now())
        self._publish_active()
        self.get_logger().info(f"episode {self.judge.episodes} started")

    def _publish_active(self) -> None:
        self.active_pub.publish(Bool(data=self.judge.active))

    def _finish(self, end) -> None:
        self.reward_pub.publish(Float32(data=float(end.final_reward)))
        self.end_pub.publish(Bool(data=bool(end.success)))
        self._publish_active()
        self.get_logger().info(
            f"episode {self.judge.episodes} ended after {self.judge.steps} steps: "
            f"{'SUCCESS' if end.success else 'failure'} ({end.reason})"
        )

    # callbacks ---------------------------------------------------------------------------
    def _on_action(self, _msg: JointState) -> None:
        reward, end = self.judge.on_step(self._now())
        if end is not None:
            self._finish(end)
        elif reward is not None:
            self.reward_pub.publish(Float32(data=float(reward)))

    def _on_sim_reward(self, msg: Float32) -> None:
        reward = self.judge.on_sim_reward(msg.data)
        if reward is not None:
            self.reward_pub.publish(Float32(data=float(reward)))

    def _on_sim_success(self, msg: Bool) -> None:
        end = self.judge.on_sim_success(msg.data)
        if end is not None:
            self._finish(end)

    def _on_check(self) -> None:
        end = self.judge.check_timeout(self._now())
        if end is not None:
            self._finish(end)

    def _on_start(self, _req, resp):
        was_active = self.judge.active
        self._start()
        resp.success = True
        resp.message = f"episode {self.judge.episodes} started" + (" (previous one abandoned)" if was_active else "")
        return resp

    def _on_mark(self, req, resp):
        end = self.judge.mark(req.data)
        if end is None:
            resp.success = False
            resp.message = "no episode is active"
            return resp
        self._finish(end)
        resp.success = True
        resp.message = f"episode {self.judge.episodes} ended: {'success' if end.success else 'failure'}"
        return resp


def main(args=None):
    return run_node(
        RewardNode, args, params=RewardNode.PARAMS,
        description="Per-step reward and episode end (success/failure) from the simulator, an operator or a timeout.",
    )


if __name__ == "__main__":
    raise SystemExit(main())
