"""Loaders for the real data sets that ship inside packages (see data.md).

Each fails with the install command when its data is missing.
"""
