"""Training a predictor through the frozen base (the torch extra)."""
