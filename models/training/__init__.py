"""paperjax.models.training."""
