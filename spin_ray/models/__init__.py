"""Models: the cache and safe loaders (`loading`), and the named models built offline (`builders`)."""
