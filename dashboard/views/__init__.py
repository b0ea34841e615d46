"""One module per analysis; each registers its page with ``@register_view`` (see ``headlab.dashboard.registry``)."""
