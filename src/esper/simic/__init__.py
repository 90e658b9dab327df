"""Simic: offline policy training from field reports and decision records."""
