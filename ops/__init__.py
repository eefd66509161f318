"""paperjax.ops."""
