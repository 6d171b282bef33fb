"""fnmesh: a serverless AI function mesh for edge devices and cloud GPU nodes."""

__version__ = "0.1.0"
