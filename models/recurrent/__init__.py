"""paperjax.models.recurrent."""
