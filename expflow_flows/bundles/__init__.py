"""Bundles: submission bundles and reproducibility packages, with checksummed manifests."""
