"""Robot bring-up: policy, reward, recorder and trainer nodes next to the robot's own drivers.

    ros2 launch ire_vla_ros robot.launch.py camera_topic:=/wrist_cam/color/image_raw

Expects (see docs/ROBOT_SETUP.md): a camera (sensor_msgs/Image), /joint_states, the end-effector
pose on /ee_pose (geometry_msgs/PoseStamped), MoveIt Servo (`servo_node`) and a gripper taking
std_msgs/Float64 on /gripper/command. Topics that differ are remapped with the *_topic arguments.
For keyboard demonstrations use teleop.launch.py. Same nodes, YAML and overrides as
`ire-vla bringup robot`.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import (LaunchConfiguration, NotEqualsSubstitution, PathJoinSubstitution,
                                  PythonExpression)
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "ire_vla_ros"

# Equal to ire_vla_ros.nodes.bringup.MODE_OVERRIDES["robot"] (checked by test/test_launch_files.py).
OVERRIDES = {
    "teleop_node": {"mode": "keyboard", "action_spec": "ee_delta_7d"},
    "reward_node": {"backend": "human", "max_episode_steps": 0, "max_episode_duration_s": 60.0},
    "recorder_node": {"start_services": ["/reward_node/start_episode"]},
}


def generate_launch_description():
    record = LaunchConfiguration("record")
    episodes_dir = LaunchConfiguration("episodes_dir")
    action_topic = PythonExpression(
        ["'/teleop_node/action' if '", record, "' == 'teleop' else '/policy_node/action'"])
    # the robot's drivers may use other names: remapped for the nodes that read them
    sensor_remaps = [
        ("/camera/image_raw", LaunchConfiguration("camera_topic")),
        ("/joint_states", LaunchConfiguration("joint_states_topic")),
        ("/ee_pose", LaunchConfiguration("ee_pose_topic")),
    ]

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
        DeclareLaunchArgument("checkpoint", default_value="models/metaworld_tiny",
                              description="policy checkpoint dir or root with `latest` (default: "
                                          "config/policy_node.yaml's); point it at checkpoints_dir so "
                                          "~/reload picks up what the trainer writes"),
        DeclareLaunchArgument("episodes_dir", default_value="episodes", description="episode store"),
        DeclareLaunchArgument("checkpoints_dir", default_value="checkpoints", description="trainer output root"),
        DeclareLaunchArgument("device", default_value="auto", description="policy device: auto | cpu | cuda"),
        DeclareLaunchArgument("command_frame", default_value="base_link",
                              description="frame of Servo commands and of /ee_pose"),
        DeclareLaunchArgument("motion_backend", default_value="servo_twist",
                              description="servo_twist | servo_pose | moveit_py (docs/ROBOT_SETUP.md section 3)"),
        DeclareLaunchArgument("moveit_config_package", default_value="",
                              description="moveit_py: the robot's MoveIt config package"),
        DeclareLaunchArgument("servo_command_timeout_s", default_value="0.25",
                              description="Servo's incoming_command_timeout as launched (start-up check only)"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/image_raw"),
        DeclareLaunchArgument("joint_states_topic", default_value="/joint_states"),
        DeclareLaunchArgument("ee_pose_topic", default_value="/ee_pose"),
        DeclareLaunchArgument("record", default_value="policy", choices=["teleop", "policy", "rl"],
                              description="source tag of recorded episodes"),
        Node(package=PACKAGE, executable="policy_node", name="policy_node", output="screen",
             parameters=[config("policy_node.yaml"),
                         {"checkpoint": LaunchConfiguration("checkpoint"),
                          "device": LaunchConfiguration("device"),
                          "command_frame": LaunchConfiguration("command_frame"),
                          "motion_backend": LaunchConfiguration("motion_backend"),
                          # value_type=str: an empty value must stay '' (yaml rules would make it null)
                          "moveit_config_package": ParameterValue(LaunchConfiguration("moveit_config_package"),
                                                                  value_type=str),
                          "servo_command_timeout_s": ParameterValue(
                              LaunchConfiguration("servo_command_timeout_s"), value_type=float)}],
             remappings=sensor_remaps),
        Node(package=PACKAGE, executable="reward_node", name="reward_node", output="screen",
             parameters=[config("reward_node.yaml"), OVERRIDES["reward_node"], {"action_topic": action_topic}]),
        Node(package=PACKAGE, executable="recorder_node", name="recorder_node", output="screen",
             parameters=[config("recorder_node.yaml"), OVERRIDES["recorder_node"],
                         {"source": record, "action_topic": action_topic, "episodes_dir": episodes_dir}],
             remappings=sensor_remaps),
        Node(package=PACKAGE, executable="trainer_node", name="trainer_node", output="screen",
             parameters=[config("trainer_node.yaml"),
                         {"episodes_dir": episodes_dir,
                          "checkpoints_dir": LaunchConfiguration("checkpoints_dir")}]),
    ])
