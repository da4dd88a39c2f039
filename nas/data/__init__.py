"""Text in, token sequences out: reading documents (`corpus`), tokenizing, splitting, packing and caching (`tokens`)."""
