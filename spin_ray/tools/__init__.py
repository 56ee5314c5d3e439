"""What a user runs beside the loop: `spin-ray serve`, `report`, `plan`, and experiment tracking."""
