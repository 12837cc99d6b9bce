"""The operator's window: what the dashboard, the JSON API and /metrics show, and the actions they offer.

Nothing here shows or logs a patient value: series and images are named by database ids, error
reasons are PHI-free by design, and the identifier response is shown only with its own permission.
"""
