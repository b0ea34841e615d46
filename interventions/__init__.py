"""headlab.interventions."""
