"""The error moetron.parallel and moetron.comm raise for a bad argument, in their own parameter names.

These libraries know nothing of moetron's config: they say which of *their* parameters is wrong (`ep`,
`ranks_per_node`, `mode`), with the value and what would be valid. An application translates the parameter
to its own setting (the trainer: `parallel.ep`, `model.n_routed_experts`) before showing it to a user.
"""

from __future__ import annotations


class ParameterError(ValueError):
    def __init__(self, param: str, value, valid: str, detail: str = ""):
        self.param, self.value, self.valid, self.detail = param, value, valid, detail
        super().__init__(f"Invalid value for `{param}`: {value!r}. {detail + ' ' if detail else ''}Valid: {valid}.")
