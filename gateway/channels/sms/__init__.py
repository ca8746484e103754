"""SMS channel: Kannel, Twilio and a generic webhook, with shared segments and concatenation."""
