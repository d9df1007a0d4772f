"""One module per pipeline stage: a Config dataclass and `main(cfg) -> Path` (the directory it wrote)."""
