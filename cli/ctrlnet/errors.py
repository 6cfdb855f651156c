"""The exception types the CLI prints as one line, without a traceback.

`UserError` (exit 2): the user gave us something we cannot use. `ClusterError` and
`StorageError` (exit 1): the input was fine but the cluster or the object store said no or could
not be reached. `IntegrityError` (exit 1): what the trainer would write is not what it trained
(non-finite weights, a gathered copy unlike the live model), so nothing was. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""

    exit_code = 2


class ClusterError(UserError):
    """A cluster-side failure (unreachable, forbidden, operator missing, job failed): the message
    names what the cluster said and what to do about it."""

    exit_code = 1


class StorageError(UserError):
    """Object storage failed while the input was fine (endpoint unreachable, credentials missing
    or refused, uploads that keep failing): the message names the endpoint or checkpoint and the
    variable or setting to check."""

    exit_code = 1


class IntegrityError(UserError):
    """The trainer refused to write or load weights that are not what was trained: non-finite
    values, a gathered copy unlike the live model, a file that does not read back as written. The
    message names the tensors and what is intact. Permanent (exit 1): retrying repeats it."""

    exit_code = 1


def one_line(error: BaseException, *, limit: int = 200, with_type: bool = False) -> str:
    """The first non-empty line of an exception's message, at most `limit` characters (its type's
    name when the message is empty): what a one-line error quotes of a library's exception, which
    may span pages (a hub's HTML, a server's stack)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    name = type(error).__name__
    if not lines:
        return name
    text = lines[0] if len(lines[0]) <= limit else lines[0][: limit - 1] + "…"
    return f"{name}: {text}" if with_type else text
