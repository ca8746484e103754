"""Telephony and multichannel intake gateway."""

__version__ = "0.1.0"
