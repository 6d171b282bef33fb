"""Identity: fleet CA, certificates per role, key wrapping, TLS contexts, the home folder."""
