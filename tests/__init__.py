"""The library's own tests, a package: helpers are imported one way, ``from tests.<module>``.

The repository root is on sys.path under plain pytest (the root conftest.py) and under nox.
"""
