"""edgeweave.node"""
