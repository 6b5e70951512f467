"""edgeweave.coordinator"""
