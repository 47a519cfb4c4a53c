"""Online serving of base + per-user carry-on adapters with Ray Serve."""
