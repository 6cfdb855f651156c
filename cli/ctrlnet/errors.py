"""The exception types the CLI prints as one line, without a traceback.

`UserError` (exit 2): the user gave us something we cannot use. `ClusterError` and
`StorageError` (exit 1): the input was fine but the cluster or the object store said no or could
not be reached. `IntegrityError` (exit 1): what the trainer would write is not what it trained
(non-finite weights, a gathered copy unlike the live model), so nothing was. Anything else is a bug and keeps its traceback.

The Python API (`ctrlnet.Client`) raises the same types, with the same message and `exit_code`, plus
a few subclasses a script can catch by name: `RunNotFound` (exit 2), `ObjectsInvalid`, `RunFailed`,
`WaitTimeout` and `DeleteIncomplete` (exit 1).
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


# ------------------------------------------------------------------ the Python API's own (ctrlnet.Client)
class RunNotFound(UserError):
    """No run of that name in the namespace (exit 2, as `ctrlnet status NAME` says)."""

    exit_code = 2


class ObjectsInvalid(UserError):
    """The run's rendered objects break the schemas or ctrlnet's rules, so nothing was sent (exit 1,
    as `ctrlnet validate`). `problems`: one line each."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


class RunFailed(ClusterError):
    """`Client.wait`: the run ended Failed. `status`: its final RunStatus."""

    def __init__(self, message: str, status=None):
        super().__init__(message)
        self.status = status


class WaitTimeout(ClusterError):
    """`Client.wait`: the run had not finished when the timeout ran out (it goes on). `status`: its
    last RunStatus."""

    def __init__(self, message: str, status=None):
        super().__init__(message)
        self.status = status


class DeleteIncomplete(ClusterError):
    """`Client.delete`: some objects of the run were not deleted. `result`: what became of each."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
