"""The built-in demo: a small generated web, served on loopback, that `make build-dataset` crawls."""
