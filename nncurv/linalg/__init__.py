"""Algorithms on operators: eigenvalues, trace, diagonal and spectral density."""

__all__: list[str] = []
