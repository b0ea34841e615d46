"""headlab.analyses."""
