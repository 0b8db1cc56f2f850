"""User-facing doors: the `slimtrain` CLI and (later) the HTTP API."""
