"""Plots and exports for people: confusion matrices, UMAPs, (later) overlays and QuPath GeoJSON."""
