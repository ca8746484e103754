"""The chat medium: its deadline (GB/T 33358-2016: a first response within 3 min) and
its row in the report and the dashboard."""

from gateway.contact.media import DeadlineRule, Medium

MEDIUM = Medium(
    name="chat",
    deadlines=(
        DeadlineRule(
            "chat_response",
            "response",
            180,
            row="chat",
            label=("在线消息", "Chat"),
            color="#d62728",
        ),
    ),
)
