"""Building blocks of the transformer: normalisation, rotary embeddings, attention backends."""
