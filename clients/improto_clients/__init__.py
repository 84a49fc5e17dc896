"""improto_clients: the client library and the reference console client (`improto_clients`)."""
