"""Push delivery of contacts and events to case systems by signed webhooks."""

from gateway.push.deadletter import DeadLetters
from gateway.push.pusher import Pusher
from gateway.push.signing import sign, verify

__all__ = ["DeadLetters", "Pusher", "sign", "verify"]
