"""spin_ray."""
