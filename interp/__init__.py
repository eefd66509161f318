"""paperjax.interp."""
