"""The KV predictor: calibration text, the closed-form fit, factoring, and applying it in numpy."""
