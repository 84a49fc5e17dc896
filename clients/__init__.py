"""improto.clients: the client library and the reference console client (`improto.clients`)."""
