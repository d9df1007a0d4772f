"""Static pages served by `cakelm serve` (no build step, no external resources)."""
