"""Serving: the OpenAI-compatible HTTP app (server.py) and its Ray Serve deployment (ray_deploy.py)."""
