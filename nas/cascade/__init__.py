"""A chain of models cut from one teacher (`cascade = true`, `iterative_step`): which stages (`stages`),
running them (`run`) and their one-page view (`report`). Nothing is imported here, so `nas report` loads
the view without the training code `run` needs."""
