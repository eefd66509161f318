"""paperjax.align."""
