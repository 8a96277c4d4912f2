"""The download stage."""
