"""Static web pages."""
