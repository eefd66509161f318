"""paperjax.models."""
