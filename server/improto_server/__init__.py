"""improto_server: the Twisted IM server (installed as `improto_server`)."""
