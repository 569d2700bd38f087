"""The one exception the serving checks raise: a refusal carrying its HTTP status and reason."""


class AdapterRefused(Exception):
    """A request or adapter that must not be served; `status` is the HTTP code the proxy answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
