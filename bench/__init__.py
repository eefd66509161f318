"""paperjax.bench."""
