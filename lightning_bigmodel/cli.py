"""The ``lightning-bigmodel`` command (placeholder until the Lightning integration lands)."""


def main() -> None:  # pragma: no cover
    raise NotImplementedError
