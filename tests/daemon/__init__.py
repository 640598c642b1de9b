"""The daemon's tests (a package, so a test can use another's helpers)."""
