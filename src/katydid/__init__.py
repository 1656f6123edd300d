"""Katydid: a speech-to-text server that seats every caller."""

__version__ = "0.1.0"
