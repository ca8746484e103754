"""The server and its wiring: runtime, command line, config, the HTTP server and its guards,
supervision, metrics, logs, the data folder, outbound HTTP."""
