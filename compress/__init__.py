"""paperjax.compress."""
