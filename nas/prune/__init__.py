"""What to keep: importance scores (`importance`), the candidate space under a budget (`space`), cutting a candidate out of the teacher (`cut`)."""
