"""Auris training: builds, evaluates and exports models."""
