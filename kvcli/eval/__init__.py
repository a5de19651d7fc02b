"""Measurement: TTFT side by side, quality against the base, memory, the exactness doctor, the self-check."""
