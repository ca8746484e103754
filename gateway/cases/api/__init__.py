"""Case systems' side of the gateway: the consumer HTTP API (``routes``), the per-contact event
index (``index``) and the wiring of API, pusher, watcher and dashboard (``services``)."""
