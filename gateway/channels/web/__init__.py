"""Web channels: the app intake for the hotline's own clients, and Open311 GeoReport v2."""

TYPES: tuple[str, ...] = (
    "gateway.channels.web.app:CHANNEL",
    "gateway.channels.web.open311:CHANNEL",
)

MEDIUM: str = "gateway.channels.web.medium:MEDIUM"
"""The medium of this folder's types: its deadlines and report rows."""
