"""The registry's error: what was wrong, in which object and field.

A registry source (the YAML file, Kubernetes) raises :class:`RegistryError` when
its input cannot become a :class:`~controller.api.model.RegistryState`. The
message always starts with the object (``workloads[3] (shop/checkout)``) and,
when one field is at fault, the field (``field "ips[0]"``), so an operator can
find the line to fix without reading code.
"""

from __future__ import annotations

from controller.errors import ControllerError

__all__ = ["RegistryError"]


class RegistryError(ControllerError):
    """A registry document or object is invalid; the current state stays in service."""

    def __init__(
        self, message: str, *, hint: str | None = None, where: str = "", field: str = ""
    ) -> None:
        prefix = where
        if field:
            prefix = f'{prefix}: field "{field}"' if prefix else f'field "{field}"'
        super().__init__(f"{prefix}: {message}" if prefix else message, hint=hint)
        self.where = where
        self.field = field

    def located(self, source: str) -> RegistryError:
        """The same error prefixed with the document it came from (a file path)."""
        err = RegistryError(f"{source}: {self.message}", hint=self.hint)
        err.where, err.field = self.where, self.field
        return err
