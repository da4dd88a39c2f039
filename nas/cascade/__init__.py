"""A chain of models cut from one teacher (`cascade = true`, `iterative_step`): which stages (`chain`),
running them (`runner`) and their one-page view (`report`). Nothing is imported here, so `nas report` loads
the view without the training code `runner` needs."""
