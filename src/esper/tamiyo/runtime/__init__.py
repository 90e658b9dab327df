"""Tamiyo's runtime: the service that turns packets into verified commands, and what it runs on."""
