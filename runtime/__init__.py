"""edgeweave.runtime"""
