"""The embedded demo: corpus, tokenizer and teacher (`teacher`), the whole pipeline end to end (`run`)."""
