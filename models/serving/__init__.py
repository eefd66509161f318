"""paperjax.models.serving."""
