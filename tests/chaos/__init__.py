"""The chaos suite (``nox -s chaos``): faults and hostile clients against real processes."""
