"""The project's one error base (the lowest layer holds it; control re-exports it).
Library code raises these; only the CLI prints them and maps them to exit statuses."""


class ZtError(Exception):
    """A failure with the exit status the CLI should use."""

    exit_status = 1


class InputError(ZtError):
    """Bad input (a file, a flag, a request): nothing was changed. Exit status 2."""

    exit_status = 2


class KernelError(ZtError):
    """The kernel refused or failed an operation at run time. Exit status 1."""


class TablesDoNotFit(ZtError):
    """The compiled tables need more than the loaded program was built for: rebuild it."""

    def __init__(self, shortfalls: list[str]):
        super().__init__("compiled tables do not fit the loaded program: " + "; ".join(shortfalls))
        self.shortfalls = shortfalls
