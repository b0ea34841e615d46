"""headlab.dashboard."""
