"""Control plane: store, placement, reconcile, router, API, CLI."""
