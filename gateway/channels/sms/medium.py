"""The sms medium: its deadline (GB/T 33358-2016: a first response within 3 min) and
its row in the report and the dashboard."""

from gateway.contact.media import DeadlineRule, Medium

MEDIUM = Medium(
    name="sms",
    deadlines=(
        DeadlineRule(
            "sms_response", "response", 180, row="sms", label=("短信", "SMS"), color="#ff7f0e"
        ),
    ),
    phone=True,
)
