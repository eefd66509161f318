"""paperjax.models.transformer."""
