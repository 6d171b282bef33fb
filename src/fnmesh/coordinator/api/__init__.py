"""The coordinator's REST API."""
