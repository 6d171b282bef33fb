"""The node agent: probe, advertise, cache, execute, batch, admit."""
