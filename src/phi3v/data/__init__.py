"""Catalog data: reading, downloading, synthetic catalogs."""
