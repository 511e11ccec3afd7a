"""Dialect-neutral core: types, errors, engine contract, router."""
