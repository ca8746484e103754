"""The case-system side: consumer API, push webhooks, reply routing, deadline watcher,
report, dashboard, surge detection and the message catalogue."""
