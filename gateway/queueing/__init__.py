"""Redis Streams queue: key layout, intake scripts, spool, embedded server, consumer library."""

from gateway.queueing.consumer import (
    ContactConsumer,
    Delivery,
    EventConsumer,
    ReplyConsumer,
    StreamConsumer,
    post_reply,
)
from gateway.queueing.keys import Keys

__all__ = [
    "ContactConsumer",
    "Delivery",
    "EventConsumer",
    "Keys",
    "ReplyConsumer",
    "StreamConsumer",
    "post_reply",
]
