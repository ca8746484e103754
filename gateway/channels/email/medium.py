"""The email medium: its deadline (GB/T 33358-2016: a first response within 24 h) and
its row in the report and the dashboard."""

from gateway.contact.media import DeadlineRule, Medium

MEDIUM = Medium(
    name="email",
    deadlines=(
        DeadlineRule(
            "email_response",
            "response",
            86400,
            row="email",
            label=("邮件", "E-mail"),
            color="#2ca02c",
        ),
    ),
)
