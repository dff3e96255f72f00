"""Veil."""
