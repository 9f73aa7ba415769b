"""trainer_node: runs the next iRe-VLA stage(s) in a separate process and hot-reloads the policy.

`~/run_iteration` (std_srvs/Trigger) starts `command` (default
`python -m ire_vla_ros.cli train offline --episodes DIR --checkpoints DIR --config YAML --device DEV
--no-progress` + `extra_args`)
as a child process and returns at once. The node stays responsive while it runs:

* every `PROGRESS {"stage": ..., "fraction": ..., "message": ...}` line of the child's stdout
  updates `~/status` (std_msgs/String, JSON, latched);
* the line `CHECKPOINT <path>` names the new checkpoint;
* exit code 0 = success; then `/policy_node/reload` (std_srvs/Trigger, `reload_service`) is called
  asynchronously, so the running policy picks up the new checkpoint without a restart.

A `~/run_iteration` while a run is in progress, while the policy's reload of the previous
checkpoint is still pending, or sooner than `min_run_interval_s` after the last start is refused at
once (success=false, with the reason) and counted on `~/status`.
`~/cancel` (std_srvs/Trigger) stops a run (SIGTERM to its process group, SIGKILL after
`cancel_timeout_s`). The child's full output is written to `log_dir/train_<time>.log`.

Security: everything that names a program, an argument list, a working directory, a config file or
an output root (`command`, `extra_args`, `working_dir`, `config`, `episodes_dir`,
`checkpoints_dir`, `log_dir`) and the service it calls (`reload_service`) is read-only: set by the
launch file or `--ros-args`, never by `SetParameters` from another participant on the DDS domain
(which would otherwise be remote code execution through two standard calls). `device` stays
writable but must name a torch device. The checkpoint the child reports must lie inside
`checkpoints_dir` (`paths.confine`), else no reload is asked for.

Status JSON keys: state (idle | running | succeeded | failed | cancelled), run, stage, fraction,
message, checkpoint, returncode, elapsed_s, log_path, output_tail, reload (""/pending/ok/failed/
skipped/refused), reload_message, command, calls {run_iteration, cancel}, refused {busy,
reload_pending, too_soon, start_failed, online_rl}, online {...}.

Online RL (issue 7): `~/start_online_rl` / `~/stop_online_rl` run the SACfD learner as a child
process fed by the recorder's `~/episode_saved`; new heads go out on the latched `~/head_snapshot`;
stop -> the `~/run_iteration` path above. Each refuses while the other kind of run is in progress.
See nodes/online_rl.py (parameters `online_*`).
"""
from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ire_vla_ros.nodes import online_rl
from ire_vla_ros.nodes.ros_common import LATCHED_QOS, P, bind_live_params, declare_params, run_node
from ire_vla_ros.paths import PathOutsideRoot, confine

DEFAULT_COMMAND = [
    "{python}", "-m", "ire_vla_ros.cli", "train", "offline",
    "--episodes", "{episodes}", "--checkpoints", "{checkpoints}",
    "--config", "{config}", "--device", "{device}", "--no-progress", "--tensorboard", "{tensorboard}",
    "--sft-processes", "{sft_processes}", "--sft-launcher-args", "{sft_launcher_args}",
]

#: Resource limits (also listed in `--help`): a child or a caller cannot grow the node's memory or
#: its status messages without bound.
MAX_LINE_CHARS = 4096      # one line of the child's output is read at most this long (rest: next line)
MAX_FIELD_CHARS = 512      # stage, message, checkpoint and each output_tail line on ~/status
TAIL_LINES = 20            # last output lines kept (5 on ~/status)
LIMITS_HELP = (
    f"Limits: one run at a time; a trigger while a run or the policy reload is pending, or sooner than "
    f"min_run_interval_s after the last start, is refused at once and counted (~/status 'refused'); "
    f"child output lines are read up to {MAX_LINE_CHARS} characters, status fields cut to "
    f"{MAX_FIELD_CHARS}, {TAIL_LINES} output lines kept. Read-only (launch time only): command, "
    f"extra_args, working_dir, config, episodes_dir, checkpoints_dir, log_dir, reload_service, "
    f"online_checkpoint, online_episode_topic, online_explore_service, online_learner_args. Online RL: "
    f"refused while an offline run is in progress (and vice versa); episode paths queued for the learner "
    f"at most {online_rl.MAX_PENDING_PATHS} (more: dropped and counted, the files stay for the offline run)."
)
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,2})?)$")


