"""Measurement primitives, written once and shared by the CLI, the bench suites and users."""
