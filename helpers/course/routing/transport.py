"""How KV events travel from the replicas to the router: in order per replica, late, and sometimes not at all.

vLLM publishes each engine step's events as one batch (KVEventBatch: a timestamp and the events) on a ZeroMQ PUB
socket, with a sequence number per batch and a replay buffer a subscriber can ask for missed batches
(vllm/distributed/kv_events.py: ZmqEventPublisher.publish, _publisher_thread, _service_replay). PUB/SUB drops
messages when a subscriber is slow (the high-water mark) or not yet connected, so a router must live with lost
and late events. `EventChannel` is that channel in one process, on the replay's modelled clock:

    channel = EventChannel(delay=0.05, loss=0.1, seed=0)
    channel.publish(replica, events, now)          # one batch, sent at `now` (the end of the engine step)
    for replica, events, sent in channel.due(now): # batches that have arrived by `now`, oldest first
        router.deliver(replica, events, now)

delay: seconds every batch takes to arrive (late events: the router routes on an index that lags the caches).
loss: the probability that a batch never arrives (seeded). A lost batch is counted, with its sequence number, as
a subscriber sees a gap in vLLM's sequence numbers (it could ask the replay socket for it; here it is gone).
"""
from __future__ import annotations

import heapq
import random

__all__ = ["EventChannel"]


class EventChannel:
    def __init__(self, delay: float = 0.0, loss: float = 0.0, seed: int = 0):
        if delay < 0 or not 0 <= loss < 1:
            raise ValueError(f"delay={delay} must be >= 0 and loss={loss} in [0, 1)")
        self.delay, self.loss = delay, loss
        self._rng = random.Random(seed)
        self._queue: list = []
        self._seq = 0
        self.sent = self.lost = self.events_sent = self.events_lost = 0

    def publish(self, replica, events, now: float) -> None:
        if not events:
            return
        self._seq += 1
        self.sent += 1
        self.events_sent += len(events)
        if self.loss and self._rng.random() < self.loss:
            self.lost += 1
            self.events_lost += len(events)
            return
        heapq.heappush(self._queue, (now + self.delay, self._seq, replica, list(events), now))

    def due(self, now: float):
        """The batches that have arrived by `now`, in send order."""
        while self._queue and self._queue[0][0] <= now:
            _, _, replica, events, sent = heapq.heappop(self._queue)
            yield replica, events, sent

    def drop_replica(self, replica) -> None:
        """Batches of a replica that died and have not arrived yet never will."""
        self._queue = [item for item in self._queue if item[2] != replica]
        heapq.heapify(self._queue)
