"""Launching beyond one process: multi-host initialisation (XManager / GKE launchers build on it)."""
