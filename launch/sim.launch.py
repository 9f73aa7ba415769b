"""Simulation bring-up: Metaworld sim_node in place of the robot, plus the iRe-VLA nodes.

    ros2 launch ire_vla_ros sim.launch.py                       # the policy drives, policy episodes
    ros2 launch ire_vla_ros sim.launch.py teleop:=true record:=teleop   # scripted expert demos

Same nodes, YAML and overrides as `ire-vla bringup sim` (one process). Export
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a ROS_DOMAIN_ID of your own before launching.
Episodes: `ros2 service call /recorder_node/start_episode std_srvs/srv/Trigger` (resets the sim and
reward_node), `/policy_node/enable` (SetBool) to let the policy act, `/trainer_node/run_iteration`
to train; the policy reloads the new checkpoint when checkpoint == checkpoints_dir.

Online RL (issue 7; checkpoint:=<root> checkpoints_dir:=<same root>, teleop demos recorded first):
  ros2 service call /trainer_node/start_online_rl std_srvs/srv/Trigger      # learner child + exploring
  ros2 service call /policy_node/enable std_srvs/srv/SetBool "{data: true}"
  ros2 param set /sim_node auto_episodes true                              # episodes back to back
  ros2 topic echo /trainer_node/status                                     # online.success_rate_last_20
  ros2 service call /trainer_node/stop_online_rl std_srvs/srv/Trigger       # -> Stage 2 -> reload
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import (LaunchConfiguration, NotEqualsSubstitution, PathJoinSubstitution,
                                  PythonExpression)
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "ire_vla_ros"

# Equal to ire_vla_ros.nodes.bringup.MODE_OVERRIDES["sim"] (checked by test/test_launch_files.py).
OVERRIDES = {
    "policy_node": {"command_frame": "world", "workspace_enabled": False, "servo_switch_service": "",
                    # the shipped sim model moves up to 2 cm per axis per step (action_repeat 2):
                    # a 2 cm norm clamp, right for an arm, would slow it below what it was trained on
                    "max_translation_m": 0.035},
    "teleop_node": {"mode": "scripted_expert", "action_spec": "metaworld_4d", "frame_id": "world"},
    "reward_node": {"backend": "sim"},
    "recorder_node": {"start_services": ["/sim_node/reset", "/reward_node/start_episode"]},
}


def generate_launch_description():
    task = LaunchConfiguration("task")
    record = LaunchConfiguration("record")
    episodes_dir = LaunchConfiguration("episodes_dir")
    # recorder and reward node follow the teleop's actions when recording demos, else the policy's
    action_topic = PythonExpression(
        ["'/teleop_node/action' if '", record, "' == 'teleop' else '/policy_node/action'"])

    def config(name):
        return PathJoinSubstitution([FindPackageShare(PACKAGE), "config", name])

    return LaunchDescription([
        # Camera images (640x480 rgb8 is 921 KB) exceed Fast DDS's default 512 KB shared-memory
        # segment and fall back to fragmented UDP (measured: 5 Hz of 30 Hz delivered, best effort).
        # This profile gives SHM a 16 MB segment (30 Hz). Jazzy's Fast DDS 2.14 reads only the
        # FASTRTPS_ name; FASTDDS_ is the 3.x name. dds_profile:='' keeps the environment's own.
        DeclareLaunchArgument("dds_profile", default_value=config("fastdds_shm.xml"),
                              description="Fast DDS XML profile for every node ('' = leave unset)"),
        # Set only for a non-empty value: SetEnvironmentVariable would write '' and erase the
        # environment's own profile (launch/actions/set_environment_variable.py assigns the value as is).
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", LaunchConfiguration("dds_profile"),
                               condition=IfCondition(NotEqualsSubstitution(LaunchConfiguration("dds_profile"), ""))),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("dds_profile"),
                               condition=IfCondition(NotEqualsSubstitution(LaunchConfiguration("dds_profile"), ""))),
        DeclareLaunchArgument("task", default_value="button-press-topdown-v3", description="Metaworld v3 task"),
        DeclareLaunchArgument("checkpoint", default_value="models/metaworld_tiny",
                              description="policy checkpoint dir or root with `latest` (default: "
                                          "config/policy_node.yaml's); point it at checkpoints_dir so "
                                          "~/reload picks up what the trainer writes"),
        DeclareLaunchArgument("episodes_dir", default_value="episodes", description="episode store"),
        DeclareLaunchArgument("checkpoints_dir", default_value="checkpoints", description="trainer output root"),
        DeclareLaunchArgument("teleop", default_value="false", description="start the scripted-expert teleop"),
        DeclareLaunchArgument("policy", default_value="true", description="start the policy node"),
        DeclareLaunchArgument("record", default_value="policy", choices=["teleop", "policy", "rl"],
                              description="source tag of recorded episodes (teleop: record the expert)"),
        Node(package=PACKAGE, executable="sim_node", name="sim_node", output="screen",
             parameters=[config("sim_node.yaml"), {"task": task}]),
        Node(package=PACKAGE, executable="policy_node", name="policy_node", output="screen",
             condition=IfCondition(LaunchConfiguration("policy")),
             parameters=[config("policy_node.yaml"), OVERRIDES["policy_node"],
                         {"checkpoint": LaunchConfiguration("checkpoint")}]),
        Node(package=PACKAGE, executable="teleop_node", name="teleop_node", output="screen",
             condition=IfCondition(LaunchConfiguration("teleop")),
             parameters=[config("teleop_node.yaml"), OVERRIDES["teleop_node"]]),
        Node(package=PACKAGE, executable="reward_node", name="reward_node", output="screen",
             parameters=[config("reward_node.yaml"), OVERRIDES["reward_node"], {"action_topic": action_topic}]),
        Node(package=PACKAGE, executable="recorder_node", name="recorder_node", output="screen",
             parameters=[config("recorder_node.yaml"), OVERRIDES["recorder_node"],
                         {"source": record, "action_topic": action_topic, "task": task,
                          "episodes_dir": episodes_dir}]),
        Node(package=PACKAGE, executable="trainer_node", name="trainer_node", output="screen",
             parameters=[config("trainer_node.yaml"),
                         {"episodes_dir": episodes_dir,
                          "checkpoints_dir": LaunchConfiguration("checkpoints_dir")}]),
    ])
