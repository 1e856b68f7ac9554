"""hemeflow engine: slide IO, tiling, models and the Ray pipeline for hematopathology archives.

Importing ``engine`` does no work and pulls in nothing heavy; import the submodule you need.
"""

__version__ = "0.1.0"
