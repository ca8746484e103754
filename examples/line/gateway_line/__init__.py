"""An example channel adapter shipped as its own distribution: LINE Messaging API."""
