"""Dock widgets and background tasks of the GeoCATE plugin."""
