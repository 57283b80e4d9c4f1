"""The reward interface, weighted combination of components, and the remote scorer (client and server)."""
