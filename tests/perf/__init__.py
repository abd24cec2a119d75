"""Opt-in regression benchmarks (see conftest.py).  A package, so that its
conftest.py does not shadow tests/conftest.py."""
