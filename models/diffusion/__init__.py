"""paperjax.models.diffusion: video diffusion Transformers (Tora)."""
