"""Veil's foundation: what every room shares and nothing else.

- :mod:`veil.errors`: the :class:`~veil.errors.VeilError` root;
- :mod:`veil.settings`: one flag and one ``VEIL_*`` variable per config field;
- :mod:`veil.files`: crash-safe, 0600-from-the-first-byte state files.

It imports no other Veil package, so every room may import it.
"""
