"""The `fnmesh` command line."""
