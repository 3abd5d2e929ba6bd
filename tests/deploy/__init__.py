"""Deployment: the Dockerfile and the compose files."""