def check_device(value: str) -> str | None:
    return None if _DEVICE_RE.match(value) else "must be auto, cpu, mps, cuda or cuda:N"


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` cut to `limit` characters (marked), so a status message stays bounded."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Plain logic (no ROS)
# ---------------------------------------------------------------------------------------------
def parse_line(line: str):
    """One stdout line -> ("progress", dict) | ("checkpoint", path) | ("log", line)."""
    text = line.rstrip("\r\n")
    if text.startswith("PROGRESS "):
        try:
            data = json.loads(text[len("PROGRESS "):])
            if isinstance(data, dict):
                return "progress", data
        except json.JSONDecodeError:
            pass
    elif text.startswith("CHECKPOINT "):
        path = text[len("CHECKPOINT "):].strip()
        if path:
            return "checkpoint", path
    return "log", text


def build_command(template: list[str], values: dict[str, str]) -> list[str]:
    """Replace the `{name}` placeholders of `values` (other braces are left alone); an
    `--option {x}` pair whose placeholder is empty is left out."""
    out: list[str] = []
    for arg in template:
        filled = arg
        for name, value in values.items():
            filled = filled.replace("{" + name + "}", str(value))
        if filled == "" and arg != "" and out and out[-1].startswith("--"):
            out.pop()
            continue
        out.append(filled)
    return out


class TrainingJob:
    """One child process; a reader thread parses its output. Thread-safe `snapshot()`."""

    def __init__(self, command: list[str], *, log_path: Path | None = None, env: dict | None = None,
                 cwd: str | None = None, tail_lines: int = TAIL_LINES):
        self.command = list(command)
        self.log_path = log_path
        self.started = time.monotonic()
        self.finished: float | None = None
        self.stage = ""
        self.fraction = 0.0
        self.message = "starting"
        self.checkpoint = ""
        self.returncode: int | None = None
        self.cancelled = False
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._lock = threading.Lock()
        self._version = 0
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, env=env, cwd=cwd, start_new_session=True,  # own process group
        )
        self._thread = threading.Thread(target=self._read, name="trainer-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        log = None
        try:
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(self.log_path, "w", encoding="utf-8")
                log.write("$ " + shlex.join(self.command) + "\n")
            # readline(limit): a child printing one endless line cannot exhaust the node's memory
            for line in iter(lambda: self.proc.stdout.readline(MAX_LINE_CHARS), ""):
                if log is not None:
                    log.write(line)
                    log.flush()
                kind, value = parse_line(line)
                with self._lock:
                    if kind == "progress":
                        self.stage = clip(str(value.get("stage", self.stage)))
                        try:
                            self.fraction = float(value.get("fraction", self.fraction))
                        except (TypeError, ValueError):
                            pass
                        self.message = clip(str(value.get("message", "")))
                    elif kind == "checkpoint":
                        self.checkpoint = value if len(value) <= MAX_FIELD_CHARS else ""
                    elif value.strip():
                        self.tail.append(clip(value))
                    self._version += 1
        finally:
            rc = self.proc.wait()
            if log is not None:
                log.write(f"# exit code {rc}\n")
                log.close()
            with self._lock:
                self.returncode = rc
                self.finished = time.monotonic()
                self._version += 1

    @property
    def done(self) -> bool:
        return self.returncode is not None

    @property
    def version(self) -> int:
        return self._version

    def state(self) -> str:
        if not self.done:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "succeeded" if self.returncode == 0 else "failed"

    def snapshot(self) -> dict:
        with self._lock:
            end = self.finished if self.finished is not None else time.monotonic()
            return dict(
                state=self.state(), stage=self.stage, fraction=round(self.fraction, 4), message=self.message,
                checkpoint=self.checkpoint, returncode=self.returncode, elapsed_s=round(end - self.started, 2),
                log_path=str(self.log_path or ""), output_tail=list(self.tail)[-5:],
            )

    def request_cancel(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to the process group now; `enforce_cancel()` sends SIGKILL after timeout_s."""
        if self.done:
            return
        self.cancelled = True
        self._kill_at = time.monotonic() + timeout_s
        self._signal(signal.SIGTERM)

    def enforce_cancel(self) -> None:
        if self.cancelled and not self.done and time.monotonic() >= getattr(self, "_kill_at", 0.0):
            self._signal(signal.SIGKILL)

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def cancel(self, timeout_s: float = 10.0) -> None:
        """Blocking stop (for shutdown): SIGTERM, SIGKILL after timeout_s."""
        if self.done:
            return
        self.request_cancel(timeout_s)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(5.0)
        self._thread.join(5.0)


# ---------------------------------------------------------------------------------------------
# Node
# ---------------------------------------------------------------------------------------------
class TrainerNode(Node):
    PARAMS = {
        "episodes_dir": P("episodes", "Episode store the training reads", read_only=True),
        "checkpoints_dir": P("checkpoints", "Checkpoint root (new checkpoints, `latest`)", read_only=True),
        "config": P("", "Training config YAML passed as --config (empty: left out)", read_only=True),
        "device": P("cpu", "Torch device for the next run (auto, cpu, cuda, cuda:N, mps)",
                    validate=check_device),
        "command": P(DEFAULT_COMMAND, "Command run by ~/run_iteration; placeholders {python} {episodes} "
                     "{checkpoints} {config} {device} {tensorboard} {sft_processes} {sft_launcher_args}",
                     type=Parameter.Type.STRING_ARRAY, read_only=True),
        "extra_args": P([], "Arguments appended to the command (e.g. [--set, sft.steps=500])",
                         type=Parameter.Type.STRING_ARRAY, read_only=True),
        "working_dir": P("", "Working directory of the command (empty: the node's)", read_only=True),
        "log_dir": P("", "Where the child's output is logged (empty: <checkpoints_dir>/logs)", read_only=True),
        "sft_processes": P(1, "Stage 0/2 SFT processes (torchrun, DDP; one per GPU). 1 = in the training process",
                           min=1, max=1024, read_only=True),
        "sft_launcher_args": P("", "Extra torchrun arguments for multi-node SFT, e.g. '--nnodes 2 --rdzv-backend "
                               "c10d --rdzv-endpoint HOST:29400' (run the same on every node)", read_only=True),
        "reload_service": P("/policy_node/reload", "std_srvs/Trigger called after a successful run "
                            "(empty: no reload)", read_only=True),
        "reload_wait_s": P(30.0, "How long to wait for the reload service to appear, then for its answer",
                           min=0.0, max=3600.0),
        "cancel_timeout_s": P(10.0, "SIGTERM -> SIGKILL grace for ~/cancel and shutdown", min=0.1, max=600.0),
        "min_run_interval_s": P(1.0, "A ~/run_iteration sooner than this after the last start is refused",
                                min=0.0, max=3600.0),
        "status_period_s": P(0.2, "How often the child's progress is checked", min=0.02, max=10.0,
                             read_only=True),
        **online_rl.TRAINER_PARAMS,
    }

    def __init__(self, **kwargs):
        super().__init__("trainer_node", **kwargs)
        self.p = declare_params(self, self.PARAMS)
        # device, reload_wait_s, cancel_timeout_s, min_run_interval_s are read when used: a set
        # takes effect at the next run / wait; validation refuses a bad device with the reason
        # (writable ones only: bind_live_params reads every listed parameter, and `extra_args`
        # declared by type only has no value to read)
        bind_live_params(self, {k: v for k, v in self.PARAMS.items() if not v.read_only}, self.p)
        self.job: TrainingJob | None = None
        self._last_start = -float("inf")
        self.calls = {"run_iteration": 0, "cancel": 0}
        self.refused = {"busy": 0, "reload_pending": 0, "too_soon": 0, "start_failed": 0, "online_rl": 0}
        self.run = 0
        self._published_version = (-1, 0)
        self._final_handled = True
        self._reload = {"reload": "", "reload_message": ""}
        self._reload_deadline: float | None = None
        self._reload_client = None
        self._reload_future = None
        self._lock = threading.Lock()
        self.status_pub = self.create_publisher(String, "~/status", LATCHED_QOS)
        self.create_service(Trigger, "~/run_iteration", self._on_run)
        self.create_service(Trigger, "~/cancel", self._on_cancel)
        self.online = online_rl.OnlineRLHooks(self, self.p, offline_busy=self._offline_busy,
                                              start_iteration=self._start_iteration, publish_status=self._publish)
        self.create_timer(self.p.status_period_s, self._on_tick)
        self._publish()
        self.get_logger().info("ready: call ~/run_iteration to train on "
                               f"{self._param('episodes_dir')} -> {self._param('checkpoints_dir')}")

    def _param(self, name):
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:  # an array declared by type only, never set
            return None

    # status --------------------------------------------------------------------------------
    def status(self) -> dict:
        base = dict(state="idle", stage="", fraction=0.0, message="", checkpoint="", returncode=None,
                    elapsed_s=0.0, log_path="", output_tail=[])
        if self.job is not None:
            base.update(self.job.snapshot())
            base["command"] = self.job.command
        base["run"] = self.run
        base.update(self._reload)
        base["calls"] = dict(self.calls)
        base["refused"] = dict(self.refused)
        base["online"] = self.online.status()
        return base

    def _publish(self) -> None:
        self.status_pub.publish(String(data=json.dumps(self.status())))

    # services ------------------------------------------------------------------------------
    def _refuse(self, resp, counter: str, message: str):
        """Answer a refused call at once; counted, logged at most once a second (a flood of calls
        costs a counter increment each, not a log line each)."""
        self.refused[counter] += 1
        resp.success, resp.message = False, message
        self.get_logger().warning(f"{message} ({self.refused[counter]} refused so far)",
                                  throttle_duration_sec=1.0)
        return resp

    def _offline_busy(self) -> str | None:
        """Why online RL must not start now (an offline run or its policy reload in progress), or None."""
        if self.job is not None and not self.job.done:
            return f"offline run {self.run} is in progress"
        if self.job is not None and (not self._final_handled or self._reload["reload"] == "pending"):
            return f"the policy reload of run {self.run}'s checkpoint is pending"
        return None

    def _start_iteration(self) -> tuple[bool, str]:
        """~/run_iteration from inside the node (online RL stopped -> Stage 2 -> reload)."""
        resp = self._on_run(Trigger.Request(), Trigger.Response())
        return resp.success, resp.message

    def _on_run(self, _req, resp):
        with self._lock:
            self.calls["run_iteration"] += 1
            online_busy = self.online.busy_reason()
            if online_busy:
                return self._refuse(resp, "online_rl", online_busy)
            if self.job is not None and not self.job.done:
                s = self.job.snapshot()
                return self._refuse(resp, "busy", (
                    f"refused: run {self.run} is still in progress (stage '{s['stage']}', "
                    f"{100 * s['fraction']:.0f}%, {s['elapsed_s']:.0f} s); ~/cancel stops it"))
            if self.job is not None and (not self._final_handled or self._reload["reload"] == "pending"):
                # the policy has not yet loaded run N's checkpoint: a new run would race that load
                return self._refuse(resp, "reload_pending", (
                    f"refused: the policy reload of run {self.run}'s checkpoint is still pending "
                    f"({self._reload['reload_message']}); retry when ~/status shows reload ok/failed"))
            wait = self._last_start + self._param("min_run_interval_s") - time.monotonic()
            if wait > 0:
                return self._refuse(resp, "too_soon", f"refused: too soon after the last start, retry in {wait:.1f} s")
            # absolute, as this node reads them: the command runs in `working_dir`
            ckpt = Path(self._param("checkpoints_dir")).absolute()
            log_dir = Path(self._param("log_dir") or ckpt / "logs").absolute()
            # every run writes its TensorBoard run under <log_dir>/tb: `tensorboard --logdir <log_dir>/tb`
            values = dict(python=sys.executable, episodes=str(Path(self._param("episodes_dir")).absolute()),
                          checkpoints=str(ckpt), config=str(self._param("config")),
                          device=str(self._param("device")), tensorboard=str(log_dir / "tb"),
                          sft_processes=str(self._param("sft_processes")),
                          sft_launcher_args=str(self._param("sft_launcher_args")))
            try:
                command = build_command(list(self._param("command")), values) + list(self._param("extra_args") or [])
            except (TypeError, ValueError) as exc:
                resp.success, resp.message = False, f"bad command parameter: {exc}"
                return resp
            stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
            try:
                self.job = TrainingJob(command, log_path=log_dir / f"train_{stamp}_{self.run + 1}.log",
                                       cwd=self._param("working_dir") or None)
            except OSError as exc:
                return self._refuse(resp, "start_failed", clip(f"cannot start {command[0]!r}: {exc}"))
            self._last_start = time.monotonic()
            self.run += 1
            self._final_handled = False
            self._reload = {"reload": "", "reload_message": ""}
        resp.success = True
        resp.message = f"run {self.run} started (pid {self.job.proc.pid}); progress on ~/status"
        self.get_logger().info(f"{resp.message}: {shlex.join(command)}")
        self._publish()
        return resp

    def _on_cancel(self, _req, resp):
        self.calls["cancel"] += 1
        job = self.job
        if job is None or job.done:
            resp.success, resp.message = False, "nothing is running"
            return resp
        # SIGTERM lets the CLI stop cleanly; the timer sends SIGKILL after cancel_timeout_s
        job.request_cancel(self._param("cancel_timeout_s"))
        resp.success, resp.message = True, f"run {self.run}: cancelling (SIGTERM sent)"
        self.get_logger().warning(resp.message)
        return resp

    # periodic ------------------------------------------------------------------------------
    def _on_tick(self) -> None:
        job = self.job
        if job is not None:
            job.enforce_cancel()
        self.online.tick()
        # refused calls show on ~/status at most once per tick, not once per call
        version = (job.version if job is not None else -1, sum(self.calls.values()), self.online.version)
        if version != self._published_version:
            self._published_version = version
            self._publish()
        if job is not None and job.done and not self._final_handled:
            self._final_handled = True
            self._finished(job)
        if self._reload_deadline is not None:
            self._try_reload()

    def _finished(self, job: TrainingJob) -> None:
        s = job.snapshot()
        if s["state"] == "succeeded":
            self.get_logger().info(f"run {self.run} succeeded in {s['elapsed_s']:.1f} s: "
                                   f"checkpoint {s['checkpoint'] or '(none reported)'}")
            service = self._param("reload_service")
            refusal = self._checkpoint_refusal(s["checkpoint"])
            if refusal:
                self._reload = {"reload": "refused", "reload_message": refusal}
                self.get_logger().error(f"run {self.run}: {refusal}")
            elif service:
                self._reload = {"reload": "pending", "reload_message": f"waiting for {service}"}
                self._reload_deadline = time.monotonic() + self._param("reload_wait_s")
                if self._reload_client is None or self._reload_client.srv_name != service:
                    if self._reload_client is not None:
                        self.destroy_client(self._reload_client)
                    self._reload_client = self.create_client(Trigger, service)
                self._try_reload()
            else:
                self._reload = {"reload": "skipped", "reload_message": "reload_service is empty"}
        else:
            self.get_logger().error(
                f"run {self.run} {s['state']} (exit code {s['returncode']}) after {s['elapsed_s']:.1f} s; "
                f"log {s['log_path']}; last output: {' | '.join(s['output_tail'][-3:])}")
        self._publish()

    def _checkpoint_refusal(self, checkpoint: str) -> str | None:
        """Why the reported checkpoint must not be loaded (outside checkpoints_dir), or None."""
        if not checkpoint:
            return None
        path = Path(checkpoint)
        if not path.is_absolute():  # the child prints paths relative to its working directory
            path = Path(self._param("working_dir") or os.getcwd()) / path
        try:
            confine(self._param("checkpoints_dir"), path)
        except PathOutsideRoot as exc:
            return f"checkpoint not reloaded: {exc}"
        return None

    def _try_reload(self) -> None:
        client = self._reload_client
        if self._reload_future is not None:  # asked; waiting for the answer
            if time.monotonic() > self._reload_deadline:
                self._reload_deadline, self._reload_future = None, None
                self._reload_failed(f"{client.srv_name} did not answer within reload_wait_s")
        elif client.service_is_ready():
            self._reload_deadline = time.monotonic() + self._param("reload_wait_s")
            self._reload_future = client.call_async(Trigger.Request())
            self._reload_future.add_done_callback(self._on_reload_done)
        elif time.monotonic() > self._reload_deadline:
            self._reload_deadline = None
            self._reload_failed(f"{client.srv_name} not available: restart the policy to use the new checkpoint")

    def _reload_failed(self, message: str) -> None:
        self._reload = {"reload": "failed", "reload_message": message}
        self.get_logger().error(message)
        self._publish()

    def _on_reload_done(self, future) -> None:
        if future is not self._reload_future:  # answered after its deadline: already reported
            return
        self._reload_deadline, self._reload_future = None, None
        try:
            result = future.result()
            ok, msg = bool(result.success), result.message
        except Exception as exc:  # noqa: BLE001 - any service failure is reported, not raised
            ok, msg = False, str(exc)
        self._reload = {"reload": "ok" if ok else "failed", "reload_message": clip(msg)}
        (self.get_logger().info if ok else self.get_logger().error)(f"policy reload: {msg}")
        self._publish()

    def destroy_node(self):
        self.online.close()
        if self.job is not None and not self.job.done:
            self.get_logger().warning(f"shutting down: stopping training run {self.run}")
            self.job.cancel(self._param("cancel_timeout_s"))
        return super().destroy_node()


def main(args=None):
    return run_node(
        TrainerNode, args, params=TrainerNode.PARAMS,
        description="Run iRe-VLA training stages in a child process on request; reload the policy afterwards.\n\n"
                    + LIMITS_HELP,
    )


if __name__ == "__main__":
    raise SystemExit(main())
