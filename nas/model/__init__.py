"""The teacher's shape: per-family module access and loading (`families`), `Arch` and its analytic sizes (`arch`)."""
