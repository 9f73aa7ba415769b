"""Record keyboard demonstrations on the robot: recorder + reward node (operator labels episodes).

    ros2 launch ire_vla_ros teleop.launch.py
    # keyboard teleop needs a terminal; `ros2 launch` gives its processes none. In a second terminal:
    ros2 run ire_vla_ros teleop_node --ros-args --params-file $(ros2 pkg prefix ire_vla_ros)/share/ire_vla_ros/config/teleop_node.yaml
    # or let the launch open one: start_teleop:=true terminal_prefix:="xterm -e"

Per demo: `ros2 service call /recorder_node/start_episode std_srvs/srv/Trigger`, drive, then
`ros2 service call /reward_node/mark_success std_srvs/srv/SetBool "{data: true}"` (saves it labeled).
Same nodes and overrides as `ire-vla bringup robot --teleop --record teleop`.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "ire_vla_ros"

# Equal to bringup's MODE_OVERRIDES["robot"] merged with RECORD_SOURCES["teleop"]
# (checked by test/test_launch_files.py).
OVERRIDES = {
    "teleop_node": {"mode": "keyboard", "action_spec": "ee_delta_7d"},
    "reward_node": {"backend": "human", "max_episode_steps": 0, "max_episode_duration_s": 60.0,
                    "action_topic": "/teleop_node/action"},
    "recorder_node": {"start_services": ["/reward_node/start_episode"], "source": "teleop",
                      "action_topic": "/teleop_node/action"},
}


def generate_launch_description():
    sensor_remaps = [
        ("/camera/image_raw", LaunchConfiguration("camera_topic")),
        ("/joint_states", LaunchConfiguration("joint_states_topic")),
    ]

    def config(name):
        return PathJoinSubstitution([FindPackageShare(PACKAGE), "config", name])

    return LaunchDescription([
        DeclareLaunchArgument("episodes_dir", default_value="episodes", description="episode store"),
        DeclareLaunchArgument("task", default_value="", description="task tag (empty: the instruction)"),
        DeclareLaunchArgument("instruction", default_value="",
                              description="instruction of the demos (or publish on /policy_node/instruction)"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/image_raw"),
        DeclareLaunchArgument("joint_states_topic", default_value="/joint_states"),
        DeclareLaunchArgument("frame_id", default_value="base_link", description="frame of the twist commands"),
        DeclareLaunchArgument("start_teleop", default_value="false",
                              description="start teleop_node too (needs terminal_prefix, e.g. 'xterm -e')"),
        DeclareLaunchArgument("terminal_prefix", default_value="xterm -e",
                              description="command that gives teleop_node a terminal"),
        LogInfo(condition=UnlessCondition(LaunchConfiguration("start_teleop")),
                msg="Run the keyboard teleop in its own terminal: ros2 run ire_vla_ros teleop_node"),
        Node(package=PACKAGE, executable="teleop_node", name="teleop_node", output="screen",
             condition=IfCondition(LaunchConfiguration("start_teleop")),
             prefix=LaunchConfiguration("terminal_prefix"),
             parameters=[config("teleop_node.yaml"), OVERRIDES["teleop_node"],
                         {"frame_id": LaunchConfiguration("frame_id")}]),
        Node(package=PACKAGE, executable="reward_node", name="reward_node", output="screen",
             parameters=[config("reward_node.yaml"), OVERRIDES["reward_node"]]),
        Node(package=PACKAGE, executable="recorder_node", name="recorder_node", output="screen",
             parameters=[config("recorder_node.yaml"), OVERRIDES["recorder_node"],
                         {"episodes_dir": LaunchConfiguration("episodes_dir"),
                          # value_type=str: an empty argument stays an empty string
                          "task": ParameterValue(LaunchConfiguration("task"), value_type=str),
                          "instruction": ParameterValue(LaunchConfiguration("instruction"), value_type=str)}],
             remappings=sensor_remaps),
    ])
