"""headlab.probes."""
