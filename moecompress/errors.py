"""One exception type for mistakes a user can fix; the CLI turns it into one message and exit code 2."""


class UserError(Exception):
    """Bad input (model, recipe, data, options). The message must say what is wrong and how to fix it."""
