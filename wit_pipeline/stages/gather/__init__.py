"""The gather stage."""
