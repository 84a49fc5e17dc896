class Parameters:
    host: str
    port: int
    virtual_host: str
    heartbeat: int | None
    blocked_connection_timeout: float | None
    socket_timeout: float | None

class ConnectionParameters(Parameters):
    def __init__(
        self,
        host: str = ...,
        port: int = ...,
        virtual_host: str = ...,
        heartbeat: int | None = ...,
    ) -> None: ...

class URLParameters(Parameters):
    def __init__(self, url: str) -> None: ...
