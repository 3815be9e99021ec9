"""Loaders for the real data sets that ship inside packages (see data.md); each fails with the install command when its data is missing."""
