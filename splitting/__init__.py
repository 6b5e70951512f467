"""edgeweave.splitting"""
