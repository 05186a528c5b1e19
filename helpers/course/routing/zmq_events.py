"""KV events over ZeroMQ, as vLLM publishes them: a PUB socket per replica, the router SUBscribed to all of them.

vLLM's ZmqEventPublisher (vllm/distributed/kv_events.py) sends each batch as three frames — the topic, an 8-byte
big-endian sequence number, the msgpack payload (wire.py) — on a PUB socket (`--kv-events-config
'{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557"}'`), and keeps a replay buffer
behind a ROUTER socket for subscribers that missed batches. llm-d's and Dynamo's routers subscribe with a SUB socket
per engine (llm-d/llm-d-kv-cache pkg/kvevents/zmq_subscriber.go).

    publisher = ZmqEventPublisher("tcp://127.0.0.1:5557")           # in a replica
    publisher.publish(events, ts)
    subscriber = ZmqEventSubscriber({0: "tcp://127.0.0.1:5557"})     # in the router
    for replica, seq, ts, events in subscriber.poll(timeout=0.1):
        router.deliver(replica, events, ts)

PUB/SUB never blocks the publisher: a batch sent before the subscriber connected, or while it is slow (past the
high-water mark), is dropped. The subscriber sees that as a gap in the sequence numbers and counts it
(`gaps[replica]`, batches missed); a payload it cannot decode is counted in `malformed` and skipped. vLLM's replay
socket is not reproduced here: a router that missed events lives with a stale index (the chapter measures what
that costs) until the next events correct it.
"""
from __future__ import annotations

import logging
import time

import zmq

from helpers.course.routing.wire import decode_batch, encode_batch

__all__ = ["ZmqEventPublisher", "ZmqEventSubscriber"]

log = logging.getLogger(__name__)


class ZmqEventPublisher:
    """Binds a PUB socket at `endpoint` and sends (topic, seq, payload) per batch; seq counts from 0."""

    def __init__(self, endpoint: str, topic: str = "", context: zmq.Context | None = None, hwm: int = 100_000):
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.set_hwm(hwm)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.topic, self.seq = topic.encode(), 0

    def publish(self, events, ts: float | None = None) -> int:
        """Send one batch (nothing if `events` is empty). Returns its sequence number (-1 if nothing sent)."""
        if not events:
            return -1
        seq, self.seq = self.seq, self.seq + 1
        payload = encode_batch(time.time() if ts is None else ts, events)
        self.socket.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
        return seq

    def close(self) -> None:
        self.socket.close(linger=0)


class ZmqEventSubscriber:
    """One SUB socket per replica ({replica: endpoint}); poll() returns the batches that have arrived."""

    def __init__(self, endpoints: dict, topic: str = "", context: zmq.Context | None = None):
        self.context = context or zmq.Context.instance()
        self.poller = zmq.Poller()
        self.sockets, self.next_seq = {}, {}
        self.gaps = {replica: 0 for replica in endpoints}
        self.malformed = 0
        for replica, endpoint in endpoints.items():
            self.add(replica, endpoint, topic)

    def add(self, replica, endpoint: str, topic: str = "") -> None:
        socket = self.context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        socket.connect(endpoint)
        self.sockets[replica] = socket
        self.poller.register(socket, zmq.POLLIN)
        self.gaps.setdefault(replica, 0)
        self.next_seq.pop(replica, None)

    def remove(self, replica) -> None:
        """A replica died: stop listening to it (a restarted one is add()ed again and starts its numbers at 0)."""
        socket = self.sockets.pop(replica, None)
        if socket is not None:
            self.poller.unregister(socket)
            socket.close(linger=0)
        self.next_seq.pop(replica, None)

    def poll(self, timeout: float = 0.0) -> list:
        """[(replica, seq, ts, events)] of every batch waiting now, or arriving within `timeout` seconds."""
        out = []
        ready = dict(self.poller.poll(int(timeout * 1000)))
        while ready:
            for replica, socket in list(self.sockets.items()):
                if socket not in ready:
                    continue
                frames = socket.recv_multipart()
                batch = self._read(replica, frames)
                if batch is not None:
                    out.append(batch)
            ready = dict(self.poller.poll(0))
        return out

    def _read(self, replica, frames):
        try:
            _topic, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big")
            ts, events = decode_batch(payload)
        except ValueError as exc:
            self.malformed += 1
            log.warning("replica %r: KV event batch skipped (%s)", replica, exc)
            return None
        expected = self.next_seq.get(replica)
        if expected is not None and seq > expected:
            self.gaps[replica] += seq - expected
        self.next_seq[replica] = seq + 1
        return replica, seq, ts, events

    def close(self) -> None:
        for replica in list(self.sockets):
            self.remove(replica)
