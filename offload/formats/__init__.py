"""Weight storage formats (NumPy)."""
