"""Closed-form predictions of the papers."""
