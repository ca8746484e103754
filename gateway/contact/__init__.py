"""The contact's core: clock, ids, deadlines (SLA), language, phone numbers, bounded JSON,
attachments."""
