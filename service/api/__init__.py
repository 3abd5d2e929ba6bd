"""The HTTP layer: routers, dependencies, body readers and response classes."""
