"""Benchmarks behind ``fnmesh bench``: each prints its figure next to a baseline from the same run."""
