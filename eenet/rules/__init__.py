"""Scores -> one exit per sample under a budget."""
