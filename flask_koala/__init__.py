"""Identify every Flask-Login login to Koala, off the request thread."""

__version__ = "0.1.0"
