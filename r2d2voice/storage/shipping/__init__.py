"""Shipping transcripts to the fleet's PostgreSQL server, and reading the fleet back."""
