"""Data: synthetic scenes for demos and tests (the real pipelines come with the data issue)."""
