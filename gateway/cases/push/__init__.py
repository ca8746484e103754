"""Push delivery of contacts and events to case systems by signed webhooks."""

from gateway.cases.push.deadletter import DeadLetters
from gateway.cases.push.pusher import Pusher
from gateway.cases.push.signing import sign, verify

__all__ = ["DeadLetters", "Pusher", "sign", "verify"]
