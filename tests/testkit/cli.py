"""What every command-line test asserts about bad input."""


def assert_user_error(proc, *words):
    """Exit 2, one `error:` line naming the problem (each of `words` in it), no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]
