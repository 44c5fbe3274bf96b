"""gradwatch's bundled examples (importable, so tests can run them)."""
