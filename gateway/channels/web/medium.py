"""The web medium: its deadline (GB/T 33358-2016: a first response within 3 min) and
its row in the report and the dashboard."""

from gateway.contact.media import DeadlineRule, Medium

MEDIUM = Medium(
    name="web",
    deadlines=(
        DeadlineRule(
            "web_response",
            "response",
            180,
            row="web",
            label=("网站/App", "Web and app"),
            color="#9467bd",
        ),
    ),
)
