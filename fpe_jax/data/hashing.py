"""sha256 of files, read in chunks: cache keys (MiniLM) and saved-model checks."""

import hashlib


def file_digest(path, digest=None):
  """`digest` (a new sha256 by default) updated with the bytes of the file at `path`."""
  digest = digest or hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest
