"""The function contract: bundle format, invocation messages, example functions."""
