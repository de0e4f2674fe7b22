"""The one error type a user can cause; the CLI prints it as one sentence, never a traceback. UserError is the
core's (ubt_ray.core.errors), so that the library raises the same type the program catches."""

from .core.errors import UserError


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type or out of range."""


def find_user_error(exc: BaseException | None, _seen: set[int] | None = None) -> UserError | None:
    """The UserError behind `exc`, when one raised inside a Ray task, actor or Train worker reached the caller
    wrapped (RayTaskError's cause, Ray Train's per-worker failures, exception chains); None if there is none."""
    seen = _seen if _seen is not None else set()
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, UserError):
        return exc
    inner: list = [exc.__cause__, exc.__context__, getattr(exc, "cause", None)]
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        inner += list(failures.values())
    inner += [a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)]
    for e in inner:
        if isinstance(e, BaseException):
            found = find_user_error(e, seen)
            if found is not None:
                return found
    return None
