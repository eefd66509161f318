"""paperjax.models.ngram."""
