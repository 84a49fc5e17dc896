"""improto.server: the Twisted IM server (installed as `improto.server`)."""
