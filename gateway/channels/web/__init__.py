"""Web channels: the app intake for the hotline's own clients, and Open311 GeoReport v2."""
