"""Shared vocabulary of CoVSpec Serve: plain data crossing package boundaries.

No ray, redis or model code lives here; only frozen dataclasses, protocols and config.
"""
