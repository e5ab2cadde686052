"""The jobs worker: results, normal-tier dispatch, email outbox, reconciler."""
