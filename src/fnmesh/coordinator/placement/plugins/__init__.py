"""Placement plugins, one rule per file.

Filters: ``identity``, ``liveness``, ``draining``, ``residency``, ``tier``,
``labels``, ``hardware``, ``capacity``. Scores: ``hardware`` (GPU
preference), ``latency``, ``headroom``, ``warmth``, ``cost``, ``spread``.
:mod:`fnmesh.coordinator.placement.registry` maps the names to factories.
"""
