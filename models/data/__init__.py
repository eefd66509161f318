"""paperjax.models.data."""
