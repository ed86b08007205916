"""Dataset readers behind one registry, and the manifest that every stage reads.

A reader turns a folder into :class:`Record` s, one per image. ``prepare`` validates them
(readable images, masks of the image's size) and writes the manifest CSV.
"""

from __future__ import annotations

from .manifest import Manifest, Record, build_manifest, manifest_bits, set_bits
from .readers import IMAGE_EXTENSIONS, READERS, read_dataset

__all__ = ["IMAGE_EXTENSIONS", "READERS", "Manifest", "Record", "build_manifest", "manifest_bits", "read_dataset", "set_bits"]
