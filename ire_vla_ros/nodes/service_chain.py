"""Call std_srvs/Trigger services one after the other without blocking the executor.

Each response's done callback sends the next request; a timer cancels a call that does not
answer within `timeout_s`. For start-up sequences such as "reset the sim, then start the reward
node's episode" behind one service of the calling node.

    chain = TriggerChain(node, ["/sim_node/reset", "/reward_node/start_episode"], timeout_s=10.0)
    missing = chain.missing()            # services not available now
    chain.run(on_done=lambda: ..., on_failed=lambda why: ...)
"""
from __future__ import annotations

from typing import Callable, Sequence

from rclpy.callback_groups import ReentrantCallbackGroup
from std_srvs.srv import Trigger


class TriggerChain:
    def __init__(self, node, services: Sequence[str], *, timeout_s: float = 10.0):
        self.node = node
        self.group = ReentrantCallbackGroup()  # the caller's service should use it too
        self.clients = [node.create_client(Trigger, name, callback_group=self.group) for name in services if name]
        self.timeout_s = float(timeout_s)

    @property
    def names(self) -> list[str]:
        return [c.srv_name for c in self.clients]

    def missing(self) -> list[str]:
        return [c.srv_name for c in self.clients if not c.service_is_ready()]

    def run(self, on_done: Callable[[], None], on_failed: Callable[[str], None], index: int = 0) -> None:
        if index >= len(self.clients):
            on_done()
            return
        client = self.clients[index]
        future = client.call_async(Trigger.Request())
        timeout = self.timeout_s
        deadline = self.node.create_timer(timeout, future.cancel, callback_group=self.group)

        def done(fut):
            deadline.cancel()
            self.node.destroy_timer(deadline)
            if fut.cancelled():
                on_failed(f"{client.srv_name} did not answer within {timeout} s")
            elif fut.exception() is not None:
                on_failed(f"{client.srv_name} failed: {fut.exception()}")
            elif not fut.result().success:
                on_failed(f"{client.srv_name} refused: {fut.result().message}")
            else:
                self.run(on_done, on_failed, index + 1)

        future.add_done_callback(done)
