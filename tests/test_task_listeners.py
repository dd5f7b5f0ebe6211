"""A task handle's listeners live as long as the task: dropped when it ends, or when unsubscribed.

Handles outlive their task (the experiment keeps a timed-out one to record its late result, the board a
weak reference): a listener kept on a finished handle would keep whatever it refers to (a round's
releaser, and through it the round's model) for as long.
"""

from __future__ import annotations

import asyncio
import weakref

from fedcore.framing import OutgoingPayload
from fedcore.wire import TaskKind
from fedserver.tasks import TaskHandle, TransferProgress


class Listener:
    def __init__(self) -> None:
        self.events: list[object] = []

    def __call__(self, handle: TaskHandle, event: object) -> None:
        self.events.append(event)


def handle() -> TaskHandle:
    return TaskHandle(task_id="t", node_id="n", experiment_id="e", round=1, kind=TaskKind.TRAIN,
                      payload=OutgoingPayload.from_object({"x": 1}, chunk_size=1024), inactivity_timeout=None)


def test_a_finished_handle_keeps_none_of_its_listeners() -> None:
    async def main() -> None:
        task = handle()
        listener = Listener()
        events, ref = listener.events, weakref.ref(listener)
        task.subscribe(listener)
        del listener
        task.transferred("download", 5, 5, 10)
        assert events == [TransferProgress("download", 5, 10)] and ref() is not None
        task.cancel("round finished")
        assert ref() is None, "the finished handle still holds its listener"
        task.transferred("download", 5, 10, 10)  # a straggling event after the end reaches nobody
        late = Listener()
        task.subscribe(late)  # nothing more can happen to a finished task: not kept
        assert events == [TransferProgress("download", 5, 10)] and late.events == []

    asyncio.run(main())


def test_unsubscribe_stops_the_events_for_that_listener_only() -> None:
    async def main() -> None:
        task = handle()
        gone, stays = Listener(), Listener()
        task.subscribe(gone)
        task.subscribe(stays)
        task.unsubscribe(gone)
        task.unsubscribe(Listener())  # never subscribed: nothing happens
        task.transferred("upload", 4, 4, 8)
        assert gone.events == [] and stays.events == [TransferProgress("upload", 4, 8)]
        ref = weakref.ref(gone)
        del gone
        assert ref() is None, "the handle still holds an unsubscribed listener"
        task.cancel()

    asyncio.run(main())
